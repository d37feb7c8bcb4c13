"""The typed SSA IR: TensorType, Node, Graph, and its text form (printer + parser).

A graph is an immutable value: a name, a tuple of typed inputs (user arguments,
parameters, optimizer state), a tuple of nodes in topological order, and a tuple
of output value names.  Every node defines exactly one SSA value.

Text form (parses back to an equal graph)::

    graph mlp(%x: f32[4, 8], param %fc.weight: f32[16, 8]) {
      %0: f32[8, 16] = transpose(%fc.weight) {perm=[1, 0]}  # model.py:12
      %1: f32[4, 16] = matmul(%x, %0)  # model.py:12
      return (%1)
    }
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

# ----------------------------------------------------------------------------- dtypes

DTYPES = ("float32", "float64", "int32", "int64", "bool")
FLOAT_DTYPES = ("float32", "float64")
INT_DTYPES = ("int32", "int64")
_SHORT = {"float32": "f32", "float64": "f64", "int32": "i32", "int64": "i64", "bool": "bool"}
_LONG = {v: k for k, v in _SHORT.items()}
_ITEMSIZE = {d: np.dtype(d).itemsize for d in DTYPES}


_DTYPE_SET = frozenset(DTYPES)
_SHAPES: dict[tuple, tuple] = {}  # normalised shape -> itself (TensorType's fast path)
_TYPE_TEXT: dict[tuple, str] = {}  # (shape, dtype) -> "f32[4, 8]"


def canonical_dtype(dtype: Any) -> str:
    """Map a dtype-like (str, numpy dtype, python type) onto one of DTYPES, or raise."""
    if type(dtype) is str and dtype in _DTYPE_SET:  # the common case: already canonical
        return dtype
    if isinstance(dtype, str) and dtype in _LONG:
        return _LONG[dtype]
    if dtype is float:
        return "float32"
    if dtype is int:
        return "int64"
    if dtype is bool:
        return "bool"
    try:
        name = np.dtype(dtype).name
    except TypeError:
        raise TypeError(f"unsupported dtype {dtype!r}; neural_arch supports {', '.join(DTYPES)}") from None
    if name not in DTYPES:
        raise TypeError(f"unsupported dtype {name!r}; neural_arch supports {', '.join(DTYPES)}")
    return name


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


# ----------------------------------------------------------------------------- types


@dataclass(frozen=True, init=False)
class TensorType:
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __init__(self, shape: Iterable[int], dtype: Any = "float32"):
        # shapes seen before map to their normalised tuple (a tuple equal to a normalised
        # one, e.g. of NumPy ints, normalises to it), so the common case builds nothing
        try:
            known = _SHAPES.get(shape) if type(shape) is tuple else None
        except TypeError:  # an unhashable entry (a 0-d array): normalised below
            known = None
        if known is None:
            known = tuple(int(d) for d in shape)
            if any(d < 0 for d in known):
                raise ValueError(f"negative dimension in shape {known}")
            if len(_SHAPES) > 100_000:
                _SHAPES.clear()
            _SHAPES[known] = known
        if type(dtype) is not str or dtype not in _DTYPE_SET:
            dtype = canonical_dtype(dtype)
        d = self.__dict__  # (frozen: fields are set once, here, without __setattr__)
        d["shape"] = known
        d["dtype"] = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * _ITEMSIZE[self.dtype]

    def __str__(self) -> str:
        key = (self.shape, self.dtype)
        text = _TYPE_TEXT.get(key)
        if text is None:
            if len(_TYPE_TEXT) > 100_000:
                _TYPE_TEXT.clear()
            text = _TYPE_TEXT[key] = f"{_SHORT[self.dtype]}[{', '.join(map(str, self.shape))}]"
        return text


@dataclass(frozen=True)
class SourceLoc:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


_PLAIN = (int, float, str, bool, type(None))


def _freeze(value: Any) -> Any:
    """Normalise an attribute value into an immutable, printable Python value."""
    t = type(value)
    if t in _PLAIN:  # already a frozen value (exact types only: subclasses are normalised)
        return value
    if t is tuple and all(type(v) is int for v in value):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.ndarray):
        return tuple(_freeze(v) for v in value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"unsupported attribute value {value!r} of type {type(value).__name__}")


def _attr_equal(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_attr_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


@dataclass(frozen=True, eq=False, init=False)
class Node:
    """One SSA definition: ``name: type = op(inputs) {attrs}``."""

    name: str
    op: str
    inputs: tuple[str, ...]
    type: TensorType
    attrs: tuple[tuple[str, Any], ...] = ()
    loc: SourceLoc | None = None

    def __init__(self, name: str, op: str, inputs: tuple[str, ...], type: TensorType,
                 attrs: tuple[tuple[str, Any], ...] = (), loc: SourceLoc | None = None):
        d = self.__dict__  # (frozen: fields are set once, here, without __setattr__; graphs
        d["name"] = name   # make and rewrite thousands of nodes)
        d["op"] = op
        d["inputs"] = inputs
        d["type"] = type
        d["attrs"] = attrs
        d["loc"] = loc

    @staticmethod
    def make(name: str, op: str, inputs: Iterable[str], type: TensorType,
             attrs: Mapping[str, Any] | None = None, loc: SourceLoc | None = None) -> "Node":
        if not attrs:
            frozen = ()
        elif len(attrs) == 1:
            (k, v), = attrs.items()
            frozen = ((k, _freeze(v)),)
        else:
            frozen = tuple(sorted([(k, _freeze(v)) for k, v in attrs.items()]))
        return Node(name, op, tuple(inputs), type, frozen, loc)

    @property
    def attr(self) -> dict[str, Any]:
        return dict(self.attrs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Node):
            return NotImplemented
        return (self.name == other.name and self.op == other.op and self.inputs == other.inputs
                and self.type == other.type and self.loc == other.loc
                and len(self.attrs) == len(other.attrs)
                and all(k1 == k2 and _attr_equal(v1, v2)
                        for (k1, v1), (k2, v2) in zip(self.attrs, other.attrs)))

    def __hash__(self) -> int:
        return hash((self.name, self.op, self.inputs, self.type))

    def __str__(self) -> str:
        return format_node(self)


INPUT_KINDS = ("arg", "param", "state")


@dataclass(frozen=True)
class GraphInput:
    name: str
    type: TensorType
    kind: str = "arg"  # "arg" (user argument), "param" (parameter), "state" (optimizer state)

    def __post_init__(self):
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"input kind must be one of {INPUT_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class Graph:
    name: str
    inputs: tuple[GraphInput, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    _types: dict = field(default=None, compare=False, repr=False)  # cache, filled lazily

    @property
    def types(self) -> dict[str, TensorType]:
        """Name -> TensorType of every value (inputs and node outputs)."""
        if self._types is None:
            t = {i.name: i.type for i in self.inputs}
            t.update((n.name, n.type) for n in self.nodes)
            object.__setattr__(self, "_types", t)
        return self._types

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @property
    def output_types(self) -> tuple[TensorType, ...]:
        return tuple(self.types[o] for o in self.outputs)

    def producer(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def users(self) -> dict[str, list[Node]]:
        u: dict[str, list[Node]] = {name: [] for name in self.types}
        for n in self.nodes:
            for i in n.inputs:
                u.setdefault(i, []).append(n)
        return u

    def replace(self, **changes) -> "Graph":
        d = dict(name=self.name, inputs=self.inputs, nodes=self.nodes, outputs=self.outputs)
        d.update(changes)
        return Graph(d["name"], tuple(d["inputs"]), tuple(d["nodes"]), tuple(d["outputs"]))

    def to_text(self) -> str:
        return format_graph(self)

    def __str__(self) -> str:
        return format_graph(self)


# ----------------------------------------------------------------------------- printer


def format_value(v: Any) -> str:
    t = type(v)
    if t is int:
        return str(v)
    if t is tuple and all(type(x) is int for x in v):
        return "[" + ", ".join(map(str, v)) + "]"
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        r = repr(v)
        return r if any(c in r for c in ".e") else r + ".0"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, tuple):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    raise TypeError(f"cannot print attribute value {v!r}")


def format_node(n: Node, location: bool = True) -> str:
    """``%name: type = op(%a, %b) {attrs}  # file:line`` (the location only if asked and known)."""
    s = f"%{n.name}: {n.type} = {n.op}(%{', %'.join(n.inputs)})" if n.inputs else f"%{n.name}: {n.type} = {n.op}()"
    if n.attrs:
        s += " {" + ", ".join([f"{k}={format_value(v)}" for k, v in n.attrs]) + "}"
    if location and n.loc is not None:
        s += f"  # {n.loc}"
    return s


def format_graph(g: Graph, locations: bool = True) -> str:
    """The text form; ``locations=False`` leaves out the source lines (the canonical text
    that keys compiled code: equal for graphs traced from different lines)."""
    params = []
    for i in g.inputs:
        prefix = "" if i.kind == "arg" else i.kind + " "
        params.append(f"{prefix}%{i.name}: {i.type}")
    lines = [f"graph {g.name}({', '.join(params)}) {{"]
    lines += ["  " + format_node(n, locations) for n in g.nodes]
    lines.append("  return (" + ", ".join("%" + o for o in g.outputs) + ")")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- JSON records


def _json_value(v: Any) -> Any:
    return [_json_value(x) for x in v] if type(v) is tuple else v


def _frozen_value(v: Any) -> Any:
    if type(v) is list:
        return tuple(_frozen_value(x) for x in v)
    if v is None or type(v) in (int, float, str, bool):
        return v
    raise TypeError(f"unsupported attribute value {v!r} in a node record")


def node_records(nodes: Iterable[Node], loc_key: Callable[[SourceLoc | None], Any]) -> list:
    """Nodes as JSON-able lists ``[name, op, inputs, shape, dtype, attrs, loc_key(loc)]``
    (attribute tuples as lists; NaN and infinities as JSON's NaN / Infinity)."""
    return [[n.name, n.op, list(n.inputs), list(n.type.shape), n.type.dtype,
             [[k, _json_value(v)] for k, v in n.attrs], loc_key(n.loc)] for n in nodes]


def nodes_from_records(records: list, loc_of: Callable[[Any], SourceLoc | None]) -> list[Node]:
    """The inverse of :func:`node_records` (``loc_of`` maps a stored location key back);
    raises ValueError / TypeError / KeyError on a record of another shape."""
    from .ops.registry import PRIMITIVES
    types: dict = {}
    nodes = []
    for name, op, inputs, shape, dtype, attrs, loc in records:
        if type(name) is not str or op not in PRIMITIVES or not all(type(i) is str for i in inputs):
            raise ValueError(f"malformed node record {name!r}")
        key = (tuple(shape), dtype)
        t = types.get(key)
        if t is None:
            t = types[key] = TensorType(*key)
        nodes.append(Node(name, op, tuple(inputs), t, tuple((k, _frozen_value(v)) for k, v in attrs), loc_of(loc)))
    return nodes


# ----------------------------------------------------------------------------- parser


class ParseError(ValueError):
    pass


_TOKEN = re.compile(r"""
    (?P<ws>[ \t]+)
  | (?P<comment>\#[^\n]*)
  | (?P<nl>\n)
  | (?P<value>%[A-Za-z0-9_.\-]+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>-?(?:(?:inf|nan)(?![A-Za-z0-9_])|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[()\[\]{},:=])
""", re.VERBOSE)


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    toks, pos, line = [], 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ParseError(f"line {line}: unexpected character {text[pos]!r}")
        kind = m.lastgroup
        val = m.group()
        if kind == "nl":
            toks.append(("nl", val, line))
            line += 1
        elif kind == "comment":
            toks.append(("comment", val[1:].strip(), line))
        elif kind != "ws":
            toks.append((kind, val, line))
        pos = m.end()
    toks.append(("eof", "", line))
    return toks


class _Parser:
    def __init__(self, text: str):
        self.toks = _tokenize(text)
        self.i = 0

    def peek(self, skip_nl: bool = True):
        while skip_nl and self.toks[self.i][0] in ("nl", "comment"):
            self.i += 1
        return self.toks[self.i]

    def next(self, skip_nl: bool = True):
        t = self.peek(skip_nl)
        self.i += 1
        return t

    def expect(self, kind: str, val: str | None = None, skip_nl: bool = True):
        t = self.next(skip_nl)
        if kind == "ident" and t[0] == "number" and t[1] in ("inf", "nan"):
            t = ("ident",) + t[1:]  # a name that happens to be spelled like a number
        if t[0] != kind or (val is not None and t[1] != val):
            want = val or kind
            raise ParseError(f"line {t[2]}: expected {want!r}, found {t[1] or t[0]!r}")
        return t

    def type(self) -> TensorType:
        t = self.next()
        if t[0] != "ident" or t[1] not in _LONG:
            raise ParseError(f"line {t[2]}: expected a dtype (f32, f64, i32, i64, bool), found {t[1]!r}")
        self.expect("punct", "[")
        dims = []
        while self.peek()[1] != "]":
            dims.append(int(self.expect("number")[1]))
            if self.peek()[1] == ",":
                self.next()
        self.expect("punct", "]")
        return TensorType(tuple(dims), _LONG[t[1]])

    def value(self) -> Any:
        t = self.next()
        kind, val = t[0], t[1]
        if kind == "number":
            if val in ("inf", "-inf", "nan", "-nan"):
                return float(val)
            if any(c in val for c in ".eE"):
                return float(val)
            return int(val)
        if kind == "string":
            return re.sub(r"\\(.)", r"\1", val[1:-1])
        if kind == "ident" and val in ("true", "false", "none"):
            return {"true": True, "false": False, "none": None}[val]
        if kind == "punct" and val == "[":
            items = []
            while self.peek()[1] != "]":
                items.append(self.value())
                if self.peek()[1] == ",":
                    self.next()
            self.next()
            return tuple(items)
        raise ParseError(f"line {t[2]}: expected an attribute value, found {val!r}")

    def graph(self) -> Graph:
        self.expect("ident", "graph")
        name = self.expect("ident")[1]
        self.expect("punct", "(")
        inputs = []
        while self.peek()[1] != ")":
            kind = "arg"
            if self.peek()[0] == "ident":
                kind = self.next()[1]
                if kind not in INPUT_KINDS:
                    raise ParseError(f"unknown input kind {kind!r}")
            vname = self.expect("value")[1][1:]
            self.expect("punct", ":")
            inputs.append(GraphInput(vname, self.type(), kind))
            if self.peek()[1] == ",":
                self.next()
        self.expect("punct", ")")
        self.expect("punct", "{")
        nodes = []
        while True:
            t = self.peek()
            if t[0] == "ident" and t[1] == "return":
                break
            nodes.append(self.node())
        self.expect("ident", "return")
        self.expect("punct", "(")
        outs = []
        while self.peek()[1] != ")":
            outs.append(self.expect("value")[1][1:])
            if self.peek()[1] == ",":
                self.next()
        self.expect("punct", ")")
        self.expect("punct", "}")
        if self.peek()[0] != "eof":
            raise ParseError(f"line {self.peek()[2]}: text after the end of the graph")
        return Graph(name, tuple(inputs), tuple(nodes), tuple(outs))

    def node(self) -> Node:
        vname = self.expect("value")[1][1:]
        self.expect("punct", ":")
        ty = self.type()
        self.expect("punct", "=")
        op = self.expect("ident")[1]
        self.expect("punct", "(")
        args = []
        while self.peek()[1] != ")":
            args.append(self.expect("value")[1][1:])
            if self.peek()[1] == ",":
                self.next()
        self.expect("punct", ")")
        attrs = {}
        if self.peek(skip_nl=False)[1] == "{":
            self.next(skip_nl=False)
            while self.peek()[1] != "}":
                key = self.expect("ident")[1]
                self.expect("punct", "=")
                attrs[key] = self.value()
                if self.peek()[1] == ",":
                    self.next()
            self.expect("punct", "}")
        loc = None
        t = self.toks[self.i]
        if t[0] == "comment":
            m = re.fullmatch(r"(.*):(\d+)", t[1])
            if m:
                loc = SourceLoc(m.group(1), int(m.group(2)))
            self.i += 1
        return Node.make(vname, op, args, ty, attrs, loc)


def parse(text: str) -> Graph:
    """Parse the text form printed by :func:`format_graph` back into a Graph."""
    return _Parser(text).graph()

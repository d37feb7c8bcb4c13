"""The IR: text round-trip (a hypothesis property over traced random programs and over
hand-built graphs with arbitrary attributes), the verifier's positive and negative cases,
and source locations on nodes."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neural_arch.compiler import Tensor, parse, tensor, trace, verify
from neural_arch.compiler import functional as F
from neural_arch.compiler.ir import (Graph, GraphInput, Node, ParseError, SourceLoc, TensorType,
                                     format_node)
from neural_arch.compiler.verify import VerifyError
from neural_arch.runtime.interpreter import interpret

from conftest import HypothesisSampler

SPECIAL_FLOATS = st.sampled_from([math.inf, -math.inf, math.nan, 0.0, -0.0, 1e-300, 1.5e300, -2.5])

# ============================================================================ random traced programs


def _apply_random_op(data, vals: list[Tensor]) -> Tensor:
    """Draw one op and apply it to tensors drawn from ``vals`` (all valid by construction)."""
    a = data.draw(st.sampled_from(vals), label="operand")
    kind = data.draw(st.sampled_from([
        "unary", "scalar", "binary", "sum", "max", "transpose", "reshape", "slice", "pad", "where",
        "cast", "softmax", "concat", "matmul", "gather", "masked_fill", "constant", "index"]), label="op")
    nd = a.ndim
    if kind == "unary":
        f = data.draw(st.sampled_from([F.exp, F.tanh, F.sin, F.abs, F.neg, F.sigmoid, F.gelu, F.relu, F.erf]))
        return f(a)
    if kind == "scalar":
        return a * data.draw(st.one_of(SPECIAL_FLOATS, st.floats(-3, 3)))
    if kind == "binary":
        b = data.draw(st.sampled_from(vals))
        try:
            np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            b = a
        return data.draw(st.sampled_from([F.add, F.sub, F.mul, F.maximum, F.minimum]))(a, b)
    if kind in ("sum", "max"):
        axes = tuple(i for i in range(nd) if data.draw(st.booleans()))
        if kind == "max" and any(a.shape[i] == 0 for i in (axes or range(nd))):  # () means all axes
            kind = "sum"
        f = F.sum if kind == "sum" else F.max
        return f(a, axes if axes else None, keepdims=data.draw(st.booleans()))
    if kind == "transpose":
        return F.transpose(a)
    if kind == "reshape":
        return F.reshape(a, -1) if a.size else F.reshape(a, a.shape + (1,))
    if kind == "slice" and nd:
        return a[::2]
    if kind == "pad":
        return F.pad(a, [(1, 0)] * nd, value=data.draw(SPECIAL_FLOATS))
    if kind == "where":
        return F.where(a > 0, a, data.draw(SPECIAL_FLOATS))
    if kind == "cast":
        return F.cast(F.cast(a, data.draw(st.sampled_from(["float64", "int32", "int64", "bool"]))), "float32")
    if kind == "softmax" and nd:
        return F.softmax(a, -1)
    if kind == "concat" and nd:
        return F.concat([a, a], axis=0)
    if kind == "matmul" and nd == 2:
        return a @ a.T
    if kind == "gather" and nd and a.shape[0]:
        return F.gather(a, Tensor(np.array([[0, a.shape[0] - 1]])), axis=0)
    if kind == "masked_fill":
        return F.masked_fill(a, a < 0, -math.inf)
    if kind == "constant":
        return a + Tensor(np.arange(math.prod(a.shape[-1:]), dtype=np.float32).reshape(a.shape[-1:]))
    if kind == "index" and nd >= 2 and a.shape[0] > 1:
        return a[1, ..., None]
    return F.exp(a)


def _random_program(data):
    s = HypothesisSampler(data)
    x = s.array(s.shape(max_rank=3, max_dim=4))
    y = s.array(s.shape(max_rank=2, max_dim=4))
    n_ops = data.draw(st.integers(1, 7), label="n_ops")

    def program(x, y):
        vals = [x, y]
        for _ in range(n_ops):
            vals.append(_apply_random_op(data, vals))
        k = data.draw(st.integers(1, 2), label="n_outputs")
        return tuple(vals[-k:])

    return program, x, y


@settings(max_examples=100)  # cheap, and the space of programs is large
@given(data=st.data())
def test_print_parse_round_trip_of_traced_programs(data):
    program, x, y = _random_program(data)
    g = trace(program, x, y)
    verify(g)
    text = g.to_text()
    back = parse(text)
    assert back == g
    assert back.to_text() == text
    verify(back)
    with np.errstate(all="ignore"):
        for a, b in zip(interpret(g, [x, y]), interpret(back, [x, y])):
            np.testing.assert_array_equal(a, b)


# ============================================================================ arbitrary attributes

IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
VALUE_NAME = st.from_regex(r"[A-Za-z0-9_.\-]{1,10}", fullmatch=True)
ATTR_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), SPECIAL_FLOATS,
                      st.text(max_size=12),
                      st.sampled_from(['a"b', "back\\slash", "new\nline", "tab\tx", "# not a comment",
                                       "%v", "{x=1}", "[1, 2]", "", "\\", '\\"', "ünïcødé ✓"]))
ATTR_VALUE = st.recursive(ATTR_LEAF, lambda inner: st.lists(inner, max_size=4).map(tuple), max_leaves=12)
TYPES = st.builds(TensorType, st.lists(st.integers(0, 7), max_size=4).map(tuple),
                  st.sampled_from(["float32", "float64", "int32", "int64", "bool"]))
LOCS = st.one_of(st.none(), st.builds(SourceLoc, st.from_regex(r"[A-Za-z0-9_./\-]{0,12}[A-Za-z0-9_]\.py", fullmatch=True),
                                      st.integers(1, 10**6)))


@st.composite
def arbitrary_graphs(draw):
    names = draw(st.lists(VALUE_NAME, min_size=1, max_size=8, unique=True))
    n_in = draw(st.integers(0, len(names)))
    inputs = tuple(GraphInput(n, draw(TYPES), draw(st.sampled_from(["arg", "param", "state"])))
                   for n in names[:n_in])
    nodes = []
    for i, n in enumerate(names[n_in:]):
        args = draw(st.lists(st.sampled_from(names[:n_in + i]), max_size=3)) if n_in + i else []
        attrs = draw(st.dictionaries(IDENT, ATTR_VALUE, max_size=4))
        nodes.append(Node.make(n, draw(IDENT), args, draw(TYPES), attrs, draw(LOCS)))
    outs = tuple(draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)))
    return Graph(draw(IDENT), inputs, tuple(nodes), outs)


@settings(max_examples=100)
@given(arbitrary_graphs())
def test_print_parse_round_trip_of_arbitrary_attributes(g):
    text = g.to_text()
    back = parse(text)
    assert back == g, text
    assert back.to_text() == text


def test_round_trip_of_special_attribute_values():
    attrs = {"pos": math.inf, "neg": -math.inf, "nan": math.nan, "s": 'say "hi"\\n', "nested": [[1, [2.5, -math.inf]], []],
             "flag": True, "none": None, "big": 2**70, "tiny": 5e-324, "negzero": -0.0, "inf": "named like a number"}
    n = Node.make("0", "custom_op", ["x"], TensorType((2, 0)), attrs, SourceLoc("dir/model.py", 42))
    g = Graph("inference", (GraphInput("x", TensorType((2, 0), "float64"), "param"),), (n,), ("0",))
    text = g.to_text()
    assert "pos=inf" in text and "neg=-inf" in text and "nan=nan" in text and "# dir/model.py:42" in text
    back = parse(text)
    assert back == g
    a = back.nodes[0].attr
    assert math.isnan(a["nan"]) and a["pos"] == math.inf and a["nested"] == ((1, (2.5, -math.inf)), ())
    assert a["none"] is None and a["flag"] is True and a["big"] == 2**70 and a["tiny"] == 5e-324
    assert back.inputs[0].kind == "param"


def test_equality_notices_every_difference():
    n = Node.make("0", "exp", ["x"], TensorType((2,)), {"a": 1.0}, SourceLoc("m.py", 1))
    assert n == Node.make("0", "exp", ["x"], TensorType((2,)), {"a": 1.0}, SourceLoc("m.py", 1))
    for other in (Node.make("1", "exp", ["x"], TensorType((2,)), {"a": 1.0}, SourceLoc("m.py", 1)),
                  Node.make("0", "log", ["x"], TensorType((2,)), {"a": 1.0}, SourceLoc("m.py", 1)),
                  Node.make("0", "exp", ["y"], TensorType((2,)), {"a": 1.0}, SourceLoc("m.py", 1)),
                  Node.make("0", "exp", ["x"], TensorType((3,)), {"a": 1.0}, SourceLoc("m.py", 1)),
                  Node.make("0", "exp", ["x"], TensorType((2,)), {"a": 1}, SourceLoc("m.py", 1)),
                  Node.make("0", "exp", ["x"], TensorType((2,)), {"a": 1.0}, SourceLoc("m.py", 2))):
        assert n != other


@pytest.mark.parametrize("text, match", [
    ("graph g(%x: f32[2]) {\n  return (%x)\n", "expected"),
    ("graph g(%x: f99[2]) {\n  return (%x)\n}\n", "dtype"),
    ("graph g(weird %x: f32[2]) {\n  return (%x)\n}\n", "input kind"),
    ("graph g(%x: f32[2]) {\n  %0: f32[2] = exp(%x) {a=}\n  return (%0)\n}\n", "attribute value"),
    ("graph g(%x: f32[2]) {\n  return (%x)\n}\ngraph h() {\n}\n", "after the end"),
    ("graph g(%x: f32[2]) {\n  %0: f32[2] = exp(%x) $\n}\n", "unexpected character"),
])
def test_parse_errors_are_clear(text, match):
    with pytest.raises(ParseError, match=match):
        parse(text)


# ============================================================================ verifier


def _mlp(x, w):
    h = F.tanh(x @ w)
    return F.sum(h * h)


def _good_graph() -> Graph:
    return verify(trace(_mlp, np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)))


def _assert_points_at(msg: str, node: Node):
    marked = [line for line in msg.splitlines() if line.lstrip().startswith(">>")]
    assert len(marked) == 1, msg
    assert format_node(node) in marked[0], msg


def test_verifier_accepts_traced_graphs():
    g = _good_graph()
    assert verify(g) is g


def test_verifier_use_before_def():
    g = _good_graph()
    nodes = list(g.nodes)
    nodes[0], nodes[1] = nodes[1], nodes[0]  # the matmul now comes before... its user
    bad = g.replace(nodes=nodes)
    first_user = nodes[0]
    with pytest.raises(VerifyError, match="before it is defined") as info:
        verify(bad)
    _assert_points_at(str(info.value), first_user)


def test_verifier_duplicate_definition():
    g = _good_graph()
    n1 = g.nodes[1]
    dup = Node(g.nodes[0].name, n1.op, n1.inputs, n1.type, n1.attrs, n1.loc)
    bad = g.replace(nodes=(g.nodes[0], dup) + g.nodes[2:])
    with pytest.raises(VerifyError, match="defined twice") as info:
        verify(bad)
    _assert_points_at(str(info.value), dup)
    # a node may not shadow an input either
    shadow = Node("x", n1.op, n1.inputs, n1.type, n1.attrs, n1.loc)
    with pytest.raises(VerifyError, match="%x is defined twice"):
        verify(g.replace(nodes=(g.nodes[0], shadow) + g.nodes[2:]))


def test_verifier_unknown_op():
    g = _good_graph()
    n = g.nodes[1]
    bad_node = Node(n.name, "frobnicate", n.inputs, n.type, n.attrs, n.loc)
    with pytest.raises(VerifyError, match="unknown op 'frobnicate'") as info:
        verify(g.replace(nodes=(g.nodes[0], bad_node) + g.nodes[2:]))
    _assert_points_at(str(info.value), bad_node)


def test_verifier_type_mismatch_against_shape_rule():
    g = _good_graph()
    n = g.nodes[1]
    wrong = Node(n.name, n.op, n.inputs, TensorType((2, 5), n.type.dtype), n.attrs, n.loc)
    with pytest.raises(VerifyError, match=r"declared f32\[2, 5\] but tanh gives f32\[2, 4\]") as info:
        verify(g.replace(nodes=(g.nodes[0], wrong) + g.nodes[2:]))
    msg = str(info.value)
    _assert_points_at(msg, wrong)
    assert "test_ir.py:" in msg  # the node's source line is shown
    # a dtype mismatch and a broken rule (bad operand shapes) are caught too
    wrong_dt = Node(n.name, n.op, n.inputs, TensorType(n.type.shape, "float64"), n.attrs, n.loc)
    with pytest.raises(VerifyError, match="declared f64"):
        verify(g.replace(nodes=(g.nodes[0], wrong_dt) + g.nodes[2:]))
    m = g.nodes[0]
    swapped = Node(m.name, m.op, tuple(reversed(m.inputs)), m.type, m.attrs, m.loc)
    with pytest.raises(VerifyError, match="breaks the rule of matmul") as info:
        verify(g.replace(nodes=(swapped,) + g.nodes[1:]))
    _assert_points_at(str(info.value), swapped)


def test_verifier_bad_attributes():
    g = _good_graph()
    n = g.nodes[-1]  # the sum
    bad = Node.make(n.name, n.op, n.inputs, n.type, {**n.attr, "bogus": 1}, n.loc)
    with pytest.raises(VerifyError, match="bad inputs or attributes") as info:
        verify(g.replace(nodes=g.nodes[:-1] + (bad,)))
    _assert_points_at(str(info.value), bad)


def test_verifier_undefined_output():
    g = _good_graph()
    with pytest.raises(VerifyError, match="output %nowhere is not defined") as info:
        verify(g.replace(outputs=("nowhere",)))
    msg = str(info.value)
    marked = [line for line in msg.splitlines() if line.lstrip().startswith(">>")]
    assert marked == ["  >> return (%nowhere)"]
    assert format_node(g.nodes[-1]) in msg  # with the nodes just before it


def test_verifier_duplicate_input():
    g = _good_graph()
    with pytest.raises(VerifyError, match="declared twice"):
        verify(g.replace(inputs=g.inputs + (g.inputs[0],)))


def test_verifier_error_context_is_a_window():
    x = np.ones(3, np.float32)

    def long(x):
        for _ in range(12):
            x = F.exp(x)
        return x

    g = trace(long, x)
    n = g.nodes[6]
    bad = Node(n.name, "nope", n.inputs, n.type, n.attrs, n.loc)
    with pytest.raises(VerifyError) as info:
        verify(g.replace(nodes=g.nodes[:6] + (bad,) + g.nodes[7:]))
    lines = [line for line in str(info.value).splitlines()[1:]]
    assert len(lines) == 7  # three nodes either side
    assert format_node(g.nodes[3]) in lines[0] and format_node(g.nodes[9]) in lines[-1]


# ============================================================================ source locations


def test_nodes_record_the_users_source_line():
    def f(x):
        y = F.exp(x)  # line A
        return F.sum(y * 2.0)  # line B

    src, start = inspect.getsourcelines(f)
    line_a = start + next(i for i, s in enumerate(src) if "# line A" in s)
    g = trace(f, np.ones(3, np.float32))
    by_op = {n.op: n for n in g.nodes}
    assert by_op["exp"].loc == SourceLoc(by_op["exp"].loc.file, line_a)
    assert by_op["exp"].loc.file.endswith("test_ir.py")
    assert by_op["sum"].loc.line == line_a + 1 and by_op["mul"].loc.line == line_a + 1
    assert f"# {by_op['exp'].loc}" in g.to_text()
    assert parse(g.to_text()).nodes == g.nodes


def test_source_line_is_the_user_line_not_a_library_line():
    # composites expand into many primitives; all of them point at the caller's line
    def f(x):
        return F.layer_norm(F.softmax(x))

    src, start = inspect.getsourcelines(f)
    g = trace(f, np.ones((2, 3), np.float32))
    assert {n.loc.line for n in g.nodes} == {start + 1}
    assert all(n.loc.file.endswith("test_ir.py") for n in g.nodes)


def test_graph_types_and_users():
    g = _good_graph()
    assert g.input_names == ("x", "w")
    assert g.output_types == (TensorType((), "float32"),)
    users = g.users()
    assert [n.op for n in users["x"]] == ["matmul"]
    assert g.producer()[g.outputs[0]].op == "sum"
    with pytest.raises(ValueError, match="negative dimension"):
        TensorType((2, -1))
    with pytest.raises(TypeError, match="unsupported dtype"):
        TensorType((2,), "complex64")
    assert str(TensorType((2, 3), "int32")) == "i32[2, 3]" and TensorType((2, 3)).nbytes == 24


def test_traced_mlp_text_reads_well():
    w = tensor(np.ones((4, 3), np.float32), requires_grad=True)

    class Tiny:
        def named_parameters(self):
            return [("fc.weight", w)]

        def __call__(self, x):
            return F.relu(F.linear(x, w))

    text = trace(Tiny(), np.ones((2, 3), np.float32)).to_text()
    assert text.startswith("graph Tiny(%x: f32[2, 3], param %fc.weight: f32[4, 3]) {")
    assert "transpose(%fc.weight) {perm=[1, 0]}" in text and "matmul(%x, " in text
    assert text.rstrip().endswith("}")


def test_canonical_text_is_the_text_without_source_lines():
    """format_graph(locations=False) (the text that keys compiled code) is the text of the
    same graph with every location dropped: equal for graphs traced from different lines."""
    from neural_arch.compiler.ir import SourceLoc, format_graph
    g = trace(lambda x, w: F.softmax(x @ w, axis=-1).sum(), np.ones((2, 3), np.float32), np.ones((3, 4), np.float32))
    assert all(n.loc is not None for n in g.nodes)
    bare = g.replace(nodes=[Node(n.name, n.op, n.inputs, n.type, n.attrs, None) for n in g.nodes])
    moved = g.replace(nodes=[Node(n.name, n.op, n.inputs, n.type, n.attrs, SourceLoc("elsewhere.py", 7))
                             for n in g.nodes])
    assert format_graph(g, locations=False) == format_graph(bare) == format_graph(moved, locations=False)
    assert "#" not in format_graph(g, locations=False) and format_graph(g) != format_graph(moved)
    assert parse(format_graph(g, locations=False)) == bare

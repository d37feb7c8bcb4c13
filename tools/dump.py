"""`narch dump`: every stage of compiling a program, in text, JSON, Graphviz DOT, SVG or HTML.

    d = collect("gpt2-tiny", train=False)          # a zoo name, or path/to/file.py:fn with shapes
    d.graph("trace"), d.graph("final"), d.plan, d.program.kernels, d.memory
    render(d, ["trace"], "text")                   # the IR's own parseable text
    render(d, ["all"], "json")                     # everything, machine-readable
    render(d, ["final"], "dot")                    # the graph, fused kernels as clusters

Stages (``--stage``, repeatable or comma separated):

  trace        the traced graph
  passes       the graph after each pass of the pipeline, with timings
  pass:NAME    the graph after pass NAME (its first run; ``pass:3`` for the third pass)
  final        the graph after the whole pipeline (what codegen compiles)
  backward     the gradient graph of the model's loss (zoo) or of the function (scalar output)
  fusion       the fusion plan: kernels, the nodes each holds, every decision and its reason
  kernels      the compiled kernels (after codegen's own splits), their strategies
  memory       the arena plan: buffer offsets, sizes, lifetimes, planned peak vs naive
  llvm         LLVM IR before optimization (``--kernel`` picks one kernel)
  llvm-opt     LLVM IR after O3
  asm          the assembly
  all          every stage above
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np

from neural_arch.compiler.ir import Graph, GraphInput, Node, SourceLoc, TensorType

GRAPH_STAGES = ("trace", "final", "backward")
STAGES = ("trace", "passes", "final", "backward", "fusion", "kernels", "memory", "llvm", "llvm-opt", "asm")
FORMATS = ("text", "json", "dot", "svg", "html")


class DumpError(Exception):
    """A user-facing error: printed as one line by the CLI."""


# ----------------------------------------------------------------------------- the target


@dataclass
class Target:
    label: str
    graph: Graph
    inputs: list
    kind: str                     # "forward" | "train" | "loss" | "function" | "gradient"
    backward: Graph | None = None
    backward_note: str = ""
    options: dict = field(default_factory=dict)  # Program options the target runs with (bench:)


def load_user_function(spec: str):
    import importlib.util
    path, _, fname = spec.rpartition(":")
    if not path or not fname:
        raise DumpError(f"expected a zoo name or path/to/file.py:function, got {spec!r}")
    if not os.path.isfile(path):
        raise DumpError(f"no such file: {path}")
    modspec = importlib.util.spec_from_file_location("narch_user_module", path)
    if modspec is None:
        raise DumpError(f"cannot load {path} (not a Python file?)")
    mod = importlib.util.module_from_spec(modspec)
    # as `python path/to/file.py` runs it: its folder is importable (its own helper modules) and
    # the module is in sys.modules (dataclasses and pickle look their module up there)
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[modspec.name] = mod
    modspec.loader.exec_module(mod)
    fn = getattr(mod, fname, None)
    if fn is None:
        raise DumpError(f"{path} has no function {fname!r}")
    if not callable(fn):
        raise DumpError(f"{path}: {fname!r} is not a function (its value is of type {type(fn).__name__})")
    return fn


def parse_shape(text: str) -> TensorType:
    """``4x8``, ``4x8:int64``, ``scalar`` or ``scalar:int64``."""
    dtype, dims_text = "float32", text
    if ":" in text:
        dims_text, dtype = text.split(":", 1)
    try:
        if dims_text in ("", "scalar"):
            dims = ()
        else:
            parts = dims_text.split("x")
            if not all(p.isdigit() for p in parts):  # (not "4xx8", "4x8x", " 4 x 8", "-4")
                raise ValueError("dimensions are non-negative integers joined by 'x'")
            dims = tuple(int(p) for p in parts)
        return TensorType(dims, dtype)
    except (ValueError, TypeError) as e:
        raise DumpError(f"bad --shape {text!r}: {e} (examples: 4x8, 4x8:int64, scalar)") from None


def example_array(t: TensorType, rng: np.random.Generator) -> np.ndarray:
    if t.dtype == "bool":
        return rng.integers(0, 2, t.shape).astype(bool)
    if t.dtype.startswith("int"):  # indices valid for any axis of size >= 2
        return rng.integers(0, 2, t.shape).astype(t.dtype)
    return rng.standard_normal(t.shape).astype(t.dtype)


def resolve_target(target: str, train: bool = False, shapes=(), grad: bool = False) -> Target:
    from neural_arch.tools import zoo
    if (target.startswith("bench:") or target in zoo.ZOO) and (shapes or grad):
        hint = "; its gradient graph is the `backward` stage (or use --train for its whole training step)"
        raise DumpError(f"{'--shape' if shapes else '--grad'} is for path/to/file.py:function targets; "
                        f"{target} has its own example batch" + (hint if target in zoo.ZOO and not shapes else ""))
    if target.startswith("bench:"):  # the exact training step `narch bench train` times
        from neural_arch.tools.bench.train import bench_step_graph
        case = target[len("bench:"):]
        try:
            g, inputs, options = bench_step_graph(case)
        except KeyError as e:
            raise DumpError(str(e.args[0])) from None
        return Target(f"{target} (training step, AdamW)", g, inputs, "train", options=options)
    if target in zoo.ZOO:
        zm = zoo.make(target)
        ex = zoo.train_example(zm, target) if train else zoo.forward_example(zm, target)
        loss = zoo.loss_example(zoo.make(target), target)
        return Target(target + (" (training step)" if train else ""), ex.graph, ex.inputs, ex.kind,
                      zoo.backward_graph(loss), "the gradient graph of the model's loss w.r.t. its parameters")
    if ":" not in target or not target.rpartition(":")[0].endswith(".py"):
        raise DumpError(f"unknown target {target!r}: a zoo model ({', '.join(zoo.ZOO)}) or path/to/file.py:function")
    if train:
        raise DumpError("--train needs a zoo model (the training step needs a model, a loss and an optimizer)")
    from neural_arch.compiler import grad as grad_fn, trace
    from neural_arch.compiler.autodiff import AutodiffError, autodiff
    fn = load_user_function(target)
    types = [parse_shape(s) for s in shapes]
    if grad:
        fn = grad_fn(fn, argnums=tuple(range(len(types))))
    g = trace(fn, *types)
    rng = np.random.default_rng(0)
    inputs = [example_array(i.type, rng) for i in g.inputs]
    t = Target(target, g, inputs, "gradient" if grad else "function")
    try:
        wrt = [i.name for i in g.inputs if i.type.dtype.startswith("float")]
        t.backward = autodiff(g, wrt, with_value=True, name=g.name + "_backward")
        t.backward_note = "the gradient graph w.r.t. every float input"
    except AutodiffError as e:
        t.backward_note = f"no backward graph: {e}"
    return t


# ----------------------------------------------------------------------------- collecting


@dataclass
class Dump:
    target: Target
    pipeline: object                     # PipelineResult
    _program: object = None
    _plan: object = None
    _llvm_opt: str | None = None
    _asm: str | None = None
    compile_error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def traced(self) -> Graph:
        return self.target.graph

    @property
    def final(self) -> Graph:
        return self.pipeline.graph

    def graph(self, stage: str) -> Graph:
        if stage == "trace":
            return self.traced
        if stage == "final":
            return self.final
        if stage == "backward":
            if self.target.backward is None:
                raise DumpError(self.target.backward_note or "no backward graph")
            return self.target.backward
        if stage.startswith("pass:"):
            return self.pass_stage(stage[5:])[1]
        raise DumpError(f"stage {stage!r} is not a graph")

    def pass_stage(self, which: str) -> tuple[str, Graph]:
        stages = self.pipeline.stages[1:]
        if which.isdigit():
            k = int(which)
            if not 1 <= k <= len(stages):
                raise DumpError(f"pass:{k}: the pipeline has passes 1..{len(stages)}")
            return stages[k - 1]
        for name, g in stages:
            if name == which:
                return name, g
        raise DumpError(f"pass:{which}: no such pass in the pipeline ({', '.join(n for n, _ in stages)})")

    @property
    def plan(self):
        if self._plan is None:
            from neural_arch.compiler.passes.fusion import fuse
            self._plan = fuse(self.final)
        return self._plan

    @property
    def program(self):
        if self._program is None:
            from neural_arch.runtime.program import Program
            self._program = Program(self.final, options={"passes": False, **self.target.options})
        return self._program

    @property
    def memory(self):
        return self.program.memory_plan

    def memory_steps(self) -> list[int]:
        """The kernel index of each memory-plan step (a kernel writing n planned values is n
        steps; see Program._plan_arena)."""
        plan = self.memory
        planned = set(plan.buffers) if plan is not None else set()
        out = []
        for k, kern in enumerate(self.program.kernels):
            writes = [w for w in dict.fromkeys(tuple(kern.outputs) + tuple(kern.buffers)) if w in planned]
            out += [k] * max(1, len(writes))
        return out

    def kernel_names(self) -> list[str]:
        return [k.name for k in self.program.kernels]

    def select_kernel(self, which: str | None) -> str | None:
        if which is None:
            return None
        names = self.kernel_names()
        if which.isdigit():
            k = int(which)
            if not 0 <= k < len(names):
                raise DumpError(f"--kernel {k}: the program has kernels 0..{len(names) - 1}")
            return names[k]
        if which in names:
            return which
        pref = [n for n in names if n.split(".")[0] == which]
        if len(pref) == 1:
            return pref[0]
        raise DumpError(f"--kernel {which!r}: no such kernel (kernels: {', '.join(names)})")

    def llvm_ir(self) -> str:
        return self.program.module.llvm_ir

    def llvm_ir_optimized(self) -> str:
        if self._llvm_opt is None:
            p = self.program
            self._llvm_opt = str(p.native.optimized(p.module))
        return self._llvm_opt

    def assembly(self) -> str:
        if self._asm is None:
            from neural_arch.runtime import jit
            p = self.program
            self._asm = jit.emit_assembly(p.native.optimized(p.module))
        return self._asm


def collect(target: str, train: bool = False, shapes=(), grad: bool = False, pipeline=None) -> Dump:
    from neural_arch.compiler.passes import DEFAULT_PIPELINE, run_pipeline
    t = resolve_target(target, train, shapes, grad)
    res = run_pipeline(t.graph, list(pipeline or DEFAULT_PIPELINE), verify_each=True)
    return Dump(t, res)


def expand_stages(stages) -> list[str]:
    out = []
    for s in stages or ["trace"]:
        for part in s.split(","):
            part = part.strip()
            if not part:
                continue
            if part == "all":
                out += [x for x in STAGES if x not in out]
            elif part in STAGES or part.startswith("pass:"):
                out.append(part)
            else:
                raise DumpError(f"unknown stage {part!r} (stages: {', '.join(STAGES)}, pass:NAME, all)")
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- LLVM views


def llvm_functions(text: str) -> dict[str, str]:
    """Every ``define`` of a module's text, by function name."""
    out, lines, cur, name = {}, text.splitlines(), None, None
    head = re.compile(r'^define [^@]*@("(?:[^"\\]|\\.)*"|[A-Za-z0-9_.$-]+)\(')
    for line in lines:
        if cur is None:
            m = head.match(line)
            if m:
                name = m.group(1).strip('"')
                cur = [line]
        else:
            cur.append(line)
            if line == "}":
                out[name] = "\n".join(cur) + "\n"
                cur = None
    return out


def kernel_llvm(text: str, kernel: str) -> str:
    """The functions that make up one kernel (its entry and ``kernel.*`` helpers)."""
    fns = llvm_functions(text)
    parts = [body for n, body in fns.items() if n == kernel or n.startswith(kernel + ".")]
    if not parts:
        raise DumpError(f"kernel {kernel} has no function in this module")
    return "\n".join(parts)


def asm_functions(text: str) -> dict[str, str]:
    out, cur, name = {}, None, None
    for line in text.splitlines():
        m = re.match(r'^\s*\.type\s+"?([^",]+)"?\s*,\s*@function', line)
        if m:
            name, cur = m.group(1), [line]
            continue
        if cur is not None:
            cur.append(line)
            if re.match(r'^\s*\.size\s+"?' + re.escape(name) + r'"?\s*,', line):
                out[name] = "\n".join(cur) + "\n"
                cur = None
    return out


def kernel_asm(text: str, kernel: str) -> str:
    fns = asm_functions(text)
    parts = [body for n, body in fns.items() if n == kernel or n.startswith(kernel + ".")]
    if not parts:
        raise DumpError(f"kernel {kernel} has no function in the assembly")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- JSON


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return {"float": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
    return v


def _from_jsonable(v):
    if isinstance(v, list):
        return tuple(_from_jsonable(x) for x in v)
    if isinstance(v, dict) and set(v) == {"float"}:
        return float(v["float"])
    return v


def graph_json(g: Graph) -> dict:
    return {
        "name": g.name,
        "inputs": [{"name": i.name, "kind": i.kind, "shape": list(i.type.shape), "dtype": i.type.dtype}
                   for i in g.inputs],
        "nodes": [{"name": n.name, "op": n.op, "inputs": list(n.inputs), "shape": list(n.type.shape),
                   "dtype": n.type.dtype, "attrs": {k: _jsonable(v) for k, v in n.attrs},
                   "loc": None if n.loc is None else {"file": n.loc.file, "line": n.loc.line}}
                  for n in g.nodes],
        "outputs": list(g.outputs),
    }


def graph_from_json(d: dict) -> Graph:
    """The inverse of :func:`graph_json` (the JSON form is complete)."""
    inputs = tuple(GraphInput(i["name"], TensorType(tuple(i["shape"]), i["dtype"]), i["kind"]) for i in d["inputs"])
    nodes = tuple(Node.make(n["name"], n["op"], n["inputs"], TensorType(tuple(n["shape"]), n["dtype"]),
                            {k: _from_jsonable(v) for k, v in n["attrs"].items()},
                            SourceLoc(n["loc"]["file"], n["loc"]["line"]) if n["loc"] else None)
                  for n in d["nodes"])
    return Graph(d["name"], inputs, nodes, tuple(d["outputs"]))


def fusion_json(d: Dump) -> dict:
    plan = d.plan
    return {
        "kernel_count": plan.kernel_count,
        "guards": list(plan.guards),
        "kernels": [{"id": g.id, "kind": g.kind, "domain": list(g.domain), "axes": list(g.axes),
                     "nodes": list(g.nodes), "inputs": list(g.inputs), "outputs": list(g.outputs),
                     "inlined": list(g.inlined)} for g in plan.groups],
        "decisions": [{"node": x.node, "fused": x.taken, "reason": x.reason} for x in plan.decisions],
    }


def kernels_json(d: Dump) -> list:
    return [{"index": k, "name": kern.name, "strategy": kern.strategy, "tasks": kern.tasks,
             "nodes": [n.name for n in kern.nodes], "ops": [n.op for n in kern.nodes],
             "inputs": list(kern.inputs), "outputs": list(kern.outputs), "buffers": list(kern.buffers),
             "workspace_bytes": kern.workspace_bytes, "note": kern.note}
            for k, kern in enumerate(d.program.kernels)]


def memory_json(d: Dump) -> dict:
    plan = d.memory
    if plan is None:
        return {"arena_bytes": 0, "naive_bytes": 0, "buffers": [], "step_kernel": d.memory_steps()}
    return {"arena_bytes": plan.arena_bytes, "naive_bytes": plan.naive_bytes, "step_kernel": d.memory_steps(),
            "buffers": [{"name": b.name, "nbytes": b.nbytes, "offset": b.offset, "start": b.start, "end": b.end,
                         "inplace_of": b.inplace_of}
                        for b in sorted(plan.buffers.values(), key=lambda b: (b.offset, b.start))]}


def to_json(d: Dump, stages, kernel: str | None = None) -> dict:
    out = {"target": d.target.label, "kind": d.target.kind, "stages": {}}
    for s in stages:
        if s in GRAPH_STAGES or s.startswith("pass:"):
            g = d.graph(s)
            out["stages"][s] = {"graph": graph_json(g), "text": g.to_text()}
        elif s == "passes":
            out["stages"][s] = [{"pass": r.name, "ms": r.seconds * 1e3, "changed": r.changed,
                                 "nodes_before": r.nodes_before, "nodes_after": r.nodes_after,
                                 "graph": graph_json(g), "text": g.to_text()}
                                for r, (_, g) in zip(d.pipeline.records, d.pipeline.stages[1:])]
        elif s == "fusion":
            out["stages"][s] = fusion_json(d)
        elif s == "kernels":
            out["stages"][s] = kernels_json(d)
        elif s == "memory":
            out["stages"][s] = memory_json(d)
        elif s in ("llvm", "llvm-opt", "asm"):
            out["stages"][s] = {"kernel": kernel, "text": stage_text(d, s, kernel)}
    return out


# ----------------------------------------------------------------------------- text


def stage_text(d: Dump, stage: str, kernel: str | None = None) -> str:
    if stage in GRAPH_STAGES or stage.startswith("pass:"):
        return d.graph(stage).to_text()
    if stage == "passes":
        parts = []
        for r, (name, g) in zip(d.pipeline.records, d.pipeline.stages[1:]):
            parts.append(f"// ----- after {name}: {r.seconds * 1e3:.2f} ms, {r.nodes_before} -> {r.nodes_after} "
                         f"nodes{'' if r.changed else ' (unchanged)'} -----\n{g.to_text()}")
        return "".join(parts) + "// " + d.pipeline.timing_table().replace("\n", "\n// ") + "\n"
    if stage == "fusion":
        return d.plan.explain() + "\n"
    if stage == "kernels":
        lines = [f"{len(d.program.kernels)} compiled kernels (the fusion plan's {d.plan.kernel_count}, "
                 f"after codegen's splits)"]
        for k, kern in enumerate(d.program.kernels):
            lines.append(f"{k:3d} {kern}")
            lines.append(f"      reads {', '.join('%' + v for v in kern.inputs) or '-'}; writes "
                         f"{', '.join('%' + v for v in kern.outputs) or '-'}"
                         + (f"; note: {kern.note}" if kern.note else ""))
        return "\n".join(lines) + "\n"
    if stage == "memory":
        plan = d.memory
        if plan is None:
            return "no intermediate buffers: every value lives inside a kernel or is an input/output\n"
        steps = d.memory_steps()
        lines = [plan.report().splitlines()[0], "  buffer           offset        bytes  lifetime (steps, kernels)"]
        for b in sorted(plan.buffers.values(), key=lambda b: (b.offset, b.start)):
            ka, kb = steps[b.start] if b.start < len(steps) else "?", steps[b.end] if b.end < len(steps) else "?"
            lines.append(f"  %{b.name:<14} {b.offset:>8,} {b.nbytes:>12,}  steps {b.start}..{b.end} "
                         f"(k{ka}..k{kb})" + (f"  in place of %{b.inplace_of}" if b.inplace_of else ""))
        return "\n".join(lines) + "\n"
    if stage in ("llvm", "llvm-opt", "asm"):
        return _ending_in_newline(_llvm_stage_text(d, stage, kernel))
    raise DumpError(f"unknown stage {stage!r}")


def same_as_note(kernel: str, same_as: str, comment: str = ";") -> str:
    return f"{comment} {kernel} runs the function of {same_as} (alike but for its values' names), with its own buffers\n"


def _llvm_stage_text(d: Dump, stage: str, kernel: str | None) -> str:
    same_as = {k.name: k.same_as for k in d.program.kernels} if kernel else {}
    if same_as.get(kernel):  # a kernel alike another but for its values runs that one's function
        return (same_as_note(kernel, same_as[kernel], "#" if stage == "asm" else ";")
                + _llvm_stage_text(d, stage, same_as[kernel]))
    if stage == "llvm":
        return kernel_llvm(d.llvm_ir(), kernel) if kernel else d.llvm_ir()
    if stage == "llvm-opt":
        return kernel_llvm(d.llvm_ir_optimized(), kernel) if kernel else d.llvm_ir_optimized()
    return kernel_asm(d.assembly(), kernel) if kernel else d.assembly()


def _ending_in_newline(text: str) -> str:
    """LLVM's module text ends without one: the next stage's header would join its last line."""
    return text if text.endswith("\n") else text + "\n"


def to_text(d: Dump, stages, kernel: str | None = None) -> str:
    if len(stages) == 1:
        return stage_text(d, stages[0], kernel)
    return "".join(f"// ===== {s} =====\n{stage_text(d, s, kernel)}" for s in stages)


# ----------------------------------------------------------------------------- DOT / SVG

PALETTE = ("#cfe2ff", "#d1f2d9", "#ffe5b4", "#f8d7da", "#e2d9f3", "#d2f4f4", "#fff3b0", "#f4d9ec",
           "#dde7c7", "#e0e0e0", "#c6def1", "#fbd3c4")
BORDER = ("#3d6fb6", "#2f8a4a", "#c27c0e", "#b02a37", "#6f42c1", "#1b8a8a", "#a88b00", "#a3367a",
          "#5b7a2a", "#666666", "#2d6a9f", "#c0502b")


def kernel_colour(k: int) -> tuple[str, str]:
    return PALETTE[k % len(PALETTE)], BORDER[k % len(BORDER)]


def _q(s: str) -> str:
    """A DOT string; a newline becomes DOT's centred line break."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def node_id(name: str) -> str:
    return "v_" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def to_dot(g: Graph, plan=None, memory=None) -> str:
    """Graphviz DOT of a graph; with a fusion plan, each kernel is a coloured cluster."""
    buf = memory.buffers if memory is not None else {}
    lines = [f"digraph {_q(g.name)} {{",
             '  graph [rankdir=TB, fontname="Helvetica", fontsize=10, nodesep=0.25, ranksep=0.35, newrank=true];',
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=9, fillcolor="#ffffff",'
             ' height=0.3, margin="0.08,0.03"];',
             '  edge [color="#888888", arrowsize=0.5];']
    if len(g.nodes) > 250:  # bound dot's crossing minimisation and ranking: minutes -> seconds
        lines.append("  graph [mclimit=0.3, nslimit=2, nslimit1=2];")

    def label(n: Node) -> str:
        return f"%{n.name} {n.op}\n{n.type}"

    def tip(n: Node) -> str:
        extra = f"; buffer offset {buf[n.name].offset} ({buf[n.name].nbytes} B)" if n.name in buf else ""
        return f"%{n.name} = {n.op} {n.type} at {n.loc or 'unknown'}{extra}"
    for i in g.inputs:
        lab = _q(f"%{i.name}\n{i.kind} {i.type}")
        tp = _q(f"{i.kind} input %{i.name}: {i.type}")
        lines.append(f"  {_q(i.name)} [id={_q(node_id(i.name))}, label={lab}, "
                     f'shape=ellipse, fillcolor="#f1f1f1", tooltip={tp}];')
    in_kernel = plan.group_of if plan is not None else {}
    guards = set(plan.guards) if plan is not None else set()
    if plan is not None:
        for grp in plan.groups:
            fill, border = kernel_colour(grp.id)
            lines.append(f"  subgraph cluster_k{grp.id} {{")
            lines.append(f"    label={_q(f'kernel {grp.id}: {grp.kind} {list(grp.domain)}')}; style=\"rounded,filled\"; "
                         f"fillcolor={_q(fill)}; color={_q(border)}; fontcolor={_q(border)}; "
                         f"id={_q(f'cluster_k{grp.id}')};")
            prod = g.producer()
            for name in grp.nodes:
                n = prod[name]
                lines.append(f"    {_q(name)} [id={_q(node_id(name))}, label={_q(label(n))}, tooltip={_q(tip(n))}, "
                             f"color={_q(border)}];")
            lines.append("  }")
    # a source (fill, iota, constant) read by several nodes is drawn once per reader, beside
    # it: one shared fill would otherwise pull edges across the whole graph
    users: dict = {}
    for n in g.nodes:
        for i in dict.fromkeys(n.inputs):
            users.setdefault(i, []).append(n.name)
    copies = {n.name for n in g.nodes if not n.inputs and n.name not in in_kernel and n.name not in g.outputs
              and len(users.get(n.name, ())) > 1}
    for n in g.nodes:
        if n.name in in_kernel:
            continue
        style = '"rounded,dashed"' if plan is not None else '"rounded,filled"'
        extra = ' fillcolor="#fff8e1",' if n.name in guards else ""
        ids = [(n.name, node_id(n.name))]
        if n.name in copies:  # the first copy keeps the node's id; the others add ~k
            ids = [(f"{n.name}~{k}", node_id(n.name) + (f"~{k}" if k else "")) for k in range(len(users[n.name]))]
        for key, nid in ids:
            lines.append(f"  {_q(key)} [id={_q(nid)}, label={_q(label(n))}, tooltip={_q(tip(n))}, "
                         f"style={style},{extra} fontcolor=\"#555555\"];")
    for n in g.nodes:
        for i in dict.fromkeys(n.inputs):
            src = f"{i}~{users[i].index(n.name)}" if i in copies else i
            lines.append(f"  {_q(src)} -> {_q(n.name)};")
    for k, o in enumerate(dict.fromkeys(g.outputs)):
        lines.append(f"  {_q('out:' + o)} [label={_q(f'output {k}')}, shape=plaintext, style=\"\", "
                     f"id={_q('out_' + str(k))}];")
        lines.append(f"  {_q(o)} -> {_q('out:' + o)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def have_dot() -> bool:
    return shutil.which("dot") is not None


DOT_MISSING = "the `dot` program (Graphviz) is not installed: apt-get install graphviz"


def dot_to_svg(dot_text: str, timeout: float = 300) -> str:
    exe = shutil.which("dot")
    if exe is None:
        raise DumpError(DOT_MISSING)
    r = subprocess.run([exe, "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise DumpError(f"dot failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    svg = r.stdout
    return svg[svg.index("<svg"):]


def graph_for_drawing(d: Dump, stages) -> tuple[Graph, object, object]:
    """The graph a DOT/SVG dump draws: the first graph stage asked for (default: the final
    graph, with its fusion plan as clusters and buffer offsets in tooltips)."""
    gs = [s for s in stages if s in GRAPH_STAGES or s.startswith("pass:")]
    stage = gs[0] if gs else "final"
    if stage == "final":
        return d.final, d.plan, d.memory
    return d.graph(stage), None, None


def stages_for(d: Dump, stages) -> list[str]:
    """The stages to dump: ``all`` leaves out the backward graph of a target that has none (a
    function whose output is not a float scalar); asking for ``backward`` by name is an error."""
    out = expand_stages(stages)
    named = {p.strip() for s in stages or () for p in s.split(",")}
    if d.target.backward is None and "backward" in out and "backward" not in named:
        out.remove("backward")
    return out


def render(d: Dump, stages, fmt: str, kernel: str | None = None, layout: str = "auto") -> str:
    stages = stages_for(d, stages)
    if fmt == "text":
        return to_text(d, stages, kernel)
    if fmt == "json":
        return json.dumps(to_json(d, stages, kernel), indent=1) + "\n"
    if fmt == "dot":
        return to_dot(*graph_for_drawing(d, stages))
    if fmt == "svg":
        return dot_to_svg(to_dot(*graph_for_drawing(d, stages)))
    if fmt == "html":
        from neural_arch.tools.report import render_html
        return render_html(d, kernel=kernel, layout=layout)
    raise DumpError(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")

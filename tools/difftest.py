"""`narch difftest`: differential checks of the compiler, as a table; reproducers for failures.

Suites:
  ops      every primitive in the registry (compiler/ops): cases drawn from its test spec,
           forward and backward (the VJP graph), compiled vs the interpreter, and vs torch
           for the ops with a torch counterpart (when torch is installed)
  models   each zoo model (tools/zoo.py): forward and whole training step, compiled vs
           the interpreter
  random   random valid graphs (tools/randgraph.py): forward outputs and gradients in one
           program, compiled vs the interpreter; a failure is shrunk by the minimizer
  passes   random subsets and orders of the optional passes on random graphs: the
           transformed graph (interpreted, and compiled without further passes) vs the
           unoptimized graph interpreted

A case compares every output: max absolute error, max relative error, and passes when
``|got - want| <= atol + rtol * |want|`` elementwise (NaN equals NaN; integer and bool
outputs must be equal).  Each failure writes a reproducer directory (graph.txt: the IR;
inputs.npz; case.json: what is compared, the pipeline and tolerances) and prints
``narch difftest --replay DIR``.

The minimizer (delta debugging over nodes) replaces a set of nodes by graph inputs of their
types, fed with the values those nodes had, drops dead code and keeps the change when the
comparison still fails; it repeats with halving chunk sizes down to single nodes.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field

import numpy as np

from neural_arch.compiler.ir import Graph, GraphInput, parse

SUITES = ("ops", "models", "random", "passes")


# ----------------------------------------------------------------------------- cases and results


@dataclass
class Case:
    suite: str
    name: str
    graph: Graph
    inputs: list
    check: str                      # "compiled" | "passes" | "passes-compiled" | "torch"
    rtol: float
    atol: float
    pipeline: list | None = None    # passes run on the graph first (passes suite)
    torch_op: str | None = None     # the primitive compared against torch
    info: dict = field(default_factory=dict)
    oracle: bool = False            # a miss may be settled against the float64 interpreter (below)

    @property
    def what(self) -> str:
        return {"compiled": "compiled vs interpreter", "torch": "compiled vs torch",
                "passes": "passes vs unoptimized", "passes-compiled": "passes+compiled vs unoptimized"}[self.check]


@dataclass
class Result:
    case: Case
    max_abs: float
    max_rel: float
    ok: bool
    error: str | None = None
    worst: str = ""                 # which output has the worst error
    seconds: float = 0.0
    repro: str | None = None
    minimized: str | None = None    # "n -> m nodes"
    settled: bool = False           # passed only against the float64 oracle


def compare(got, want, rtol: float, atol: float, names=None) -> tuple[float, float, bool, str]:
    """(max abs error, max rel error, all within tolerance, name of the worst output)."""
    if len(got) != len(want):
        raise AssertionError(f"{len(got)} outputs, expected {len(want)}")
    max_abs = max_rel = 0.0
    ok, worst, worst_excess = True, "", -math.inf
    for k, (g, w) in enumerate(zip(got, want)):
        name = names[k] if names else str(k)
        g, w = np.asarray(g), np.asarray(w)
        if g.shape != w.shape:
            raise AssertionError(f"output %{name}: shape {g.shape}, expected {w.shape}")
        if g.dtype.kind != w.dtype.kind and not (g.dtype.kind in "fc" and w.dtype.kind in "fc"):
            raise AssertionError(f"output %{name}: dtype {g.dtype}, expected {w.dtype}")
        if g.size == 0:
            continue
        if w.dtype.kind in "biu":
            bad = g != w
            d = np.abs(g.astype(np.float64) - w.astype(np.float64))
            a = float(d.max())
            r = float(np.max(np.where(w != 0, d / np.abs(np.where(w != 0, w, 1)), np.where(d > 0, np.inf, 0.0))))
            excess = float(bad.sum())
            this_ok = not bad.any()
        else:
            g64, w64 = g.astype(np.float64), w.astype(np.float64)
            same = (g64 == w64) | (np.isnan(g64) & np.isnan(w64))
            with np.errstate(invalid="ignore", over="ignore"):
                d = np.where(same, 0.0, np.abs(g64 - w64))
                d = np.where(np.isnan(d), np.inf, d)
                # relative to |want|, floored at atol: a value near zero (which passes on atol)
                # does not report an error of 1e300
                floor = atol if atol > 0 else np.finfo(np.float64).tiny
                r_all = np.where(same, 0.0, d / np.maximum(np.abs(w64), floor))
                a, r = float(d.max()), float(r_all.max())
                excess_all = d - (atol + rtol * np.abs(np.where(np.isfinite(w64), w64, 0.0)))
                excess = float(excess_all.max())
            this_ok = excess <= 0
        if a > max_abs or not this_ok:
            max_abs, max_rel = max(max_abs, a), max(max_rel, r)
        else:
            max_rel = max(max_rel, r)
        if not this_ok and excess > worst_excess:
            worst, worst_excess = name, excess
        ok &= this_ok
    return max_abs, max_rel, ok, worst


def _program(graph: Graph, passes: bool = True):
    from neural_arch.runtime.program import Program
    return Program(graph, options=None if passes else {"passes": False})


def _c(arrays):
    return [np.require(a, requirements="C") for a in arrays]


def _interpret(graph, inputs):
    from neural_arch.runtime.interpreter import interpret
    return interpret(graph, inputs)


GUARD_BYTES = 1024
SENTINEL = 0xA5


def run_guarded(prog, inputs) -> list:
    """Call a Program with every computed output written into the front of a larger buffer
    whose tail holds a sentinel pattern: a kernel that writes past the end of an output is
    caught here, deterministically, instead of corrupting the heap silently."""
    outs, guards = [], []
    for _, name, shape, dtype in prog._out_alloc:
        t = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64))
        raw = np.full(n * t.itemsize + GUARD_BYTES, SENTINEL, np.uint8)
        outs.append(raw[:n * t.itemsize].view(t).reshape(shape))
        guards.append((name, raw, n * t.itemsize))
    results = prog(*inputs, out=outs)
    for name, raw, used in guards:
        tail = np.nonzero(raw[used:] != SENTINEL)[0]
        if tail.size:
            raise AssertionError(f"compiled code wrote past the end of output %{name}: {tail.size} of the "
                                 f"{GUARD_BYTES} bytes after it changed (the last {tail.max() + 1} bytes past its end)")
    return results


def evaluate(case: Case) -> tuple[list, list]:
    """(got, want) of a case."""
    if case.check == "compiled":
        return run_guarded(_program(case.graph), _c(case.inputs)), _interpret(case.graph, case.inputs)
    if case.check == "torch":
        return run_guarded(_program(case.graph), _c(case.inputs)), [torch_reference(case.graph, case.inputs)]
    from neural_arch.compiler.passes import run_pipeline
    optimized = run_pipeline(case.graph, list(case.pipeline or []), verify_each=True).graph
    want = _interpret(case.graph, case.inputs)
    if case.check == "passes":
        return _interpret(optimized, case.inputs), want
    if case.check == "passes-compiled":
        return run_guarded(_program(optimized, passes=False), _c(case.inputs)), want
    raise ValueError(f"unknown check {case.check!r}")


ULPS = 8  # the cancellation allowance: float32 ulps of the largest value an output depends on


def dependency_scales(graph: Graph, values: dict) -> dict:
    """Per output: the largest magnitude among the float values it depends on (itself, its
    inputs, transitively), from float64 ``values`` of every input and node."""
    scale = {}
    for i in graph.inputs:
        v = np.asarray(values[i.name])
        scale[i.name] = float(np.max(np.abs(v), initial=0.0)) if v.dtype.kind == "f" and v.size else 0.0
    for n in graph.nodes:
        v = np.asarray(values[n.name])
        own = float(np.nanmax(np.abs(v), initial=0.0)) if v.dtype.kind == "f" and v.size else 0.0
        scale[n.name] = max([own] + [scale[i] for i in n.inputs])
    return {o: scale[o] for o in graph.outputs}


def within_float32_noise(case: Case, got, want) -> bool:
    """Is every element of ``got`` within tolerance of the float64 truth, after allowing for
    the float32 interpreter's own distance from it and for cancellation (``ULPS`` float32
    ulps of the largest value the output depends on)?  Two correct float32 evaluation
    orders can differ by more than any fixed tolerance when large values cancel."""
    from neural_arch.runtime.interpreter import interpret
    gr = case.graph
    everything = interpret(gr.replace(outputs=[n.name for n in gr.nodes] or gr.outputs), case.inputs, oracle=True)
    values = dict(zip(gr.input_names, case.inputs))
    values.update(zip([n.name for n in gr.nodes], everything))
    truth = [values[o] for o in gr.outputs]
    scales = dependency_scales(gr, values)
    eps32 = float(np.finfo(np.float32).eps)
    for g, w, t, o in zip(got, want, truth, gr.outputs):
        g, w, t = np.asarray(g), np.asarray(w), np.asarray(t)
        if g.dtype.kind != "f" or g.size == 0:
            if g.dtype.kind != "f" and not np.array_equal(g, w):
                return False
            continue
        g64, w64, t64 = g.astype(np.float64), w.astype(np.float64), t.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            err_c = np.where(np.isnan(g64) & np.isnan(t64), 0.0, np.abs(g64 - t64))
            err_i = np.where(np.isnan(w64) & np.isnan(t64), 0.0, np.abs(w64 - t64))
            bound = case.atol + case.rtol * np.abs(t64) + err_i + ULPS * eps32 * scales[o]
            if not np.all(err_c <= bound):
                return False
    return True


def run_case(case: Case) -> Result:
    t0 = time.perf_counter()
    try:
        got, want = evaluate(case)
        a, r, ok, worst = compare(got, want, case.rtol, case.atol, list(case.graph.outputs))
        settled = False
        if not ok and case.oracle and case.check in ("compiled", "passes", "passes-compiled"):
            ok = settled = within_float32_noise(case, got, want)
        return Result(case, a, r, ok, worst=worst, seconds=time.perf_counter() - t0, settled=settled)
    except Exception as e:  # a crash of the compiler under test is a failing case, reported
        msg = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
        return Result(case, math.nan, math.nan, False, error=(msg[-1] if msg else type(e).__name__)[:300],
                      seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- torch


def _torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


def _torch_fns():
    torch = _torch()
    if torch is None:
        return {}
    T = torch
    return {
        "neg": lambda a, x: -x, "exp": lambda a, x: T.exp(x), "log": lambda a, x: T.log(x),
        "sqrt": lambda a, x: T.sqrt(x), "rsqrt": lambda a, x: T.rsqrt(x), "tanh": lambda a, x: T.tanh(x),
        "sigmoid": lambda a, x: T.sigmoid(x), "relu": lambda a, x: T.relu(x),
        "erf": lambda a, x: T.erf(x), "sin": lambda a, x: T.sin(x), "cos": lambda a, x: T.cos(x),
        "abs": lambda a, x: T.abs(x), "sign": lambda a, x: T.sign(x),
        "add": lambda a, x, y: x + y, "sub": lambda a, x, y: x - y, "mul": lambda a, x, y: x * y,
        "div": lambda a, x, y: x / y, "pow": lambda a, x, y: T.pow(x, y),
        "maximum": lambda a, x, y: T.maximum(x, y), "minimum": lambda a, x, y: T.minimum(x, y),
        "eq": lambda a, x, y: x == y, "ne": lambda a, x, y: x != y, "lt": lambda a, x, y: x < y,
        "le": lambda a, x, y: x <= y, "gt": lambda a, x, y: x > y, "ge": lambda a, x, y: x >= y,
        "where": lambda a, c, x, y: T.where(c, x, y),
        "sum": lambda a, x: T.sum(x, dim=tuple(a["axes"]), keepdim=a["keepdims"]) if a["axes"] else x.clone(),
        "max": lambda a, x: T.amax(x, dim=tuple(a["axes"]), keepdim=a["keepdims"]) if a["axes"] else x.clone(),
        "reshape": lambda a, x: T.reshape(x, tuple(a["shape"])),
        "transpose": lambda a, x: x.permute(tuple(a["perm"])),
        "broadcast_to": lambda a, x: T.broadcast_to(x, tuple(a["shape"])),
        "matmul": lambda a, x, y: T.matmul(x, y),
    }


def torch_reference(graph: Graph, inputs) -> np.ndarray:
    """The single node of ``graph`` computed by torch (float64 inputs stay float64)."""
    torch = _torch()
    (node,) = graph.nodes
    fn = _torch_fns()[node.op]
    xs = [torch.from_numpy(np.array(x)) for x in inputs]
    with torch.no_grad():
        out = fn(node.attr, *xs)
    return out.numpy().astype(node.type.dtype)


# ----------------------------------------------------------------------------- suites


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**32)


def op_cases(seed: int, count: int, tolerance: float | None, use_torch: bool = True) -> list[Case]:
    """Per primitive: one graph of ``count`` independent cases (forward), the gradient
    graph of sum_k <op(x_k), c_k> (backward), and single cases against torch."""
    from neural_arch.compiler.autodiff import autodiff
    from neural_arch.compiler.ir import Node, TensorType
    from neural_arch.compiler.ops.registry import PRIMITIVES, NONDIFF, NumpySampler
    torch_fns = _torch_fns() if use_torch else {}
    out = []
    for name in sorted(PRIMITIVES):
        prim = PRIMITIVES[name]
        if prim.spec is None:
            continue
        spec = prim.spec
        s = NumpySampler(_seed_for(seed, name))
        draws = [spec.gen(s) for _ in range(count)]
        rtol, atol = (2 * spec.rtol, 2 * spec.atol) if tolerance is None else (tolerance, tolerance)
        inputs, nodes, outs, arrays = [], [], [], []
        for k, case in enumerate(draws):
            ins = [GraphInput(f"c{k}_{i}", TensorType(a.shape, a.dtype.name)) for i, a in enumerate(case.inputs)]
            t = prim.shape_rule(*[i.type for i in ins], **case.attrs)
            nodes.append(Node.make(f"y{k}", name, [i.name for i in ins], t, case.attrs))
            inputs += ins
            outs.append(f"y{k}")
            arrays += list(case.inputs)
        fwd = Graph(name, tuple(inputs), tuple(nodes), tuple(outs))
        out.append(Case("ops", f"{name}/forward", fwd, arrays, "compiled", rtol, atol, oracle=tolerance is None))
        # backward: the loss sum_k sum(y_k * c_k) with random cotangents c_k
        float_out = [n for n in nodes if n.type.dtype.startswith("float")]
        if spec.grad and prim.vjp is not NONDIFF and float_out:
            rng = np.random.default_rng(_seed_for(seed, name + "/cot"))
            b_inputs, b_nodes, b_arrays, terms = list(inputs), list(nodes), list(arrays), []
            for n in float_out:
                c = GraphInput(f"cot_{n.name}", n.type)
                b_inputs.append(c)
                b_arrays.append(rng.uniform(-1, 1, n.type.shape).astype(n.type.dtype))
                b_nodes.append(Node.make(f"m_{n.name}", "mul", [n.name, c.name], n.type))
                st = TensorType((), n.type.dtype)
                b_nodes.append(Node.make(f"s_{n.name}", "sum", [f"m_{n.name}"], st,
                                         {"axes": tuple(range(n.type.ndim)), "keepdims": False}))
                if n.type.dtype != "float32":
                    b_nodes.append(Node.make(f"s32_{n.name}", "cast", [f"s_{n.name}"], TensorType((), "float32"),
                                             {"dtype": "float32"}))
                    terms.append(f"s32_{n.name}")
                else:
                    terms.append(f"s_{n.name}")
            acc = terms[0]
            for j, tname in enumerate(terms[1:]):
                b_nodes.append(Node.make(f"acc{j}", "add", [acc, tname], TensorType((), "float32")))
                acc = f"acc{j}"
            loss = Graph(name + "_loss", tuple(b_inputs), tuple(b_nodes), (acc,))
            wrt = [i.name for i in inputs if i.type.dtype.startswith("float")]
            if wrt:
                bwd = autodiff(loss, wrt, with_value=False, name=name + "_backward")
                out.append(Case("ops", f"{name}/backward", bwd, b_arrays, "compiled", 2 * rtol, 2 * atol,
                                oracle=tolerance is None))
        if name in torch_fns:
            for k, case in enumerate(draws[:2]):
                ins = [GraphInput(f"x{i}", TensorType(a.shape, a.dtype.name)) for i, a in enumerate(case.inputs)]
                t = prim.shape_rule(*[i.type for i in ins], **case.attrs)
                g = Graph(name, tuple(ins), (Node.make("y", name, [i.name for i in ins], t, case.attrs),), ("y",))
                out.append(Case("ops", f"{name}/torch{k}", g, list(case.inputs), "torch", rtol, atol, torch_op=name))
    return out


MODEL_TOL = (1e-4, 1e-5)


def model_cases(seed: int, count: int, tolerance: float | None) -> list[Case]:
    from neural_arch.tools import zoo
    rtol, atol = MODEL_TOL if tolerance is None else (tolerance, tolerance)
    out = []
    for name in zoo.names():
        try:
            zm = zoo.make(name)
        except ImportError as e:
            print(f"difftest models: skipping {name}: its model module is missing ({e})", file=sys.stderr)
            continue
        fwd = zoo.forward_example(zm, name)
        out.append(Case("models", f"{name}/forward", fwd.graph, fwd.inputs, "compiled", rtol, atol,
                        oracle=tolerance is None))
        tr = zoo.train_example(zoo.make(name), name)
        out.append(Case("models", f"{name}/train", tr.graph, tr.inputs, "compiled", rtol, atol,
                        oracle=tolerance is None))
    return out


RANDOM_TOL = (2e-4, 2e-5)


def random_graph(seed: int, max_steps: int = 12) -> tuple[Graph, list, str]:
    """A random recipe's forward outputs and its gradients (w.r.t. every input, of
    sum_k <out_k, c_k>) as ONE graph, its inputs and the recipe's description."""
    from neural_arch.compiler import functional as F
    from neural_arch.compiler.ir import TensorType
    from neural_arch.compiler.ops.registry import NumpySampler
    from neural_arch.compiler.trace import trace, value_and_grad
    from neural_arch.tools.randgraph import random_recipe, run_recipe
    recipe = random_recipe(NumpySampler(seed), max_steps=max_steps)
    xs = [d for _, d in recipe.inputs]
    n = len(xs)
    from neural_arch.compiler.tensor import Tensor
    from neural_arch.compiler import no_grad
    with no_grad():
        outs = run_recipe(recipe, *[Tensor(x) for x in xs])
    outs = outs if isinstance(outs, tuple) else (outs,)
    rng = np.random.default_rng(seed ^ 0x5EED)
    cots = [rng.uniform(-1, 1, o.shape).astype(np.float32) for o in outs]

    def loss(*args):
        ys = run_recipe(recipe, *args[:n])
        ys = ys if isinstance(ys, tuple) else (ys,)
        total = None
        for y, c in zip(ys, args[n:]):
            t = F.sum(y * c)
            total = t if total is None else total + t
        return total

    vg = value_and_grad(loss, argnums=tuple(range(n)))

    def both(*args):
        ys = run_recipe(recipe, *args[:n])
        ys = ys if isinstance(ys, tuple) else (ys,)
        _, grads = vg(*args)
        return (*ys, *grads)
    both.__name__ = f"random_{seed}"
    types = [TensorType(x.shape, "float32") for x in xs] + [TensorType(c.shape, "float32") for c in cots]
    g = trace(both, *types)
    return g, xs + cots, recipe.describe()


def random_cases(seed: int, count: int, tolerance: float | None) -> list[Case]:
    rtol, atol = RANDOM_TOL if tolerance is None else (tolerance, tolerance)
    out = []
    for k in range(count):
        s = seed + k
        g, inputs, desc = random_graph(s)
        out.append(Case("random", f"graph{s}", g, inputs, "compiled", rtol, atol, info={"recipe": desc, "seed": s},
                        oracle=tolerance is None))
    return out


PASSES_TOL = (1e-5, 1e-6)


def pass_cases(seed: int, count: int, tolerance: float | None) -> list[Case]:
    from neural_arch.compiler.passes import PASSES
    from neural_arch.compiler.ops.registry import NumpySampler
    from neural_arch.tools.randgraph import build, random_recipe
    optional = sorted(n for n, p in PASSES.items() if p.optional and not n.startswith("test_"))
    rtol, atol = PASSES_TOL if tolerance is None else (tolerance, tolerance)
    out = []
    for k in range(count):
        s = seed + k
        rng = np.random.default_rng(_seed_for(s, "pipeline"))
        g, inputs = build(random_recipe(NumpySampler(s), max_steps=12), name=f"random_{s}")
        order = [optional[i] for i in rng.integers(0, len(optional), rng.integers(1, 13))]
        out.append(Case("passes", f"graph{s}", g, inputs, "passes", rtol, atol, pipeline=order,
                        oracle=tolerance is None))
        out.append(Case("passes", f"graph{s}", g, inputs, "passes-compiled", 2 * rtol, 2 * atol, pipeline=order,
                        oracle=tolerance is None))
    return out


def cases_for(suite: str, seed: int, count: int, tolerance: float | None, use_torch: bool = True) -> list[Case]:
    if suite == "ops":
        return op_cases(seed, count, tolerance, use_torch)
    if suite == "models":
        return model_cases(seed, count, tolerance)
    if suite == "random":
        return random_cases(seed, count, tolerance)
    if suite == "passes":
        return pass_cases(seed, count, tolerance)
    raise ValueError(f"unknown suite {suite!r} (suites: {', '.join(SUITES)}, all)")


# ----------------------------------------------------------------------------- reproducers


def write_reproducer(res: Result, out_dir: str) -> str:
    c = res.case
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{c.suite}-{c.name}-{c.check}")
    path = os.path.join(out_dir, safe)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "graph.txt"), "w") as f:
        f.write(c.graph.to_text())
    np.savez(os.path.join(path, "inputs.npz"), **{f"in{k:04d}": np.asarray(a) for k, a in enumerate(c.inputs)})
    meta = {"suite": c.suite, "name": c.name, "check": c.check, "what": c.what, "rtol": c.rtol, "atol": c.atol,
            "oracle": c.oracle,
            "pipeline": c.pipeline, "torch_op": c.torch_op, "info": c.info,
            "compiled_with": "Program(graph): DEFAULT_PIPELINE, fusion, codegen" if c.check in ("compiled", "torch")
            else "run_pipeline(graph, pipeline); Program(options={'passes': False})" if c.check == "passes-compiled"
            else "run_pipeline(graph, pipeline), interpreted",
            "result": {"max_abs": res.max_abs, "max_rel": res.max_rel, "error": res.error, "worst_output": res.worst}}
    with open(os.path.join(path, "case.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    with open(os.path.join(path, "pipeline.txt"), "w") as f:
        from neural_arch.compiler.passes import DEFAULT_PIPELINE
        passes = c.pipeline if c.check.startswith("passes") else list(DEFAULT_PIPELINE) + ["fusion", "codegen"]
        f.write("\n".join(passes) + "\n")
    with open(os.path.join(path, "README.txt"), "w") as f:
        f.write(f"{c.suite} {c.name}: {c.what} failed (max abs {res.max_abs:.3g}, max rel {res.max_rel:.3g}, "
                f"rtol {c.rtol:g}, atol {c.atol:g}){' - ' + res.error if res.error else ''}\n"
                f"replay: narch difftest --replay {path}\n")
    return path


def load_reproducer(path: str) -> Case:
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "case.json")):
        raise FileNotFoundError(f"{path} is not a difftest reproducer directory (no case.json)")
    with open(os.path.join(path, "case.json")) as f:
        meta = json.load(f)
    with open(os.path.join(path, "graph.txt")) as f:
        graph = parse(f.read())
    with np.load(os.path.join(path, "inputs.npz")) as z:
        inputs = [z[k] for k in sorted(z.files)]
    return Case(meta["suite"], meta["name"], graph, inputs, meta["check"], meta["rtol"], meta["atol"],
                pipeline=meta.get("pipeline"), torch_op=meta.get("torch_op"), info=meta.get("info") or {},
                oracle=bool(meta.get("oracle", False)))


# ----------------------------------------------------------------------------- the minimizer


def cut_nodes(graph: Graph, inputs: list, values: dict, names) -> tuple[Graph, list]:
    """Replace the nodes ``names`` by graph inputs of their types (fed with ``values``), then
    drop nodes no output needs and inputs nothing reads."""
    from neural_arch.compiler.passes.dce import dead_code_elimination
    names = set(names)
    new_inputs = list(graph.inputs) + [GraphInput(n.name, n.type) for n in graph.nodes if n.name in names]
    arrays = dict(zip(graph.input_names, inputs))
    arrays.update({n: values[n] for n in names})
    g = Graph(graph.name, tuple(new_inputs), tuple(n for n in graph.nodes if n.name not in names), graph.outputs)
    g = dead_code_elimination(g)
    used = {i for n in g.nodes for i in n.inputs} | set(g.outputs)
    kept = tuple(i for i in g.inputs if i.name in used)
    g = g.replace(inputs=kept)
    return g, [np.asarray(arrays[i.name]) for i in kept]


def only_outputs(graph: Graph, inputs: list, outputs) -> tuple[Graph, list]:
    from neural_arch.compiler.passes.dce import dead_code_elimination
    g = dead_code_elimination(graph.replace(outputs=tuple(outputs)))
    used = {i for n in g.nodes for i in n.inputs} | set(g.outputs)
    keep = [k for k, i in enumerate(g.inputs) if i.name in used]
    return g.replace(inputs=[g.inputs[k] for k in keep]), [inputs[k] for k in keep]


def fails_in_subprocess(c: Case, timeout: float = 120.0) -> bool:
    """Does the case fail (or crash) when replayed in a fresh process?  For cases that take
    the process down with them (a signal in native code)."""
    import shutil
    import subprocess
    import tempfile
    tmp = tempfile.mkdtemp(prefix="narch-difftest-trial-")
    try:
        path = write_reproducer(Result(c, math.nan, math.nan, False), tmp)
        try:
            r = subprocess.run([sys.executable, "-m", "neural_arch.tools.difftest", "--replay-here", path],
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return True
        return r.returncode != 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def minimize(case: Case, max_seconds: float = 300.0, log=None, predicate=None) -> Case:
    """Shrink a failing case to the fewest nodes that still fail (ddmin over nodes).
    ``predicate(case) -> bool`` says whether a trial still fails (default: run it here;
    ``fails_in_subprocess`` for cases that crash the process)."""
    from dataclasses import replace
    from neural_arch.runtime.interpreter import interpret
    deadline = time.perf_counter() + max_seconds
    tries = 0

    def fails(c: Case) -> bool:
        nonlocal tries
        tries += 1
        if not c.graph.nodes:
            return False
        return predicate(c) if predicate is not None else not run_case(c).ok

    cur = case
    # 1. a single failing output
    if len(cur.graph.outputs) > 1:
        for o in dict.fromkeys(cur.graph.outputs):
            g, ins = only_outputs(cur.graph, cur.inputs, [o])
            trial = replace(cur, graph=g, inputs=ins)
            if fails(trial):
                cur = trial
                break
    # 2. ddmin over nodes: cut chunks of nodes into inputs
    chunk = max(1, len(cur.graph.nodes) // 2)
    while time.perf_counter() < deadline:
        values = dict(zip(cur.graph.input_names, cur.inputs))
        env = interpret(cur.graph.replace(outputs=[n.name for n in cur.graph.nodes] or cur.graph.outputs),
                        cur.inputs) if cur.graph.nodes else []
        values.update({n.name: v for n, v in zip(cur.graph.nodes, env)})
        outs = set(cur.graph.outputs)
        cuttable = [n.name for n in cur.graph.nodes if n.name not in outs]
        progress = False
        for start in range(0, len(cuttable), chunk):
            if time.perf_counter() > deadline:
                break
            names = cuttable[start:start + chunk]
            g, ins = cut_nodes(cur.graph, cur.inputs, values, names)
            if len(g.nodes) >= len(cur.graph.nodes):
                continue
            trial = replace(cur, graph=g, inputs=ins)
            if fails(trial):
                cur = trial
                progress = True
                break
        if progress:
            chunk = max(1, min(chunk, len(cur.graph.nodes) // 2))
            continue
        if chunk == 1:
            break
        chunk = max(1, chunk // 2)
    if log:
        log(f"minimized {case.suite} {case.name}: {len(case.graph.nodes)} -> {len(cur.graph.nodes)} nodes "
            f"in {tries} trials")
    return replace(cur, name=case.name + "-min", info={**case.info, "minimized_from": len(case.graph.nodes)})


# ----------------------------------------------------------------------------- the table


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.2e}"


HEADER = f"{'suite':<7} {'case':<28} {'check':<31} {'max abs':>9} {'max rel':>9}  {'tolerance':<22} result"


def row(res: Result) -> str:
    c = res.case
    tol = f"rtol {c.rtol:.0e} atol {c.atol:.0e}"
    verdict = ("pass (vs f64)" if res.settled else "pass") if res.ok else ("ERROR " + (res.error or "")) if res.error else \
        f"FAIL (worst %{res.worst})" if res.worst else "FAIL"
    return f"{c.suite:<7} {c.name[:28]:<28} {c.what:<31} {_fmt(res.max_abs):>9} {_fmt(res.max_rel):>9}  {tol:<22} {verdict}"


def _matches(name: str, only) -> bool:
    if not only:
        return True
    import fnmatch
    return any(fnmatch.fnmatch(name, pat) or pat in name for pat in only)


DEFAULT_COUNTS = {"ops": 3, "models": 1, "random": 20, "passes": 20}


def iter_cases(suites, seed: int, count: int | None, only, tolerance, use_torch: bool = True, start: int = 0):
    """(index, case) over every selected case of the suites, from index ``start`` (random and
    passes cases are built one seed at a time, so a long run starts at once and a worker
    process can resume in the middle)."""
    k = 0
    for suite in suites:
        n = DEFAULT_COUNTS[suite] if count is None else count
        if suite in ("random", "passes"):
            per = 1 if suite == "random" else 2
            if k + n * per <= start:
                k += n * per
                continue
            first = max(0, (start - k) // per)
            k += first * per
            gen = (c for j in range(first, n) for c in cases_for(suite, seed + j, 1, tolerance))
        else:
            gen = iter(cases_for(suite, seed, n, tolerance, use_torch))
        for case in gen:
            if not _matches(case.name, only):
                continue
            if k >= start:
                yield k, case
            k += 1


def _report(res: Result, stream, quiet: bool, n_done: int, n_failed: int) -> None:
    if not quiet or not res.ok:
        print(row(res), file=stream, flush=True)
        if res.repro:
            print(f"  reproducer: narch difftest --replay {res.repro}", file=stream)
        if res.minimized:
            print(f"  minimized ({res.minimized.split(':')[0]}): narch difftest --replay "
                  f"{res.minimized.split(': ', 1)[1]}", file=stream, flush=True)
    elif n_done % 100 == 0:
        print(f"  ... {n_done} cases, {n_failed} failed", file=stream, flush=True)


def check(case: Case, out_dir: str, minimize_failures: bool, minimize_seconds: float, stream) -> Result:
    """Run one case; on failure write its reproducer and (random graphs) a minimized one."""
    res = run_case(case)
    if not res.ok:
        res.repro = write_reproducer(res, out_dir)
        if minimize_failures and case.suite == "random" and case.check == "compiled":
            small = minimize(case, max_seconds=minimize_seconds, log=lambda m: print("  " + m, file=stream))
            sres = run_case(small)
            if not sres.ok:
                sres.repro = write_reproducer(sres, out_dir)
                res.minimized = f"{len(case.graph.nodes)} -> {len(small.graph.nodes)} nodes: {sres.repro}"
    return res


def run(suites, seed: int = 0, count: int | None = None, only=None, tolerance: float | None = None,
        out_dir: str = "narch_difftest", minimize_failures: bool = True, quiet: bool = False,
        use_torch: bool = True, stream=None, minimize_seconds: float = 300.0,
        batch: int = 0) -> tuple[int, list]:
    """Run the suites, print the table; returns (exit status, results).  ``batch`` > 0 runs
    the cases in worker processes of ``batch`` cases each, so a case that crashes the
    process (a signal in native code) is reported as a failure and the run goes on."""
    stream = stream or sys.stdout
    if batch > 0:
        return _run_batched(suites, seed, count, only, tolerance, out_dir, minimize_failures, quiet, use_torch,
                            stream, minimize_seconds, batch)
    results = []
    t_all = time.perf_counter()
    print(HEADER, file=stream)
    for _, case in iter_cases(suites, seed, count, only, tolerance, use_torch):
        res = check(case, out_dir, minimize_failures, minimize_seconds, stream)
        results.append(res)
        _report(res, stream, quiet, len(results), sum(not r.ok for r in results))
    failed = [r for r in results if not r.ok]
    print(f"{len(results)} cases, {len(results) - len(failed)} passed, {len(failed)} failed "
          f"in {time.perf_counter() - t_all:.1f} s" + (f"; reproducers in {out_dir}/" if failed else ""),
          file=stream)
    if not results and only:
        return _nothing_matched(only, stream), results
    return (1 if failed else 0), results


def _nothing_matched(only, stream) -> int:
    """A run that compared nothing fails: a misspelt --only must not look like a clean pass."""
    print(f"no case matches --only {','.join(only)}: nothing was compared", file=stream)
    return 1


# ----------------------------------------------------------------------------- worker processes


def _worker(spec: dict) -> int:
    """A worker: cases [start, start + batch); before each, its reproducer goes to
    out_dir/_pending (so a crash leaves it behind); protocol lines start with @@."""
    import shutil
    out = sys.stdout
    n = 0
    for k, case in iter_cases(spec["suites"], spec["seed"], spec["count"], spec["only"], spec["tolerance"],
                              spec["use_torch"], spec["start"]):
        if n >= spec["batch"]:
            break
        pending = os.path.join(spec["out_dir"], "_pending")
        shutil.rmtree(pending, ignore_errors=True)
        os.makedirs(spec["out_dir"], exist_ok=True)
        placeholder = Result(case, math.nan, math.nan, False, error="the process died while running this case")
        tmp = write_reproducer(placeholder, os.path.join(spec["out_dir"], "_pending_tmp"))
        os.replace(tmp, pending)
        shutil.rmtree(os.path.join(spec["out_dir"], "_pending_tmp"), ignore_errors=True)
        print(f"@@pending {k} {row(placeholder)[:60]}", file=out, flush=True)
        res = check(case, spec["out_dir"], spec["minimize"], spec["minimize_seconds"], out)
        shutil.rmtree(pending, ignore_errors=True)
        print(f"@@done {k} {1 if res.ok else 0}", file=out, flush=True)
        if not spec["quiet"] or not res.ok:
            _report(res, out, False, 0, 0)
        n += 1
    print(f"@@end {n}", file=out, flush=True)
    return 0


def _run_batched(suites, seed, count, only, tolerance, out_dir, minimize_failures, quiet, use_torch, stream,
                 minimize_seconds, batch) -> tuple[int, list]:
    import signal
    import shutil
    import subprocess
    t_all = time.perf_counter()
    print(HEADER, file=stream, flush=True)
    start, done, failed, crashes, late = 0, 0, 0, [], []
    while True:
        spec = dict(suites=list(suites), seed=seed, count=count, only=only, tolerance=tolerance, out_dir=out_dir,
                    minimize=minimize_failures, quiet=quiet, use_torch=use_torch, start=start, batch=batch,
                    minimize_seconds=minimize_seconds)
        proc = subprocess.Popen([sys.executable, "-m", "neural_arch.tools.difftest", "--worker", json.dumps(spec)],
                                stdout=subprocess.PIPE, text=True, bufsize=1)
        pending, ran, ended = None, 0, False
        for line in proc.stdout:
            if line.startswith("@@pending "):
                pending = int(line.split()[1])
            elif line.startswith("@@done "):
                _, k, ok = line.split()
                pending, ran, done = None, ran + 1, done + 1
                failed += ok == "0"
                if quiet and done % 100 == 0:
                    print(f"  ... {done} cases, {failed} failed", file=stream, flush=True)
            elif line.startswith("@@end"):
                ended = True
            else:
                stream.write(line)
                stream.flush()
        rc = proc.wait()
        if pending is not None:  # the worker died inside a case: a crash
            sig = -rc if rc < 0 else None
            why = f"signal {sig} ({signal.Signals(sig).name})" if sig else f"exit status {rc}"
            name = f"crash-{pending:06d}"
            path = os.path.join(out_dir, name)
            shutil.rmtree(path, ignore_errors=True)
            src = os.path.join(out_dir, "_pending")
            if os.path.isdir(src):
                os.replace(src, path)
                with open(os.path.join(path, "README.txt"), "a") as f:
                    f.write(f"the worker process died with {why} while running this case (after {ran} other "
                            f"cases in the same process)\n")
            print(f"CRASH   case #{pending}: the worker died with {why} after {ran} cases in that process; "
                  f"reproducer: narch difftest --replay {path}", file=stream, flush=True)
            crashes.append(path)
            if minimize_failures and os.path.isdir(path):
                case = load_reproducer(path)
                if fails_in_subprocess(case):
                    small = minimize(case, max_seconds=minimize_seconds, predicate=fails_in_subprocess,
                                     log=lambda m: print("  " + m + " (each trial in a fresh process)", file=stream))
                    mpath = write_reproducer(Result(small, math.nan, math.nan, False,
                                                    error=f"crash or failure in a fresh process ({why} in the run)"),
                                             out_dir)
                    print(f"  minimized ({len(case.graph.nodes)} -> {len(small.graph.nodes)} nodes): "
                          f"narch difftest --replay {mpath}", file=stream, flush=True)
                else:
                    print("  (replayed alone in a fresh process it passes: the crash depends on what ran before it "
                          "in the same process)", file=stream, flush=True)
            done, failed, start = done + 1, failed + 1, pending + 1
            continue
        if rc != 0:  # died between cases or at exit: heap damage done by an earlier case
            sig = -rc if rc < 0 else None
            why = f"signal {sig} ({signal.Signals(sig).name})" if sig else f"exit status {rc}"
            print(f"CRASH   the worker died with {why} after finishing cases #{start}..#{start + ran - 1} "
                  f"(between cases or at exit: damage done by one of them)", file=stream, flush=True)
            late.append((start, start + ran - 1, why))
        start += ran
        if ended and ran < batch:
            break
    print(f"{done} cases, {done - failed} passed, {failed} failed ({len(crashes)} crashes"
          + (f"; {len(late)} workers died between cases" if late else "") + f") "
          f"in {time.perf_counter() - t_all:.1f} s" + (f"; reproducers in {out_dir}/" if failed else ""),
          file=stream)
    if not done and not late and only:
        return _nothing_matched(only, stream), crashes
    return (1 if failed or late else 0), crashes


def replay(path: str, stream=None, isolate: bool = True) -> int:
    """Re-run a reproducer; exit status 1 while it still fails.  The case runs in a child
    process, so a case that crashes the process is reported as such (not as our own death)."""
    stream = stream or sys.stdout
    case = load_reproducer(path)
    if isolate:
        import signal
        import subprocess
        r = subprocess.run([sys.executable, "-m", "neural_arch.tools.difftest", "--replay-here", path],
                           capture_output=True, text=True)
        stream.write(r.stdout)
        if r.returncode < 0:
            sig = signal.Signals(-r.returncode).name
            last = (r.stderr.strip().splitlines() or [""])[-1][:200]
            print(HEADER, file=stream)
            print(f"{case.suite:<7} {case.name[:28]:<28} {case.what:<31} {'-':>9} {'-':>9}  "
                  f"{'':<22} CRASH: signal {-r.returncode} ({sig}){': ' + last if last else ''}", file=stream)
            print(f"replayed {path}: still fails (the process died)", file=stream)
            return 1
        if r.returncode not in (0, 1):
            raise RuntimeError(f"replay failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        return r.returncode
    res = run_case(case)
    print(HEADER, file=stream)
    print(row(res), file=stream)
    print(f"replayed {path}: {'still fails' if not res.ok else 'passes now'}", file=stream)
    return 0 if res.ok else 1


if __name__ == "__main__":  # the worker process of run(batch=N)
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker(json.loads(sys.argv[2])))
    if len(sys.argv) == 3 and sys.argv[1] == "--replay-here":
        sys.exit(replay(sys.argv[2], isolate=False))
    print("usage: narch difftest ... (this module's main is the worker of --batch runs)", file=sys.stderr)
    sys.exit(2)

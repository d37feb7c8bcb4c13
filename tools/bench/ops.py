"""Single-op and compile-time benchmarks of the code generator (``compile``), as ratios
measured in the same run:

* ops on 16M float32 elements against NumPy and against a plain copy's time (the memory
  bandwidth bound): gelu(x * w + b) with per-column w and b, add with broadcasting
  (x + row), exp, tanh, a row sum and a column sum of a (4096, 4096) matrix; row softmax and
  layer_norm on (4096, 768); ours write into preallocated outputs (steady state, as inside a
  program), NumPy's into ``out=`` where it can;
* compile time per kernel (cold: build + optimise + codegen; warm: from the disk cache in a
  fresh ``Program``) and for a transformer block forward and its backward.

    python -m neural_arch.tools.bench.ops [--quick]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def best_time(fn, reps: int = 7) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def _np_gelu_affine(x, w, b, out, tmp):
    """NumPy's best: gelu(x * w + b) (tanh form) in place through preallocated buffers."""
    np.multiply(x, w, out=out)
    out += b
    np.multiply(out, out, out=tmp)
    tmp *= 0.044715
    tmp += 1.0
    tmp *= out
    tmp *= 0.7978845608028654
    np.tanh(tmp, out=tmp)
    tmp += 1.0
    out *= tmp
    out *= 0.5


def _np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)
    return xc / np.sqrt(var + eps) * w + b


def bench_ops(n_side: int = 4096, reps: int = 7, rows_shape=(4096, 768)) -> list[dict]:
    """Each case: our compiled function (writing into preallocated outputs, as inside a
    program, and into fresh arrays) against NumPy and against a plain copy of the input."""
    from neural_arch.compiler import compile, functional as F
    from neural_arch.runtime import threadpool

    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, (n_side, n_side)).astype(np.float32)
    row = rng.uniform(-1, 1, n_side).astype(np.float32)
    w_row = rng.uniform(0.5, 1.5, n_side).astype(np.float32)
    out = np.empty_like(x)
    tmp = np.empty_like(x)
    xr = rng.standard_normal(rows_shape).astype(np.float32)
    lw = rng.uniform(0.5, 1.5, rows_shape[-1]).astype(np.float32)
    lb = rng.uniform(-0.5, 0.5, rows_shape[-1]).astype(np.float32)
    big = f"{n_side}x{n_side}"
    small = "x".join(map(str, rows_shape))
    cases = [
        (f"gelu(x*w+b) {big}", lambda a, w, b: F.gelu(a * w + b, approximate="tanh"), (x, w_row, row),
         lambda: _np_gelu_affine(x, w_row, row, out, tmp), x),
        (f"add (x + row) {big}", lambda a, r: a + r, (x, row), lambda: np.add(x, row, out=out), x),
        (f"exp {big}", lambda a: F.exp(a), (x,), lambda: np.exp(x, out=out), x),
        (f"tanh {big}", lambda a: F.tanh(a), (x,), lambda: np.tanh(x, out=out), x),
        (f"row sum {big}", lambda a: a.sum(axis=1), (x,), lambda: x.sum(axis=1), x),
        (f"column sum {big}", lambda a: a.sum(axis=0), (x,), lambda: x.sum(axis=0), x),
        (f"softmax rows {small}", lambda a: F.softmax(a, axis=-1), (xr,), lambda: _np_softmax(xr), xr),
        (f"layer_norm {small}", lambda a, w, b: F.layer_norm(a, (rows_shape[-1],), w, b), (xr, lw, lb),
         lambda: _np_layer_norm(xr, lw, lb), xr),
    ]
    copies = {}
    rows = []
    for name, fn, args, ref, src in cases:
        if src.shape not in copies:
            dst = np.empty_like(src)
            copies[src.shape] = best_time(lambda: np.copyto(dst, src), reps)
        copy = copies[src.shape]
        cf = compile(fn, *args)
        prog = cf.program
        outs = [np.empty(t.shape, t.dtype) for t in cf.graph.output_types]
        ours = best_time(lambda: prog(*args, out=outs), reps)
        fresh = best_time(lambda: prog(*args), reps)
        theirs = best_time(ref, reps)
        rows.append({"op": name, "ours_ms": ours * 1e3, "ours_fresh_ms": fresh * 1e3, "numpy_ms": theirs * 1e3,
                     "copy_ms": copy * 1e3, "vs_copy": ours / copy, "speedup": theirs / ours,
                     "kernels": len(cf.kernels), "threads": threadpool.num_threads()})
    return rows


def bench_compile() -> list[dict]:
    """Cold and cached compile times (a private cache directory)."""
    from neural_arch.compiler import compile, functional as F, value_and_grad
    from neural_arch.runtime import program as P

    old = os.environ.get("NEURAL_ARCH_CACHE_DIR")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        os.environ["NEURAL_ARCH_CACHE_DIR"] = d
        try:
            rng = np.random.default_rng(1)
            x = rng.standard_normal((64, 256)).astype(np.float32)
            cases = [("exp kernel", lambda a: F.exp(a), (x,)),
                     ("erf kernel", lambda a: F.erf(a), (x,)),
                     ("softmax (1 row kernel)", lambda a: F.softmax(a), (x,))]
            try:
                from neural_arch.models import nn
                nn.manual_seed(0)
                block = nn.TransformerBlock(128, 4, causal=True)
                xb = rng.standard_normal((4, 64, 128)).astype(np.float32)
                cases.append(("transformer block forward", block, (xb,)))
                cases.append(("transformer block value_and_grad",
                              value_and_grad(lambda a: (block(a) ** 2).mean()), (xb,)))
            except ImportError:  # pragma: no cover
                pass
            for name, fn, args in cases:
                P.clear_memory_cache()
                t0 = time.perf_counter()
                cf = compile(fn, *args)
                cold = time.perf_counter() - t0
                P.clear_memory_cache()
                t0 = time.perf_counter()
                cf2 = compile(fn, *args)
                warm = time.perf_counter() - t0
                assert cf2.program.native.from_cache
                nk = len(cf.kernels)
                rows.append({"what": name, "nodes": len(cf.graph.nodes), "kernels": nk,
                             "cold_s": cold, "cached_s": warm,
                             "build_s": cf.program.module.build_seconds,
                             "llvm_s": cf.program.native.compile_seconds})
        finally:
            if old is None:
                os.environ.pop("NEURAL_ARCH_CACHE_DIR", None)
            else:
                os.environ["NEURAL_ARCH_CACHE_DIR"] = old
    return rows


def format_ops(rows) -> str:
    lines = [f"single ops, float32, {rows[0]['threads']} threads; best of repeated runs; "
             f"'x copy' = our time / a plain copy of the input's time (1.0 = memory-bound ideal)",
             f"{'op':<30}{'ours ms':>9}{'(fresh out)':>12}{'numpy ms':>10}{'x copy':>8}{'faster than numpy':>19}"
             f"{'kernels':>8}"]
    for r in rows:
        lines.append(f"{r['op']:<30}{r['ours_ms']:>9.2f}{r['ours_fresh_ms']:>12.2f}{r['numpy_ms']:>10.2f}"
                     f"{r['vs_copy']:>8.2f}{r['speedup']:>18.2f}x{r['kernels']:>8}")
    return "\n".join(lines)


def format_compile(rows) -> str:
    lines = [f"{'compile':<34}{'nodes':>6}{'kernels':>8}{'cold s':>8}{'(build':>8}{'llvm)':>7}{'cached s':>10}"]
    for r in rows:
        lines.append(f"{r['what']:<34}{r['nodes']:>6}{r['kernels']:>8}{r['cold_s']:>8.2f}{r['build_s']:>8.2f}"
                     f"{r['llvm_s']:>7.2f}{r['cached_s']:>10.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="narch bench ops", description=" ".join(__doc__.split("\n\n")[0].split()),
                                 epilog="example: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE narch bench ops --quick")
    ap.add_argument("--quick", action="store_true", help="a 1024x1024 problem, fewer repetitions")
    args = ap.parse_args(argv)
    print(format_ops(bench_ops(1024 if args.quick else 4096, 3 if args.quick else 7)))
    print()
    print(format_compile(bench_compile()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

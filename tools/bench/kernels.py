"""Kernel benchmarks, printed as ratios measured in the same run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python -m neural_arch.tools.bench.kernels

matmul: GFLOP/s of our gemm (compiler/codegen/gemm.py) against numpy.matmul (OpenBLAS) on
square float32 matrices, on 1 and 2 threads, and against the machine's FMA peak measured
here by a jit-compiled loop of independent ``<8 x float>`` FMAs.

Threads: the 2-thread rows run ``compile_gemm(dtype, parallel=2)``, which splits C itself
over the native pinned pool (runtime/threadpool.py, ``narch_parallel_for``) when the
product is large enough (``PARALLEL_MIN_FLOPS_PER_THREAD``); ``used`` says whether it did.
NumPy's thread count is set through OpenBLAS's own ``set_num_threads`` when we can find it.
The epilogue table times a fused ``gelu(x @ W + b)`` kernel (bias add and a tanh-GELU
polynomial in the GEMM's write-back) against the plain GEMM and against NumPy doing the
same in two steps.
Set ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` unset: on this machine they select a slower
OpenBLAS kernel, which would flatter us.
"""
from __future__ import annotations

import ctypes
import glob
import os
import queue
import sys
import threading
import time

import numpy as np

# ----------------------------------------------------------------------------- timing


def best_time(fn, min_reps: int = 3, min_total: float = 0.25, max_reps: int = 200) -> float:
    """Best wall time of ``fn()`` over at least ``min_reps`` calls and ``min_total`` seconds."""
    fn()  # warm up (page faults, caches, lazy init)
    best, total, reps = float("inf"), 0.0, 0
    while reps < min_reps or (total < min_total and reps < max_reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, total, reps = min(best, dt), total + dt, reps + 1
    return best


# ----------------------------------------------------------------------------- NumPy's BLAS threads


def _openblas():
    """NumPy's bundled OpenBLAS as a ctypes library (already loaded by numpy), or None."""
    libdir = os.path.join(os.path.dirname(np.__file__) + ".libs")
    for path in sorted(glob.glob(os.path.join(libdir, "*openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("64_", ""):
            setter = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None)
            if setter is None:
                setter = getattr(lib, f"openblas_set_num_threads{suffix}", None)
            if setter is not None:
                core = getattr(lib, f"scipy_openblas_get_corename{suffix}", None)
                if core is not None:
                    core.restype = ctypes.c_char_p
                return setter, core
    return None


_OPENBLAS = _openblas()


def numpy_blas_info() -> str:
    if _OPENBLAS is None:
        return "NumPy BLAS: unknown (thread count not controllable)"
    _, core = _OPENBLAS
    name = core().decode() if core is not None else "?"
    return f"NumPy OpenBLAS core: {name}"


def set_numpy_threads(n: int) -> bool:
    if _OPENBLAS is None:
        return False
    _OPENBLAS[0](ctypes.c_int(n))
    return True


# ----------------------------------------------------------------------------- pinned workers


class PinnedWorker:
    """A persistent thread pinned to one CPU, running submitted callables."""

    def __init__(self, cpu: int | None):
        self.cpu = cpu
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        if self.cpu is not None:
            try:
                os.sched_setaffinity(0, {self.cpu})
            except (AttributeError, OSError):
                pass
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
                self._done.put(None)
            except BaseException as e:  # pragma: no cover - reported to the caller
                self._done.put(e)

    def submit(self, job):
        self._jobs.put(job)

    def wait(self):
        err = self._done.get()
        if err is not None:
            raise err

    def close(self):
        self._jobs.put(None)
        self._thread.join()


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return list(range(os.cpu_count() or 1))


# ----------------------------------------------------------------------------- FMA peak

_PEAK_IR = r"""
define void @fma_peak(i64 %n, ptr %out) {
entry:
  %x = load <8 x float>, ptr %out, align 4
  %yp = getelementptr float, ptr %out, i64 8
  %y = load <8 x float>, ptr %yp, align 4
  br label %loop
loop:
  %i = phi i64 [ 0, %entry ], [ %i1, %loop ]
{phis}
{fmas}
  %i1 = add i64 %i, 1
  %c = icmp slt i64 %i1, %n
  br i1 %c, label %loop, label %done
done:
{sums}
  store <8 x float> %s{last}, ptr %out, align 4
  ret void
}
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
"""


_PEAK_FN = None


def measure_fma_peak(threads: int = 1, seconds: float = 0.3, rounds: int = 3) -> float:
    """GFLOP/s of a loop of 12 independent ``<8 x float>`` FMA chains on ``threads`` pinned
    threads: the machine's AVX2 FMA ceiling as our compiled code sees it."""
    from neural_arch.runtime import jit

    nacc = 12
    x, y = "<8 x float> %x", "<8 x float> %y"
    phis = "\n".join(f"  %a{j} = phi <8 x float> [ zeroinitializer, %entry ], [ %b{j}, %loop ]"
                     for j in range(nacc))
    fmas = "\n".join(f"  %b{j} = call <8 x float> @llvm.fma.v8f32({x}, {y}, <8 x float> %a{j})"
                      for j in range(nacc))
    sums = "  %s0 = fadd <8 x float> %b0, %b1\n" + "\n".join(
        f"  %s{j - 1} = fadd <8 x float> %s{j - 2}, %b{j}" for j in range(2, nacc))
    text = (_PEAK_IR.replace("{phis}", phis).replace("{fmas}", fmas)
            .replace("{sums}", sums).replace("{last}", str(nacc - 2)))
    global _PEAK_FN
    if _PEAK_FN is None:
        # compiled once per process
        loaded = jit.load(jit.optimize(text, "fma_peak"))
        _PEAK_FN = (loaded, loaded.function("fma_peak", None, ctypes.c_int64, ctypes.c_void_p))
    fn = _PEAK_FN[1]
    outs = [np.full(16, 0.999, np.float32) for _ in range(threads)]
    n = 1 << 22
    flops_per_iter = nacc * 8 * 2

    cpus = _cpus()
    workers = [PinnedWorker(cpus[i % len(cpus)]) for i in range(threads)]
    try:
        def run():
            for w, o in zip(workers, outs):
                w.submit(lambda o=o: fn(n, o.ctypes.data))
            for w in workers:
                w.wait()
        t = float("inf")
        for r in range(rounds):  # a busy neighbour on a shared machine comes and goes
            if r:
                time.sleep(0.05)
            t = min(t, best_time(run, min_reps=3, min_total=seconds / rounds))
    finally:
        for w in workers:
            w.close()
    return threads * n * flops_per_iter / t / 1e9


# ----------------------------------------------------------------------------- matmul


# OpenBLAS's workers spin for ~0.1 s after each call (measured: 0.1 s of CPU in the 1 s
# after one 512^3 matmul), which would steal a core from whatever we time next.
BLAS_SPIN_SECONDS = 0.15


def _pool(threads: int):
    """The native pool, restarted with ``threads`` threads if it has another count."""
    from neural_arch.runtime import threadpool

    threadpool.install()
    if threadpool.num_threads() != threads:
        threadpool.set_num_threads(threads)
    return threadpool


def _pool_jobs() -> int:
    """Jobs published to the pool's workers so far (its generation counter)."""
    from neural_arch.runtime import threadpool

    return threadpool.state()["gen"]


def bench_matmul(sizes=(128, 256, 512, 1024, 2048), threads=(1, 2), dtype="float32",
                 peak: dict | None = None, check: bool = True, rounds: int = 3,
                 seconds: float = 0.2) -> list[dict]:
    """One row per (size, threads): our GFLOP/s, NumPy's, their ratio and our share of the
    FMA peak measured in this run.

    One thread: the serial kernel.  More: ``compile_gemm(dtype, parallel=t)`` with the
    native pool at ``t`` threads.  Each side is timed as the best of repeated calls, in
    ``rounds`` alternating blocks of about ``seconds`` each (NumPy, pause for its spinning
    workers, ours), so both see the same background load; the best block counts.
    """
    from neural_arch.compiler.codegen.gemm import compile_gemm

    peak = dict(peak or {})
    for t in threads:
        if t not in peak:
            peak[t] = measure_fma_peak(t)
    pool_before = _pool(max(threads)).num_threads()
    rng = np.random.default_rng(0)
    rows = []
    try:
        for n in sizes:
            a = rng.standard_normal((n, n), dtype=np.float32).astype(dtype)
            b = rng.standard_normal((n, n), dtype=np.float32).astype(dtype)
            out = np.empty((n, n), dtype)
            flops = 2.0 * n * n * n
            for t in threads:
                numpy_ok = set_numpy_threads(t)
                _pool(max(t, 1))
                kernel = compile_gemm(dtype, parallel=t if t > 1 else False)
                a_, b_, out_ = kernel.prepare(a, b, out)
                ws = kernel.workspace()

                def ours():
                    kernel.run(a_, b_, out_, workspace=ws)
                if check:
                    ref = a.astype(np.float64) @ b.astype(np.float64)
                    out.fill(np.nan)
                    ours()
                    err = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) or 1.0))
                    if not err < 1e-5:
                        raise AssertionError(f"gemm wrong at n={n}, threads={t}: rel err {err}")
                jobs = _pool_jobs()
                ours()
                used = t if t > 1 and _pool_jobs() > jobs else 1
                t_np = t_us = float("inf")
                for _ in range(rounds):
                    t_np = min(t_np, best_time(lambda: np.matmul(a, b), min_total=seconds))
                    time.sleep(BLAS_SPIN_SECONDS)
                    t_us = min(t_us, best_time(ours, min_total=seconds))
                ours_gf, ref_gf = flops / t_us / 1e9, flops / t_np / 1e9
                rows.append(dict(size=n, threads=t, threads_used=used, ours_gflops=ours_gf,
                                 numpy_gflops=ref_gf, ratio=ours_gf / ref_gf, peak_gflops=peak[t],
                                 peak_frac=ours_gf / peak[t],
                                 numpy_threads=t if numpy_ok else None))
    finally:
        set_numpy_threads(len(_cpus()))
        _pool(pool_before)
    return rows


def format_matmul(rows: list[dict]) -> str:
    head = (f"{'n':>6} {'thr':>3} {'used':>4} {'ours GF/s':>10} {'numpy GF/s':>11} "
            f"{'ours/numpy':>11} {'of peak':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['size']:>6} {r['threads']:>3} {r['threads_used']:>4} {r['ours_gflops']:>10.1f} "
                     f"{r['numpy_gflops']:>11.1f} {r['ratio']:>10.2f}x {r['peak_frac']:>7.0%}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- fused epilogue


def _splat(ty, x):
    import llvmlite.ir as ir

    return ir.Constant(ty, [x] * ty.count) if isinstance(ty, ir.VectorType) else ir.Constant(ty, x)


def bias_gelu_epilogue(b, acc, m, n, lanes, extra):
    """``gelu_tanh(acc + bias[n])`` with tanh(u) as u (27 + u^2) / (27 + 9 u^2) on u clamped
    to [-3, 3]: the kind of epilogue the fusion pass hands the GEMM (float32)."""
    import llvmlite.ir as ir

    (bias,) = extra
    f32 = ir.FloatType()
    p = b.gep(bias, [n], source_etype=f32)
    x = b.fadd(acc, b.load(p, typ=acc.type, align=4))
    t = x.type
    u = b.fmul(_splat(t, 0.7978845608028654),
               b.fadd(x, b.fmul(_splat(t, 0.044715), b.fmul(b.fmul(x, x), x))))
    u = b.select(b.fcmp_ordered(">", u, _splat(t, 3.0)), _splat(t, 3.0), u)
    u = b.select(b.fcmp_ordered("<", u, _splat(t, -3.0)), _splat(t, -3.0), u)
    u2 = b.fmul(u, u)
    th = b.fdiv(b.fmul(u, b.fadd(_splat(t, 27.0), u2)),
                b.fadd(_splat(t, 27.0), b.fmul(_splat(t, 9.0), u2)))
    return b.fmul(b.fmul(_splat(t, 0.5), x), b.fadd(_splat(t, 1.0), th))


def _numpy_bias_gelu(c, bias):
    x = c + bias
    u = np.clip(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x), -3, 3)
    return np.float32(0.5) * x * (1 + u * (27 + u * u) / (27 + 9 * u * u))


_EPI_KERNEL = {}


def _fused_gemm(threads: int):
    """ctypes ``gelu(A @ B + bias)`` (float32, row-major) and its workspace."""
    if threads not in _EPI_KERNEL:
        import llvmlite.ir as ir

        from neural_arch.compiler.codegen.gemm import emit_gemm, gemm_workspace_bytes
        from neural_arch.runtime import jit

        module = ir.Module(name="fused")
        emit_gemm(module, "fused", "float32", extra_arg_types=[ir.PointerType()],
                  epilogue=bias_gelu_epilogue, parallel=threads if threads > 1 else False)
        loaded = jit.load(jit.optimize(str(module), "fused"))
        fn = loaded.function("fused", None, *([ctypes.c_void_p] * 3 + [ctypes.c_int64] * 8
                                              + [ctypes.c_void_p] * 2))
        _EPI_KERNEL[threads] = (loaded, fn, np.zeros(gemm_workspace_bytes("float32", threads), np.uint8))
    return _EPI_KERNEL[threads][1:]


def bench_epilogue(sizes=(512, 1024), threads=(1, 2), rounds: int = 3,
                   seconds: float = 0.2) -> list[dict]:
    """``gelu(x @ W + b)`` (float32, n x n): the fused kernel against our plain GEMM (the
    epilogue's cost) and against NumPy's matmul followed by the same epilogue in NumPy."""
    from neural_arch.compiler.codegen.gemm import compile_gemm

    pool_before = _pool(max(threads)).num_threads()
    rng = np.random.default_rng(1)
    rows = []
    try:
        for n in sizes:
            a = rng.standard_normal((n, n), dtype=np.float32)
            w = rng.standard_normal((n, n), dtype=np.float32) / np.float32(np.sqrt(n))
            bias = rng.standard_normal(n, dtype=np.float32)
            out = np.empty((n, n), np.float32)
            flops = 2.0 * n ** 3
            for t in threads:
                set_numpy_threads(t)
                _pool(t)
                fn, ws = _fused_gemm(t)
                plain = compile_gemm("float32", parallel=t if t > 1 else False)
                pws = plain.workspace()
                args = (a.ctypes.data, w.ctypes.data, out.ctypes.data, n, n, n, n, 1, n, 1, n,
                        ws.ctypes.data, bias.ctypes.data)
                fn(*args)
                ref = _numpy_bias_gelu((a.astype(np.float64) @ w.astype(np.float64)), bias)
                err = float(np.max(np.abs(out - ref)))
                if not err < 1e-3:
                    raise AssertionError(f"fused gemm wrong at n={n}: max err {err}")
                times = {"np": float("inf"), "plain": float("inf"), "fused": float("inf")}
                for _ in range(rounds):
                    times["np"] = min(times["np"], best_time(lambda: _numpy_bias_gelu(a @ w, bias),
                                                             min_total=seconds))
                    time.sleep(BLAS_SPIN_SECONDS)
                    times["plain"] = min(times["plain"], best_time(
                        lambda: plain.run(a, w, out, workspace=pws), min_total=seconds))
                    times["fused"] = min(times["fused"], best_time(lambda: fn(*args),
                                                                   min_total=seconds))
                rows.append(dict(size=n, threads=t, fused_gflops=flops / times["fused"] / 1e9,
                                 plain_gflops=flops / times["plain"] / 1e9,
                                 numpy_gflops=flops / times["np"] / 1e9,
                                 vs_plain=times["plain"] / times["fused"],
                                 vs_numpy=times["np"] / times["fused"]))
    finally:
        set_numpy_threads(len(_cpus()))
        _pool(pool_before)
    return rows


def format_epilogue(rows: list[dict]) -> str:
    head = (f"{'n':>6} {'thr':>3} {'fused GF/s':>11} {'plain GF/s':>11} {'numpy 2-step':>13} "
            f"{'fused/plain':>12} {'fused/numpy':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['size']:>6} {r['threads']:>3} {r['fused_gflops']:>11.1f} "
                     f"{r['plain_gflops']:>11.1f} {r['numpy_gflops']:>13.1f} "
                     f"{r['vs_plain']:>11.2f}x {r['vs_numpy']:>11.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--epilogue-sizes", type=int, nargs="*", default=[512, 1024])
    args = p.parse_args(argv)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            print(f"warning: {var}={os.environ[var]} is set; NumPy may run a slower kernel "
                  f"(run under `env -u {var}`)", file=sys.stderr)
    print(numpy_blas_info())
    peak = {t: measure_fma_peak(t) for t in args.threads}
    print("FMA peak (<8 x float>, measured): " +
          ", ".join(f"{t} thread{'s' if t > 1 else ''}: {g:.1f} GFLOP/s" for t, g in peak.items()))
    print(f"matmul {args.dtype}, square n x n, best of repeated runs:")
    print(format_matmul(bench_matmul(args.sizes, args.threads, args.dtype, peak)))
    if args.epilogue_sizes:
        print("gelu(x @ W + b), float32, n x n: fused epilogue vs plain GEMM vs NumPy in two steps:")
        print(format_epilogue(bench_epilogue(args.epilogue_sizes, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

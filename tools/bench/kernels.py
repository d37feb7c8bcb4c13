"""Kernel benchmarks, printed as ratios measured in the same run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python -m neural_arch.tools.bench.kernels

matmul: GFLOP/s of our gemm (compiler/codegen/gemm.py) against numpy.matmul (OpenBLAS) on
square float32 matrices, on 1 and 2 threads, and against the machine's FMA peak measured
here by a jit-compiled loop of independent ``<8 x float>`` FMAs.

Threads: our kernel is called on row ranges of C; the 2-thread run splits M in two at a
multiple of the micro-kernel's MR, runs one half on the calling thread and one on a
persistent worker thread, each pinned to its own core (unpinned threads are often packed
onto one core), each with its own workspace.  ctypes releases the GIL during the call.
NumPy's thread count is set through OpenBLAS's own ``set_num_threads`` when we can find it.
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


# Below this many flops per thread a second thread costs more (waking it: 60-120 us) than
# it saves; 8 MFLOP is ~85 us on one core.
MIN_FLOPS_PER_THREAD = 8e6


class RowSplitGemm:
    """Run the gemm on ``threads`` row ranges of C: the caller's thread takes the first,
    pinned workers the rest; each has its own workspace.  Small products (under
    ``min_flops`` per thread) run on the caller's thread alone."""

    def __init__(self, kernel, threads: int, min_flops: float = MIN_FLOPS_PER_THREAD):
        self.kernel, self.threads, self.min_flops = kernel, threads, min_flops
        cpus = _cpus()
        self.cpus = [cpus[i % len(cpus)] for i in range(threads)] if threads > 1 else []
        self.workers = [PinnedWorker(c) for c in self.cpus[1:]]
        self.workspaces = [np.zeros(kernel.workspace_bytes, np.uint8) for _ in range(threads)]

    def threads_for(self, M: int, N: int, K: int) -> int:
        """How many threads a product of this size runs on."""
        by_size = int(2.0 * M * N * K // self.min_flops) if self.min_flops > 0 else self.threads
        by_rows = -(-M // self.kernel.blocking.mr)
        return max(1, min(self.threads, by_size, by_rows))

    def ranges(self, M: int, threads: int) -> list[tuple[int, int]]:
        """``threads`` row ranges, cut at multiples of MR so only the last has an edge."""
        mr = self.kernel.blocking.mr
        cuts = [0] + [min(M, round(M * i / threads / mr) * mr) for i in range(1, threads)] + [M]
        return list(zip(cuts[:-1], cuts[1:]))

    def __call__(self, a, b, out):
        k = self.kernel
        (M, K), N = a.shape, b.shape[1]
        threads = self.threads_for(M, N, K)
        if threads == 1:
            k.run(a, b, out, workspace=self.workspaces[0])
            return out
        rs = self.ranges(M, threads)
        busy = self.workers[:threads - 1]
        for w, (m0, m1), ws in zip(busy, rs[1:], self.workspaces[1:]):
            w.submit(lambda m0=m0, m1=m1, ws=ws: k.run(a, b, out, m0, m1, ws))
        k.run(a, b, out, *rs[0], self.workspaces[0])
        for w in busy:
            w.wait()
        return out

    def __enter__(self):
        if self.cpus:
            self._saved = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {self.cpus[0]})
        return self

    def __exit__(self, *exc):
        if self.cpus:
            os.sched_setaffinity(0, self._saved)
        for w in self.workers:
            w.close()


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


def bench_matmul(sizes=(128, 256, 512, 1024, 2048), threads=(1, 2), dtype="float32",
                 peak: dict | None = None, check: bool = True, rounds: int = 3,
                 seconds: float = 0.2) -> list[dict]:
    """One row per (size, threads): our GFLOP/s, NumPy's, their ratio and our share of the
    FMA peak measured in this run.

    Each side is timed as the best of repeated calls, in ``rounds`` alternating blocks of
    about ``seconds`` each (NumPy, pause for its spinning workers, ours), so both see the
    same background load; the best block counts.
    """
    from neural_arch.compiler.codegen.gemm import compile_gemm

    kernel = compile_gemm(dtype)
    peak = dict(peak or {})
    for t in threads:
        if t not in peak:
            peak[t] = measure_fma_peak(t)
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
                with RowSplitGemm(kernel, t) as g:
                    if check:
                        ref = a.astype(np.float64) @ b.astype(np.float64)
                        out.fill(np.nan)
                        g(a, b, out)
                        err = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) or 1.0))
                        if not err < 1e-5:
                            raise AssertionError(f"gemm wrong at n={n}, threads={t}: rel err {err}")
                    t_np = t_us = float("inf")
                    for _ in range(rounds):
                        t_np = min(t_np, best_time(lambda: np.matmul(a, b), min_total=seconds))
                        time.sleep(BLAS_SPIN_SECONDS)
                        t_us = min(t_us, best_time(lambda: g(a, b, out), min_total=seconds))
                    used = g.threads_for(n, n, n)
                ours, ref_gf = flops / t_us / 1e9, flops / t_np / 1e9
                rows.append(dict(size=n, threads=t, threads_used=used, ours_gflops=ours,
                                 numpy_gflops=ref_gf, ratio=ours / ref_gf, peak_gflops=peak[t],
                                 peak_frac=ours / peak[t],
                                 numpy_threads=t if numpy_ok else None))
    finally:
        set_numpy_threads(len(_cpus()))
    return rows


def format_matmul(rows: list[dict]) -> str:
    head = (f"{'n':>6} {'thr':>3} {'used':>4} {'ours GF/s':>10} {'numpy GF/s':>11} "
            f"{'ours/numpy':>11} {'of peak':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['size']:>6} {r['threads']:>3} {r['threads_used']:>4} {r['ours_gflops']:>10.1f} "
                     f"{r['numpy_gflops']:>11.1f} {r['ratio']:>10.2f}x {r['peak_frac']:>7.0%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    p.add_argument("--dtype", default="float32")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

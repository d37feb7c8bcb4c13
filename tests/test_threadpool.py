import ctypes

import numpy as np

from neural_arch.runtime import jit, threadpool

_KERNEL = r"""
declare void @narch_parallel_for(ptr, ptr, i64)

define void @count_task(ptr %ctx, i64 %t) {
  %p = getelementptr i64, ptr %ctx, i64 %t
  %old = atomicrmw add ptr %p, i64 1 seq_cst
  ret void
}

define void @run_count(ptr %ctx, i64 %n) {
  call void @narch_parallel_for(ptr @count_task, ptr %ctx, i64 %n)
  ret void
}
"""


def _count_kernel():
    threadpool.install()
    loaded = jit.load(jit.optimize(_KERNEL, "tp_test"))
    return loaded, loaded.function("run_count", None, ctypes.c_void_p, ctypes.c_int64)


def test_install_idempotent():
    threadpool.install()
    a = threadpool.address()
    threadpool.install()
    assert threadpool.address() == a != 0
    assert threadpool.num_threads() >= 1


def test_every_task_runs_exactly_once():
    loaded, run = _count_kernel()
    for n in (0, 1, 2, 3, 17, 1000):
        counts = np.zeros(max(n, 1), np.int64)
        run(counts.ctypes.data, n)
        assert (counts[:n] == 1).all(), n

"""The native thread pool behind ``narch_parallel_for`` (runtime/threadpool.py)."""
import ctypes
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from neural_arch.runtime import jit, threadpool

# count_task: counts[t] += 1 (atomically, so a task run twice shows up as 2)
# nested_task: runs an inner parallel_for of 8 count tasks on counts[8*t : 8*t+8]
_KERNELS = r"""
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

define void @nested_task(ptr %ctx, i64 %t) {
  %base = mul i64 %t, 8
  %p = getelementptr i64, ptr %ctx, i64 %base
  call void @narch_parallel_for(ptr @count_task, ptr %p, i64 8)
  ret void
}

declare i64 @pthread_self()

define void @who_task(ptr %ctx, i64 %t) {
  %p = getelementptr i64, ptr %ctx, i64 %t
  %me = call i64 @pthread_self()
  store i64 %me, ptr %p
  ret void
}

define i64 @run_who(ptr %ctx, i64 %n) {
  call void @narch_parallel_for(ptr @who_task, ptr %ctx, i64 %n)
  %me = call i64 @pthread_self()
  ret i64 %me
}

define void @run_nested(ptr %ctx, i64 %n) {
  call void @narch_parallel_for(ptr @nested_task, ptr %ctx, i64 %n)
  ret void
}
"""

_kernels = None

# x86 only (MXCSR)
_ENV_KERNELS = r"""
declare void @narch_parallel_for(ptr, ptr, i64)
declare i64 @pthread_self()
; env_task: every task first waits (a bounded spin) until all n tasks have started, so that
; the worker takes part; then ctx[2 + 2t] = its thread, ctx[3 + 2t] = its MXCSR
; ctx: [0] = started counter, [1] = n
; run_env: runs n env tasks with the caller's MXCSR set to %mx, then restores it
declare void @llvm.x86.sse.stmxcsr(ptr)
declare void @llvm.x86.sse.ldmxcsr(ptr)

define void @env_task(ptr %ctx, i64 %t) {
entry:
  %s = atomicrmw add ptr %ctx, i64 1 seq_cst
  %np = getelementptr i64, ptr %ctx, i64 1
  %n = load i64, ptr %np
  br label %wait
wait:
  %k = phi i64 [ 0, %entry ], [ %k1, %wait ]
  %c = load atomic i64, ptr %ctx acquire, align 8
  %k1 = add i64 %k, 1
  %all = icmp sge i64 %c, %n
  %late = icmp sge i64 %k1, 200000000
  %go = or i1 %all, %late
  br i1 %go, label %record, label %wait
record:
  %i = mul i64 %t, 2
  %i2 = add i64 %i, 2
  %p = getelementptr i64, ptr %ctx, i64 %i2
  %me = call i64 @pthread_self()
  store i64 %me, ptr %p
  %q = getelementptr i64, ptr %p, i64 1
  store i64 0, ptr %q
  call void @llvm.x86.sse.stmxcsr(ptr %q)
  ret void
}

define i64 @run_env(ptr %ctx, i64 %n, i32 %mx) {
  %saved = alloca i32
  %new = alloca i32
  call void @llvm.x86.sse.stmxcsr(ptr %saved)
  store i32 %mx, ptr %new
  call void @llvm.x86.sse.ldmxcsr(ptr %new)
  call void @narch_parallel_for(ptr @env_task, ptr %ctx, i64 %n)
  call void @llvm.x86.sse.ldmxcsr(ptr %saved)
  %me = call i64 @pthread_self()
  ret i64 %me
}

"""


def kernels():
    global _kernels
    if _kernels is None:
        threadpool.install()
        loaded = jit.load(jit.optimize(_KERNELS, "tp_test"))
        sig = (None, ctypes.c_void_p, ctypes.c_int64)
        _kernels = (loaded, loaded.function("run_count", *sig), loaded.function("run_nested", *sig),
                    loaded.address("count_task"))
    return _kernels


def test_install_idempotent_and_thread_safe():
    results = []
    ts = [threading.Thread(target=lambda: results.append(threadpool.address())) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(set(results)) == 1 and results[0] != 0
    threadpool.install()
    assert threadpool.address() == results[0]
    assert 1 <= threadpool.num_threads() <= max(1, len(os.sched_getaffinity(0)))


def test_every_task_runs_exactly_once():
    _, run_count, _, _ = kernels()
    for n in (0, 1, 2, 3, 17, 1000, 100_000):
        counts = np.zeros(max(n, 1), np.int64)
        run_count(counts.ctypes.data, n)
        assert (counts[:n] == 1).all(), n
        if n == 0:
            assert counts[0] == 0


def test_caller_runs_a_prefix_of_the_tasks_and_workers_the_rest():
    """The caller claims from the front, workers from the back: on two threads each runs
    the same end of every job (what it wrote last kernel stays in its cache)."""
    loaded = kernels()[0]
    run_who = loaded.function("run_who", ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)
    for n in (2, 7, 64, 1000):
        for _ in range(20):
            who = np.zeros(n, np.int64)
            me = run_who(who.ctypes.data, n)
            mine = np.flatnonzero(who == me)
            assert (who != 0).all()
            assert mine.size == 0 or (mine == np.arange(mine.size)).all(), (n, mine)


@pytest.mark.skipif(not jit.target_machine().triple.startswith("x86_64"), reason="MXCSR is x86's")
def test_tasks_run_under_the_callers_mxcsr():
    """A job's tasks run under its caller's MXCSR on every thread (a program that flushes
    subnormals does so in its workers' tasks too), and the next job's caller's MXCSR
    replaces it."""
    if threadpool.num_threads() < 2:
        pytest.skip("one thread: no worker to check (NEURAL_ARCH_NUM_THREADS=1 or one CPU)")
    kernels()
    loaded = jit.load(jit.optimize(_ENV_KERNELS, "tp_env_test"))
    run_env = loaded.function("run_env", ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32)
    n, seen_worker = 2, {0x1F80: False, 0x1F80 | 0x8040: False}
    deadline = time.monotonic() + 20  # (each task waits for the others: the worker joins)
    while not all(seen_worker.values()) and time.monotonic() < deadline:
        for mx in seen_worker:
            buf = np.zeros(2 + 2 * n, np.int64)
            buf[1] = n
            me = run_env(buf.ctypes.data, n, mx)
            rec = buf[2:].reshape(n, 2)
            assert (rec[:, 0] != 0).all()
            # (the exception flags, bits 0-5, are sticky per thread: compare the rest)
            assert ((rec[:, 1] & ~0x3F) == mx).all(), (hex(mx), sorted({hex(v) for v in rec[:, 1]}))
            seen_worker[mx] |= bool((rec[:, 0] != me).any())
    assert all(seen_worker.values()), "the worker never joined a job"


def test_python_entry_point():
    _, _, _, count_task = kernels()
    counts = np.zeros(500, np.int64)
    threadpool.parallel_for(count_task, counts.ctypes.data, 500)
    assert (counts == 1).all()


def test_nested_calls_do_not_deadlock():
    _, _, run_nested, _ = kernels()
    counts = np.zeros(8 * 64, np.int64)
    run_nested(counts.ctypes.data, 64)
    assert (counts == 1).all()


def test_two_python_threads_at_once():
    _, run_count, run_nested, _ = kernels()
    errors = []

    def hammer(seed):
        rng = np.random.default_rng(seed)
        for _ in range(300):
            n = int(rng.integers(0, 200))
            counts = np.zeros(8 * max(n, 1), np.int64)
            if rng.random() < 0.5:
                run_count(counts.ctypes.data, n)
                ok = (counts[:n] == 1).all() and (counts[n:] == 0).all()
            else:
                run_nested(counts.ctypes.data, n)
                ok = (counts[:8 * n] == 1).all()
            if not ok:
                errors.append(n)

    ts = [threading.Thread(target=hammer, args=(s,)) for s in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in ts), "parallel_for deadlocked"
    assert errors == []


def test_restart_with_other_thread_counts():
    _, run_count, _, _ = kernels()
    before = threadpool.num_threads()
    try:
        for n in (1, 2, 3, before):
            got = threadpool.set_num_threads(n)
            assert got == n or not sys.platform.startswith("linux")
            counts = np.zeros(1000, np.int64)
            run_count(counts.ctypes.data, 1000)
            assert (counts == 1).all()
    finally:
        threadpool.set_num_threads(before)


def test_round_trip_latency():
    if threadpool.num_threads() < 2:
        pytest.skip("single-threaded pool")
    empty = threadpool.round_trip_ns(reps=20000)
    barrier = threadpool.round_trip_ns(reps=20000, barrier=True)
    print(f"\nparallel_for round trip: {empty:.0f} ns (empty tasks), {barrier:.0f} ns (every thread joins)")
    # generous bounds: the machine is shared; a spinning worker answers in well under 1 us
    assert empty < 50_000 and barrier < 200_000


_CHILD = textwrap.dedent("""
    import ctypes, os, sys, time
    import numpy as np
    sys.path.insert(0, {testdir!r})
    import test_threadpool as T
    from neural_arch.runtime import threadpool
    _, run_count, run_nested, _ = T.kernels()
    counts = np.zeros(4096, np.int64)
    run_count(counts.ctypes.data, 4096)
    assert (counts == 1).all()
    print("threads", threadpool.num_threads())
    if {fork}:
        pid = os.fork()
        if pid == 0:
            c = np.zeros(8 * 100, np.int64)
            run_nested(c.ctypes.data, 100)
            os._exit(0 if (c == 1).all() and threadpool.num_threads() == {threads} else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        print("fork ok")
    time.sleep({linger})   # exit while the workers spin (0) or sleep (0.05)
""")


@pytest.mark.parametrize("threads,fork,linger", [("", True, 0.0), ("", False, 0.05), ("1", False, 0.0),
                                                 ("3", True, 0.0)])
def test_fresh_process_threads_fork_and_exit(threads, fork, linger):
    env = dict(os.environ)
    env.pop("NEURAL_ARCH_NUM_THREADS", None)
    if threads:
        env["NEURAL_ARCH_NUM_THREADS"] = threads
    expect = int(threads) if threads else max(1, len(os.sched_getaffinity(0)))
    code = _CHILD.format(testdir=os.path.dirname(__file__), fork=fork, linger=linger, threads=expect)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert f"threads {expect}" in p.stdout
    if fork:
        assert "fork ok" in p.stdout


def test_bad_thread_count_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("NEURAL_ARCH_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="NEURAL_ARCH_NUM_THREADS"):
        threadpool._configured_threads()


def test_serial_holds_nest_and_leave_set_serial_alone():
    """serial_hold/serial_release (a training step's one-thread calls) add up and never undo
    a caller's own set_serial(True)."""
    try:
        threadpool.set_serial(True)
        threadpool.serial_hold()
        threadpool.serial_release()
        assert threadpool.serial()
        threadpool.set_serial(False)
        threadpool.serial_hold()
        threadpool.serial_hold()
        threadpool.serial_release()
        assert threadpool.serial()
        threadpool.serial_release()
        assert not threadpool.serial()
        with pytest.raises(RuntimeError, match="serial_release without serial_hold"):
            threadpool.serial_release()
    finally:
        threadpool.set_serial(False)


def test_the_pools_object_code_comes_from_the_disk_cache(monkeypatch, tmp_path):
    """Every process needs the pool before any program loads: its object code is cached
    like a program's (compiling it took 100-170 ms of a cached compile's critical path)."""
    from neural_arch.runtime.cache import default_cache
    monkeypatch.setenv("NEURAL_ARCH_CACHE_DIR", str(tmp_path))
    cache = default_cache()
    obj = threadpool._pool_object()
    assert (cache.hits, cache.misses, cache.stats["puts"]) == (0, 1, 1)
    assert threadpool._pool_object() == obj and cache.hits == 1
    [(_, header)] = list(cache.entries())
    assert header["key_parts"]["kind"] == "thread pool" and header["key_parts"]["ir"] == threadpool._pool_ir()
    assert header["key_parts"]["sources"] == threadpool._pool_sources()  # (jit.py's optimisation is in it)
    monkeypatch.setenv("NEURAL_ARCH_CACHE", "0")
    assert threadpool._pool_object() == obj  # (compiled again: the same code)

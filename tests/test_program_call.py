"""Program.__call__: the per-call path keeps the data pointers of inputs passed again (the
parameters and optimizer state of a training step), and still notices every change that
matters: new values in the same array, a new array, an array reshaped in place, a read-only
array updated in place."""
import time

import numpy as np
import pytest

from neural_arch.compiler import functional as F, trace
from neural_arch.compiler.ir import TensorType
from neural_arch.runtime.program import Program

T = TensorType((4, 8))


def program(inplace=None):
    g = trace(lambda x, w: (x * w + 1.0, w * 0.5, F.exp(x).sum()), T, T)
    return Program(g, options={"inplace": inplace or {}})


def test_same_array_new_values_and_new_arrays_are_read():
    p = program()
    rng = np.random.default_rng(0)
    x, w = (rng.standard_normal((4, 8)).astype(np.float32) for _ in range(2))
    for _ in range(2):
        a, b, s = p(x, w)
        np.testing.assert_allclose(a, x * w + 1, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(s, np.exp(x).sum(), rtol=1e-5)
        x[...] = rng.standard_normal((4, 8))  # same object, new values
    assert p._last_inputs[0] is x  # kept: its pointer was not fetched again
    x2 = x + 1.0  # a new array
    a, _, _ = p(x2, w)
    np.testing.assert_allclose(a, x2 * w + 1, rtol=1e-6, atol=1e-6)
    assert p._last_inputs[0] is x2
    a, _, _ = p(x, w)  # and back
    np.testing.assert_allclose(a, x * w + 1, rtol=1e-6, atol=1e-6)


def test_array_reshaped_in_place_is_checked_again():
    p = program()
    x, w = np.ones((4, 8), np.float32), np.ones((4, 8), np.float32)
    p(x, w)
    x.shape = (8, 4)  # same object, same data, another shape of the same size: accepted as a view
    a, _, _ = p(x, w)
    np.testing.assert_array_equal(a, np.full((4, 8), 2.0, np.float32))
    with pytest.raises(TypeError, match="expects a C-contiguous"):
        p(x.reshape(32)[::2], w)  # not C-contiguous
    with pytest.raises(TypeError, match="expects a C-contiguous"):
        p(x.astype(np.float64), w)


def test_outputs_written_over_inputs_and_returned_twice():
    def f(x, w):
        y = x + 1.0
        return w * 0.5, y, y
    g = trace(f, T, T)
    p = Program(g, options={"inplace": {0: 1}})
    assert p.inplace == {0: 1} and g.outputs[1] == g.outputs[2]
    x = np.arange(32, dtype=np.float32).reshape(4, 8)
    for k in range(3):
        w = np.full((4, 8), 8.0, np.float32)
        h, a, b = p(x, w)
        assert h is w and np.all(w == 4.0)
        np.testing.assert_array_equal(a, x + 1)
        np.testing.assert_array_equal(b, x + 1)
        assert a is not b  # one value returned twice: the second is a copy
    w.flags.writeable = False  # the same array, now read-only: refused before anything runs
    with pytest.raises(TypeError, match="updated in place"):
        p(x, w)
    assert np.all(w == 4.0)


def test_zero_d_inputs_passed_as_one_element_arrays():
    g = trace(lambda s, x: x * s, TensorType((), "float32"), T)
    p = Program(g)
    x = np.ones((4, 8), np.float32)
    s = np.array([3.0], np.float32)  # what np.ascontiguousarray makes of a 0-d array
    for v in (3.0, 5.0):
        s[0] = v
        (out,) = p(s, x)
        assert np.all(out == v)
    # the object passed is what is remembered (not a fresh reshaped view each call)
    assert p._last_inputs[0] is s and p._accepted[0].shape == ()


def test_in_place_output_follows_its_input_to_a_new_array():
    """An output written over an input takes that input's pointer when the input changes
    (and only then): a new array for the updated input, the other input kept."""
    g = trace(lambda x, w: (w * 0.5 + x,), T, T)
    p = Program(g, options={"inplace": {0: 1}})
    assert p.inplace == {0: 1}
    x = np.ones((4, 8), np.float32)
    w1, w2 = np.full((4, 8), 4.0, np.float32), np.full((4, 8), 8.0, np.float32)
    for w, want in [(w1, 3.0), (w1, 2.5), (w2, 5.0), (w1, 2.25)]:
        (out,) = p(x, w)
        assert out is w and np.all(w == want)
    assert np.all(w2 == 5.0)


def test_two_threads_call_a_fresh_program_at_once():
    """The per-program call plan is made under the call lock: threads racing on the first
    calls, each with its own arrays, all get their own results."""
    import threading
    p = program()
    rng = np.random.default_rng(1)
    data = [(rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal((4, 8)).astype(np.float32))
            for _ in range(4)]
    errors = []

    def run(x, w):
        try:
            for _ in range(200):
                a, b, s = p(x, w)
                np.testing.assert_allclose(a, x * w + 1, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(b, w * 0.5, rtol=1e-6)
        except Exception as e:  # reported below, from the main thread
            errors.append(e)
    threads = [threading.Thread(target=run, args=xw) for xw in data]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_out_arrays_are_written_and_checked():
    """``out=``: the computed outputs land in the caller's arrays (the same objects come
    back, equal to a call without them); ``output_arrays()`` makes a fitting set; a wrong
    count, shape, dtype, layout or a read-only array is refused naming the output."""
    g = trace(lambda a, b: (a * b + 1.0, (a - b).sum()), TensorType((4, 5)), TensorType((4, 5)))
    prog = Program(g)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((4, 5)).astype(np.float32) for _ in range(2))
    want = prog(a, b)
    outs = prog.output_arrays()
    assert [(o.shape, o.dtype) for o in outs] == [((4, 5), np.float32), ((), np.float32)]
    for _ in range(2):  # the same arrays again
        got = prog(a, b, out=outs)
        assert all(x is y for x, y in zip(got, outs))
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y)
    name = g.outputs[0]
    bad = [np.zeros((5, 4), np.float32), np.zeros((4, 5), np.float64),
           np.zeros((4, 10), np.float32)[:, ::2], [[0.0] * 5] * 4]
    ro = np.zeros((4, 5), np.float32)
    ro.flags.writeable = False
    for first in bad + [ro]:
        with pytest.raises(TypeError, match=f"out= array for %{name} must be a writeable C-contiguous"):
            prog(a, b, out=[first, outs[1]])
    with pytest.raises(TypeError, match="out= needs 2 arrays, got 1"):
        prog(a, b, out=outs[:1])


def test_run_inplace_and_run_fixed_return_only_the_fresh_outputs():
    """run_inplace is __call__ returning only the outputs computed into fresh arrays;
    run_fixed reruns on the last call's inputs except the first ones, which it is given (a
    training step's scalars and batch), and can write its fresh outputs into ``out``."""
    g = trace(lambda x, w: (F.exp(x).sum(), w * 0.5), T, T)
    p = Program(g, options={"inplace": {1: 1}})
    assert p.inplace == {1: 1} and p.fresh_outputs() == (g.outputs[0],)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    w = np.full((4, 8), 8.0, np.float32)
    with pytest.raises(RuntimeError, match="needs a previous call"):
        p.run_fixed(x)
    (s,) = p.run_inplace(x, w)
    np.testing.assert_allclose(s, np.exp(x).sum(), rtol=1e-5)
    np.testing.assert_array_equal(w, 4.0)  # updated in place
    x2 = x + 1.0
    out = [np.empty((), np.float32)]
    for k in range(2):  # w is the last call's array, not looked at again
        (s2,) = p.run_fixed(x2, out=out)
        assert s2 is out[0]
        np.testing.assert_allclose(s2, np.exp(x2).sum(), rtol=1e-5)
        np.testing.assert_array_equal(w, 2.0 / 2 ** k)
    x2[0, 0] = 5.0  # new values in the same array are read
    (s3,) = p.run_fixed(x2)
    np.testing.assert_allclose(s3, np.exp(x2).sum(), rtol=1e-5)
    with pytest.raises(TypeError, match="expects a C-contiguous"):
        p.run_fixed(x2.astype(np.float64))
    with pytest.raises(TypeError, match="out= array"):
        p.run_fixed(x2, out=[np.empty((2,), np.float32)])
    with pytest.raises(TypeError, match="takes 2 inputs, got 3"):
        p.run_fixed(x2, w, w)


def test_a_non_array_input_and_a_short_out_list_are_refused():
    p = program()
    w = np.ones((4, 8), np.float32)
    with pytest.raises(TypeError, match="expects a C-contiguous"):
        p(None, w)  # (before any call: nothing to compare it with)
    x = np.ones((4, 8), np.float32)
    p(x, w)
    with pytest.raises(TypeError, match="expects a C-contiguous"):
        p([[1.0] * 8] * 4, w)
    with pytest.raises(RuntimeError, match="needs a previous call"):
        p.run_fixed(x)  # the failed call left the inputs half taken
    p(x, w)
    out = p.output_arrays()
    p.run_fixed(x, out=out)
    with pytest.raises(TypeError, match="out= needs 3 arrays, got 2"):
        p.run_fixed(x, out=out[:2])
    with pytest.raises(TypeError, match="out= needs 3 arrays, got 4"):
        p.run_fixed(x, out=out + [out[0]])


@pytest.mark.skipif(not __import__("platform").machine() in ("x86_64", "AMD64"), reason="MXCSR is x86's")
def test_flush_denormals_on_every_thread_and_only_during_the_call():
    """``flush_denormals``: subnormal results become 0 (FTZ) and subnormal inputs count as 0
    (DAZ) in every task of the call; the caller's floating-point environment is back when the
    call returns, normally or with an error.  (That a worker runs a job's tasks under the
    caller's MXCSR is tested directly in test_threadpool.py; here the worker takes whatever
    part it joins in time for of a 1M-element kernel's tasks.)"""
    n = 1 << 20  # a parallel kernel: tasks on the worker too
    T1 = TensorType((n,))
    idx_t = TensorType((4,), "int64")
    g = trace(lambda x, s, i: (x * 1e-30, s * 1e30, F.gather(x, i)), T1, T1, idx_t)
    flush, plain = Program(g, options={"flush_denormals": True}), Program(g)
    x = np.full(n, 1e-10, np.float32)  # x * 1e-30: 1e-40, subnormal
    s = np.full(n, 1e-40, np.float32)  # subnormal input: * 1e30 is 1e-10, or 0 if it counts as 0
    i = np.arange(4)
    tiny, sub = np.float32(1e-38), np.float32(10.0)
    a, b, _ = plain(x, s, i)
    assert (a > 0).all() and (a < np.finfo(np.float32).tiny).all()
    np.testing.assert_allclose(b, 1e-10, rtol=1e-3)
    a, b, _ = flush(x, s, i)
    assert not a.any() and not b.any()
    assert tiny / sub > 0  # NumPy on this thread: subnormals again after the call
    a, b, _ = plain(x, s, i)  # and in the plain program's tasks, the worker's included
    assert (a > 0).all() and (b > 0).all()
    with pytest.raises(IndexError):
        flush(x, s, np.array([0, 1, 2, n]))
    assert tiny / sub > 0  # restored on the error path too
    a, _, _ = plain(x, s, i)
    assert (a > 0).all()


def _spin(us):
    end = time.perf_counter_ns() + int(us * 1000)
    while time.perf_counter_ns() < end:
        pass


def test_thread_choice_follows_the_faster_mode_and_probes_less_when_it_loses():
    """``adapt_threads``: calls run on one thread while that measures faster, probing the
    other mode now and then (less often the more it loses), and come back when it wins."""
    from neural_arch.runtime import threadpool
    from neural_arch.runtime.program import ThreadChoice
    speed = {True: 200, False: 600}  # us per call: one thread faster
    modes = []

    def entry(ptrs):
        one = threadpool.serial()
        modes.append(one)
        _spin(speed[one])
        return 0
    choice = ThreadChoice(entry)
    try:
        for _ in range(ThreadChoice.INTERVAL_MIN + ThreadChoice.PROBE):
            assert choice(None) == 0
        assert choice.one and choice.switches == 1 and not threadpool.serial()
        n0 = len(modes)
        for _ in range(400):
            choice(None)
        on_all = modes[n0:].count(False)
        # probes of the losing mode (3x slower): after 32 calls, then 128, then 512
        assert choice.one and 0 < on_all <= 2 * ThreadChoice.PROBE, on_all
        speed[False] = 100  # now all threads win: back at the next probe
        for _ in range(1024):
            choice(None)
            if not choice.one:
                break
        assert not choice.one and choice.switches == 2
        for _ in range(2 * ThreadChoice.INTERVAL_MAX // 3):  # (probes back off again)
            choice(None)
        speed[False] = 800  # a new phase: noticed within a window or two, not 2048 calls
        for k in range(4 * ThreadChoice.WINDOW):
            choice(None)
            if choice.one:
                break
        assert choice.one and choice.switches == 3, k
    finally:
        threadpool.set_serial(False)


def test_a_program_computes_the_same_on_one_thread_and_on_all():
    """What lets ``adapt_threads`` switch freely: every kernel splits its work the same way
    whether its tasks run on one thread or on several (the MLP benchmark's training step:
    parallel GEMMs, 2-64 task loops, column sums, the cross entropy's grand total)."""
    from neural_arch.runtime import threadpool
    from neural_arch.tools.bench.train import bench_step_graph
    g, inputs, options = bench_step_graph("mlp")
    p = Program(g, options={"flush_denormals": True})
    assert any(k.tasks > 1 for k in p.kernels) and any(k.externals for k in p.kernels)
    outs = {}
    try:
        for one in (False, True):
            threadpool.set_serial(one)
            outs[one] = p(*[np.array(a, copy=True) for a in inputs])
    finally:
        threadpool.set_serial(False)
    for a, b in zip(outs[False], outs[True]):
        assert a.tobytes() == b.tobytes()
    assert Program(g, options=options).thread_choice is not None or threadpool.num_threads() == 1


def test_thread_choice_leaves_the_users_serial_switch_and_checks_two_threads_each_second():
    """On one thread, all threads are probed at least every ONE_THREAD_PROBE_S seconds (the
    end of a slow phase is noticed however long the backed-off interval); its one-thread
    calls hold the pool serial without undoing a user's own set_serial(True)."""
    from neural_arch.runtime import threadpool
    from neural_arch.runtime.program import ThreadChoice
    modes = []

    def entry(ptrs):
        modes.append(threadpool.serial())
        _spin(300 if modes[-1] else 900)
        return 0
    choice = ThreadChoice(entry)
    choice.ONE_THREAD_PROBE_S = 0.05
    try:
        for _ in range(ThreadChoice.INTERVAL_MIN + ThreadChoice.PROBE + 200):
            choice(None)
        assert choice.one
        n0 = len(modes)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.3:
            choice(None)
        # ~0.3 s at 300 us a call is ~1000 calls: the backed-off interval alone would not
        # have probed more than once or twice; the clock did every 0.05 s
        assert modes[n0:].count(False) >= 3 * ThreadChoice.PROBE - 1, modes[n0:].count(False)
        threadpool.set_serial(True)
        choice(None)
        assert threadpool.serial()
    finally:
        threadpool.set_serial(False)
    assert not threadpool.serial()

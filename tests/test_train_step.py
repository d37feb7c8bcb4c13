"""compile_train_step: one program for forward, backward, clipping and update; its losses and
parameters equal the eager training loop's."""
import numpy as np
import pytest

from neural_arch.compiler import Tensor, functional as F
from neural_arch.models import GPT2, GPT2Config, compile_train_step, nn, optim

RNG = np.random.default_rng(0)


def mlp():
    nn.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3))


def mlp_loss(model, x, y):
    return F.cross_entropy(model(x), y)


def eager_losses(model, opt, batches, clip=None, loss_fn=mlp_loss):
    out = []
    for batch in batches:
        opt.zero_grad()
        loss = loss_fn(model, *map(Tensor, batch))
        loss.backward()
        if clip is not None:
            optim.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        out.append(float(loss.item()))
    return out


BATCHES = [(RNG.standard_normal((8, 6)).astype(np.float32), RNG.integers(0, 3, 8)) for _ in range(5)]


@pytest.mark.parametrize("make_opt", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
                                      lambda ps: optim.AdamW(ps, lr=0.01, weight_decay=0.1),
                                      lambda ps: optim.Adam(ps, lr=0.01)])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_interpreted_train_step_equals_eager(make_opt, clip):
    m1, m2 = mlp(), mlp()
    o1, o2 = make_opt(m1.parameters()), make_opt(m2.parameters())
    want = eager_losses(m1, o1, BATCHES, clip)
    step = compile_train_step(m2, mlp_loss, o2, *BATCHES[0], clip_norm=clip, backend="interpreter")
    got = [step(x, y) for x, y in BATCHES]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-4, atol=1e-5, err_msg=n)
    st1, st2 = o1.state_for(m1.parameters()[0]), o2.state_for(m2.parameters()[0])
    assert st1["step"] == st2["step"] == len(BATCHES)


def test_graph_has_param_state_and_runtime_inputs():
    model = mlp()
    opt = optim.AdamW(model.parameters(), lr=0.01)
    step = compile_train_step(model, mlp_loss, opt, *BATCHES[0], backend="interpreter")
    kinds = {}
    for i in step.graph.inputs:
        kinds.setdefault(i.kind, []).append(i.name)
    assert kinds["arg"][:3] == ["lr", "step", "seed"]
    assert kinds["param"] == [n for n, _ in model.named_parameters()]
    assert kinds["state"][:2] == ["0.weight.exp_avg", "0.weight.exp_avg_sq"]
    assert len(step.graph.outputs) == 1 + 2 * 0 + len(kinds["param"]) + len(kinds["state"])
    # changing the learning rate between steps needs no new program
    g = step.graph
    opt.lr = 0.5
    step(*BATCHES[1])
    assert step.graph is g


def test_batch_inputs_are_named_and_a_name_collision_is_an_error():
    model = mlp()
    opt = optim.SGD(model.parameters(), lr=0.1)
    step = compile_train_step(model, mlp_loss, opt, *BATCHES[0], backend="interpreter")
    assert list(step.graph.input_names[:5]) == ["lr", "step", "seed", "batch0", "batch1"]

    class Scaled(nn.Module):  # a parameter called "lr" would be a second input called "lr"
        def __init__(self):
            super().__init__()
            self.lr = nn.Parameter(np.ones(3, np.float32))

        def forward(self, x):
            return x * self.lr

    m = Scaled()
    with pytest.raises(ValueError, match="collide.*lr"):
        compile_train_step(m, lambda m, x: m(x).sum(), optim.SGD(m.parameters(), lr=0.1),
                           np.ones(3, np.float32), backend="interpreter")


def test_pool_is_installed_on_a_helper_thread_while_tracing(tmp_path):
    """compile_train_step starts the native thread pool's one-time setup on a helper thread
    before it traces: in a fresh process the pool is installed without the main thread
    asking for it (a fork meanwhile waits for it), and a bad NEURAL_ARCH_NUM_THREADS still
    fails the compile, in its thread."""
    import os
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import os, threading
        from neural_arch.runtime import program, threadpool
        assert threadpool._loaded is None
        program.install_pool_in_background()
        pid = os.fork()  # waits for the helper: the child never holds a half-installed pool
        if pid == 0:
            os._exit(0 if threadpool._loaded is not None or os.environ.get("NEURAL_ARCH_NUM_THREADS") else 3)
        assert os.waitpid(pid, 0)[1] == 0
        for t in threading.enumerate():
            if t.name == "narch-pool-install":
                t.join()
        print("installed", threadpool._loaded is not None)
        import numpy as np
        from neural_arch.compiler import functional as F
        from neural_arch.models import compile_train_step, nn, optim
        m = nn.Linear(4, 2)
        x, y = np.ones((3, 4), np.float32), np.array([0, 1, 1])
        step = compile_train_step(m, lambda m, x, y: F.cross_entropy(m(x), y), optim.SGD(m.parameters(), lr=0.1), x, y)
        print("loss", step(x, y) > 0)
    """)
    env = dict(os.environ, NEURAL_ARCH_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["installed", "True", "loss", "True"]
    env["NEURAL_ARCH_NUM_THREADS"] = "zero"
    r = subprocess.run([sys.executable, "-c", code.replace('print("installed"', 'print("tried"')],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stdout.split() == ["tried", "False"]
    assert "ValueError: NEURAL_ARCH_NUM_THREADS must be a positive integer" in r.stderr
    assert "Exception in thread" not in r.stderr


def test_gpt2_train_step_with_dropout_runs_and_learns():
    cfg = GPT2Config(vocab_size=11, n_positions=8, n_embd=16, n_layer=1, n_head=2, dropout=0.1)
    nn.manual_seed(0)
    model = GPT2(cfg)
    opt = optim.AdamW(model.parameters(), lr=3e-3)

    def loss_fn(m, x, y):
        return m(x, y)[1]
    x = np.tile(np.arange(8) % 11, (4, 1))
    y = (x + 1) % 11
    step = compile_train_step(model, loss_fn, opt, x, y, backend="interpreter")
    losses = [step(x, y) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]
    assert any(n.op == "rng_uniform" for n in step.graph.nodes)


@pytest.mark.parametrize("make_opt", [lambda ps: optim.SGD(ps, lr=0.1),
                                      lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
                                      lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
                                      lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.05),
                                      lambda ps: optim.AdamW(ps, lr=0.01)],
                         ids=["sgd", "sgd-momentum", "sgd-nesterov-l2", "adam-l2", "adamw"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_compiled_train_step_equals_eager(make_opt, clip):
    """Each optimizer compiled into the step (LLVM) against the eager loop: losses and
    parameters after 5 steps, and the optimizer state (the first step's bias corrections
    are computed in float64 in both, so Adam's early updates agree closely too)."""
    m1, m2 = mlp(), mlp()
    o1, o2 = make_opt(m1.parameters()), make_opt(m2.parameters())
    want = eager_losses(m1, o1, BATCHES, clip)
    step = compile_train_step(m2, mlp_loss, o2, *BATCHES[0], clip_norm=clip, backend="llvm")
    got = [step(x, y) for x, y in BATCHES]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-4, atol=2e-6, err_msg=n)
        s1, s2 = o1.state_for(a), o2.state_for(b)
        assert sorted(s1) == sorted(s2) and s1["step"] == s2["step"] == len(BATCHES)
        for key in o1.state_names:
            np.testing.assert_allclose(s1[key].data, s2[key].data, rtol=1e-4, atol=1e-6, err_msg=f"{n}.{key}")


def test_compiled_step_updates_parameters_and_state_in_place():
    """The program writes new parameters and optimizer state over the arrays it read: the
    model's and optimizer's arrays stay the same objects (nothing is allocated per step)."""
    model = mlp()
    opt = optim.AdamW(model.parameters(), lr=0.01)
    step = compile_train_step(model, mlp_loss, opt, *BATCHES[0], clip_norm=0.5)
    prog = step.runtime_program
    n_params = len(model.parameters())
    assert len(prog.inplace) == 3 * n_params and not prog.inplace_refused
    step(*BATCHES[0])  # the first call creates the optimizer state
    arrays = [p.data for p in model.parameters()]
    states = [opt.state_for(p)["exp_avg"].data for p in model.parameters()]
    before = [a.copy() for a in arrays]
    step(*BATCHES[1])
    assert all(p.data is a for p, a in zip(model.parameters(), arrays))
    assert all(opt.state_for(p)["exp_avg"].data is s for p, s in zip(model.parameters(), states))
    assert all(not np.array_equal(a, b) for a, b in zip(arrays, before))


def test_inplace_pairs_are_checked():
    from neural_arch.compiler import trace
    from neural_arch.compiler.ir import TensorType
    from neural_arch.runtime.program import Program
    t = TensorType((16, 16))
    # read through a transpose: element (i, j) of the output needs input (j, i): refused
    g = trace(lambda x, y: (F.transpose(x, 1, 0) + y, y * 2.0), t, t)
    p = Program(g, options={"inplace": {0: 0, 1: 1}})
    assert p.inplace == {1: 1} and "transpose" in p.inplace_refused[g.outputs[0]]
    x = np.arange(256, dtype=np.float32).reshape(16, 16)
    y = np.ones((16, 16), np.float32)
    a, b = p(x.copy(), y)
    np.testing.assert_array_equal(a, x.T + 1)
    assert b is y and np.all(y == 2.0)
    # another kernel reads the input: the writer runs after it, so it sees the old values
    g2 = trace(lambda x: (x * 3.0, F.exp(x).sum(axis=0)), t)
    p2 = Program(g2, options={"inplace": {0: 0}})
    assert p2.inplace == {0: 0}
    x2 = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    want = np.exp(x2).sum(axis=0)
    arr = x2.copy()
    new, s = p2(arr)
    assert new is arr
    np.testing.assert_allclose(new, 3 * x2, rtol=1e-6)
    np.testing.assert_allclose(s, want, rtol=1e-5)
    # a column sum over an input its kernel reads for another output: the kernel stores the
    # sum first, so the other output would read the sum: refused (an elementwise output of
    # the same kernel over that input, as an optimizer's update, is fine)
    g3 = trace(lambda x, b: (x.sum(axis=0), x.sum(axis=0) * b), TensorType((1000, 130)), TensorType((130,)))
    for serial in (False, True):
        p3 = Program(g3, options={"inplace": {0: 1}, "serial": serial})
        assert p3.inplace == {} and "is a reduction, stored before" in p3.inplace_refused[g3.outputs[0]]
        x3 = np.random.default_rng(1).standard_normal((1000, 130)).astype(np.float32)
        b3 = np.random.default_rng(2).standard_normal(130).astype(np.float32)
        s3, y3 = p3(x3, b3.copy())
        np.testing.assert_allclose(y3, s3 * b3, rtol=1e-5)
    g4 = trace(lambda x, b: (x.sum(axis=0) * b,), TensorType((1000, 130)), TensorType((130,)))
    assert Program(g4, options={"inplace": {0: 1}}).inplace == {0: 1}


def _inplace_entries(directory):
    from neural_arch.runtime.cache import ObjectCache
    return [h["key_parts"] for _, h in ObjectCache(directory).entries()
            if h["key_parts"].get("kind") == "in-place pairs"]


def test_inplace_decision_is_cached_by_request(monkeypatch, tmp_path, capsys):
    """The in-place check runs the fusion plan; a cached compile reads its answer from the
    disk cache instead, keyed by the graph and the pairs asked for: the answer read back is
    the one computed, a planted answer is what a hit returns (so the entry is really read),
    another request misses it, and an entry answering other pairs is recomputed."""
    import json
    from neural_arch.compiler import trace
    from neural_arch.compiler.ir import TensorType
    from neural_arch.compiler.passes import fingerprint
    from neural_arch.runtime.cache import ObjectCache
    from neural_arch.runtime.program import Program, clear_memory_cache, inplace_pairs
    monkeypatch.setenv("NEURAL_ARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("NEURAL_ARCH_CACHE", "1")
    t = TensorType((16, 16))
    g = trace(lambda x, y: (F.transpose(x, 1, 0) + y, y * 2.0), t, t)
    clear_memory_cache()
    p1 = Program(g, options={"inplace": {0: 0, 1: 1}})
    out0, out1 = p1.graph.outputs
    x, y = (i.name for i in p1.graph.inputs)
    entries = _inplace_entries(tmp_path)
    assert [e["wanted"] for e in entries] == [[[out0, x], [out1, y]]]
    assert entries[0]["passes"] == fingerprint()
    accepted, refused = inplace_pairs(p1.graph, {out0: x, out1: y})
    assert accepted == {out1: y} and p1.inplace == {1: 1} and p1.inplace_refused == refused
    clear_memory_cache()
    p2 = Program(g, options={"inplace": {0: 0, 1: 1}})  # from the cache: the same answer
    assert (p2.inplace, p2.inplace_refused) == (p1.inplace, p1.inplace_refused)
    cache = ObjectCache(tmp_path)
    cache.put(entries[0], json.dumps({"accepted": [], "refused": [[out0, "planted"], [out1, "planted"]]}).encode())
    clear_memory_cache()
    p3 = Program(g, options={"inplace": {0: 0, 1: 1}})
    assert p3.inplace == {} and p3.inplace_refused == {out0: "planted", out1: "planted"}
    p4 = Program(g, options={"inplace": {1: 1}})  # another request: computed, stored apart
    assert p4.inplace == {1: 1} and not p4.inplace_refused
    assert len(_inplace_entries(tmp_path)) == 2
    # an entry that answers pairs nobody asked for is not trusted: recomputed and replaced
    cache.put(entries[0], json.dumps({"accepted": [[out0, y]], "refused": [[out1, "x"]]}).encode())
    capsys.readouterr()
    p5 = Program(g, options={"inplace": {0: 0, 1: 1}})
    assert (p5.inplace, p5.inplace_refused) == (p1.inplace, p1.inplace_refused)
    assert "ignoring cached in-place pairs" in capsys.readouterr().err
    assert json.loads(cache.get(entries[0])) == {"accepted": [[out1, y]], "refused": [[out0, refused[out0]]]}


def test_compiled_step_feeds_the_same_arrays_each_step():
    """The native step passes the learning rate, step number and seed through the same three
    0-d arrays every call (the program keeps every input's data pointer), and still sees a
    new learning rate, a parameter array replaced by the user, a non-contiguous batch and a
    replaced optimizer moment."""
    m1, m2 = mlp(), mlp()
    o1, o2 = optim.AdamW(m1.parameters(), lr=0.01), optim.AdamW(m2.parameters(), lr=0.01)
    ref = compile_train_step(m1, mlp_loss, o1, *BATCHES[0], backend="interpreter")
    step = compile_train_step(m2, mlp_loss, o2, *BATCHES[0])
    prog = step.runtime_program
    seen = None
    for k, (x, y) in enumerate(BATCHES):
        o1.lr = o2.lr = 0.01 * (k + 1)
        if k == 2:  # the user replaces a parameter's array
            for m in (m1, m2):
                m.parameters()[0].data = m.parameters()[0].data * 0.5
        if k == 3:
            x = np.asfortranarray(x)
        if k == 4:  # the user replaces a moment of the optimizer's state
            for m, o in ((m1, o1), (m2, o2)):
                st = o.state_for(m.parameters()[1])
                st["exp_avg"] = Tensor(np.asfortranarray(st["exp_avg"].data * 0.25))
        np.testing.assert_allclose(step(x, y), ref(x, y), rtol=1e-4, atol=1e-5)
        if seen is not None:
            assert all(a is b for a, b in zip(prog._last_inputs[:3], seen))
        seen = list(prog._last_inputs[:3])
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-3, atol=1e-5, err_msg=n)


def test_compiled_step_reruns_on_unchanged_arrays_and_sees_every_replacement():
    """Once a step has updated every parameter and state array in place, the next ones run the
    program on them without looking at them (Program.run_fixed) while nothing replaced any
    (compiler.tensor.data_generation); values changed in place, a replaced parameter array, a
    replaced moment, a replaced state dict, a plain dict in its place and changes to it are
    all seen, and each parameter's step count advances."""
    from neural_arch.compiler.tensor import data_generation

    def train(backend):
        m = mlp()
        o = optim.AdamW(m.parameters(), lr=0.01)
        step = compile_train_step(m, mlp_loss, o, *BATCHES[0], backend=backend)
        losses, fast = [], []
        for k in range(9):
            x, y = BATCHES[k % len(BATCHES)]
            p0, p1 = m.parameters()[0], m.parameters()[1]
            if k == 2:
                p0.data[...] *= 0.5  # in place: no replacement
            if k == 3:
                p0.data = p0.data * 0.5
            if k == 4:
                o.state_for(p1)["exp_avg_sq"] = Tensor(o.state_for(p1)["exp_avg_sq"].data * 2.0)
            if k == 5:  # a new state dict for a parameter, a plain one
                o.state[id(p1)] = {key: (Tensor(v.data.copy()) if isinstance(v, Tensor) else v)
                                   for key, v in o.state_for(p1).items()}
            if k == 6:  # the plain dict changes without counting: the step must not trust it
                o.state_for(p1)["exp_avg"] = Tensor(o.state_for(p1)["exp_avg"].data * 0.5)
            if k == 7:  # back to a counting dict
                o.state[id(p1)] = optim.StateDict(o.state_for(p1))
            fast.append(step.__dict__.get("_fast") is not None and step._fast[0] == data_generation())
            losses.append(step(x, y))
            assert [o.state_for(p)["step"] for p in m.parameters()] == [k + 1] * len(m.parameters())
        return losses, fast, m

    # (one after the other: the interpreted step replaces the arrays every step, which the
    # compiled one, run in between, would see as replacements)
    want, _, m1 = train("interpreter")
    got, fast, m2 = train("llvm")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert fast == [False, True, True, False, False, False, False, False, True]
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-3, atol=1e-5, err_msg=n)


def test_state_dicts_count_their_changes():
    from neural_arch.compiler.tensor import data_generation
    st = optim.AdamW(mlp().parameters()).state
    inner = next(iter(st.values()))
    assert type(st) is optim.StateDict and type(inner) is optim.StateDict
    changes = [lambda: inner.__setitem__("exp_avg", inner["exp_avg"]), lambda: inner.update(step=3),
               lambda: inner.setdefault("x", 1), lambda: inner.pop("x"), lambda: inner.__ior__({"y": 2}),
               lambda: inner.__delitem__("y"), lambda: inner.popitem(), lambda: st.clear()]
    for change in changes:
        g = data_generation()
        change()
        assert data_generation() > g
    t = Tensor(np.zeros(3, np.float32))
    g = data_generation()
    t.data = np.ones(3, np.float32)
    assert data_generation() > g


def test_compiled_steps_sharing_an_optimizer_and_a_program_run_by_hand():
    """Two compiled steps over one optimizer (a last, smaller batch) keep each parameter's
    step count, as the interpreted ones do; and a call of the step's program by anyone else
    in between (a replay on copies of its inputs) makes the next step look at the parameter
    and state arrays again instead of updating the copies."""
    b8 = [(RNG.standard_normal((8, 6)).astype(np.float32), RNG.integers(0, 3, 8)) for _ in range(3)]
    b4 = (RNG.standard_normal((4, 6)).astype(np.float32), RNG.integers(0, 3, 4))

    def train(backend, replay):
        m = mlp()
        o = optim.Adam(m.parameters(), lr=0.01)
        s8 = compile_train_step(m, mlp_loss, o, *b8[0], backend=backend)
        s4 = compile_train_step(m, mlp_loss, o, *b4, backend=backend)
        losses = []
        for epoch in range(2):
            for x, y in b8:
                losses.append(s8(x, y))
            losses.append(s4(*b4))
            if replay and epoch == 0:
                prog = s8.runtime_program
                prog(*[np.array(a, copy=True) for a in prog._last_inputs])
        return losses, [o.state_for(p)["step"] for p in m.parameters()], m
    want, want_steps, m1 = train("interpreter", False)
    for replay in (False, True):
        got, steps, m2 = train("llvm", replay)
        assert steps == want_steps == [8] * len(steps)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
            np.testing.assert_allclose(a.data, b.data, rtol=1e-3, atol=1e-5, err_msg=n)


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="MXCSR is x86's")
def test_compiled_step_flushes_subnormal_moments_unless_asked_not_to():
    """An Adam moment whose gradient turns zero decays by beta1 each step into the subnormal
    range (slow on x86) and sticks at the smallest subnormal; the compiled step flushes it
    to 0 by default (``flush_denormals``), and keeps IEEE subnormals when asked."""
    x1 = np.ones((4, 2), np.float32)
    x0 = x1 * np.float32([1.0, 0.0])  # feature 1 silent from the second step on
    y = np.zeros(4, np.int64)
    moments = {}
    for flush in (True, False):
        nn.manual_seed(0)
        model = nn.Linear(2, 2)
        opt = optim.Adam(model.parameters(), lr=1e-3)
        step = compile_train_step(model, mlp_loss, opt, x1, y, flush_denormals=flush)
        assert step.runtime_program.options["flush_denormals"] is flush
        step(x1, y)
        for _ in range(900):  # 0.9^900 * 1e-2 is far below float32's smallest normal
            step(x0, y)
        moments[flush] = np.array(opt.state[id(model.weight)]["exp_avg"].data)[:, 1]
    assert (moments[True] == 0).all()
    assert (moments[False] != 0).all() and (np.abs(moments[False]) < np.finfo(np.float32).tiny).all()


def test_compiled_step_packs_parameters_and_state_into_one_buffer():
    """compile_train_step moves the parameters and the optimizer's moments into one 2 MB
    aligned buffer (in huge pages where the kernel allows): same values, each a 64-byte
    aligned view of it, and the step updates them there."""
    from neural_arch.compiler.tensor import place_data
    model = mlp()
    opt = optim.AdamW(model.parameters(), lr=0.01)
    values = [p.data.copy() for p in model.parameters()]
    step = compile_train_step(model, mlp_loss, opt, *BATCHES[0])
    tensors = [t for p in model.parameters() for t in (p, opt.state_for(p)["exp_avg"], opt.state_for(p)["exp_avg_sq"])]
    bases = {id(t.data.base) for t in tensors}
    assert len(bases) == 1 and all(t.data.ctypes.data % 64 == 0 for t in tensors)
    start = min(t.data.ctypes.data for t in tensors)
    assert start % (2 << 20) == 0
    assert all(np.array_equal(p.data, v) for p, v in zip(model.parameters(), values))
    where = [t.data.ctypes.data for t in tensors]
    step(*BATCHES[0])
    assert not np.array_equal(model.parameters()[0].data, values[0])
    assert [t.data.ctypes.data for t in tensors] == where  # updated where they are
    with pytest.raises(ValueError, match="place_data: needs a writeable C-contiguous float32"):
        place_data(model.parameters()[0], np.zeros((3, 3), np.float32))


def test_fresh_moments_start_in_their_slots_and_replaced_ones_are_moved_in_with_their_values():
    """An optimizer's fresh state tensors are views of its arena from the start, so packing
    leaves them where they are (no read, no copy) and moves only the parameters; a state
    tensor replaced since (eager steps, a loaded checkpoint) is never written over its old
    slot: everything is copied into a new arena, with its values, bit for bit."""
    from neural_arch.models.arena import pack_training_state
    model = mlp()
    opt = optim.AdamW(model.parameters(), lr=0.01)
    arena = opt._arena
    first, second = model.parameters()[:2]
    fresh = opt.state_for(first)["exp_avg"]
    assert fresh.data.ctypes.data == arena.view(first, "exp_avg").ctypes.data and not fresh.data.any()
    before = fresh.data
    compile_train_step(model, mlp_loss, opt, *BATCHES[0])
    assert opt._arena is arena and opt.state_for(first)["exp_avg"].data is before  # left alone
    for p in model.parameters():
        assert p.data.ctypes.data == arena.view(p).ctypes.data
    replaced = np.random.default_rng(0).standard_normal(second.shape).astype(np.float32)
    replaced[0] = -0.0
    opt.state_for(second)["exp_avg_sq"] = Tensor(replaced.copy())
    tensors = [t for p in opt.params for t in [p] + [opt.state[id(p)][k] for k in ("exp_avg", "exp_avg_sq")]]
    values = [t.data.copy() for t in tensors]
    buf = pack_training_state(opt)
    assert opt._arena is not arena and buf is opt._arena.buffer
    for t, v in zip(tensors, values):
        assert t.data.tobytes() == v.tobytes()  # (-0.0 included)
        assert buf.ctypes.data <= t.data.ctypes.data < buf.ctypes.data + buf.nbytes
    assert opt.state_for(second)["exp_avg_sq"].data.ctypes.data == opt._arena.view(second, "exp_avg_sq").ctypes.data
    # parameters added to the optimizer after it was made: a new arena for the new layout
    opt.params.append(nn.Linear(6, 2).weight)
    opt.state[id(opt.params[-1])] = {"exp_avg": Tensor(np.zeros((2, 6), np.float32)),
                                     "exp_avg_sq": Tensor(np.ones((2, 6), np.float32)), "step": 0}
    assert not opt._arena.fits(opt)
    buf = pack_training_state(opt)
    assert opt._arena.fits(opt) and buf is opt._arena.buffer
    np.testing.assert_array_equal(opt.state[id(opt.params[-1])]["exp_avg_sq"].data, 1.0)


def test_a_slot_is_given_once_so_resets_swaps_and_kept_tensors_keep_their_values():
    """A slot of the arena is one tensor's storage, once: a state reset after compiled steps
    gets fresh zeros (not the live moments), moments swapped between two layers of one
    shape or a trained moment the caller kept and replaced are never written over when
    the next step is compiled (the optimizer gets a new arena); a parameter added to the
    optimizer gets zeros; a copied optimizer does not carry the buffer."""
    import copy
    import pickle
    nn.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))  # (two 4x4 weights)
    opt = optim.Adam(model.parameters(), lr=0.01)
    x = RNG.standard_normal((5, 4)).astype(np.float32)

    def loss(m, x):
        return F.mean(m(x) * m(x))
    step = compile_train_step(model, loss, opt, x)
    for _ in range(3):
        step(x)
    w0, w2 = model[0].weight, model[2].weight
    live = opt.state_for(w0)["exp_avg"].data
    reset = opt.init_state(w0)
    assert not reset["exp_avg"].data.any() and not np.shares_memory(reset["exp_avg"].data, live) and live.any()
    s0, s2 = opt.state_for(w0), opt.state_for(w2)
    s0["exp_avg"], s2["exp_avg"] = s2["exp_avg"], s0["exp_avg"]  # (swapped)
    kept = s0["exp_avg_sq"]
    s0["exp_avg_sq"] = Tensor(np.zeros((4, 4), np.float32))  # (replaced, the trained one kept)
    want = [s0["exp_avg"].data.copy(), s2["exp_avg"].data.copy(), kept.data.copy()]
    before = opt._arena
    compile_train_step(model, loss, opt, x[:3])
    assert opt._arena is not before
    for got, w in zip([s0["exp_avg"].data, s2["exp_avg"].data, kept.data], want):
        np.testing.assert_array_equal(got, w)
    assert not s0["exp_avg_sq"].data.any()
    extra = nn.Linear(3, 2).weight
    opt.params.append(extra)
    assert not opt.init_state(extra)["exp_avg"].data.any()
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert copied._arena is None
        np.testing.assert_array_equal(copied.state[next(iter(copied.state))]["exp_avg"].data,
                                      opt.state[next(iter(opt.state))]["exp_avg"].data)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_the_packed_buffer_is_private_to_the_process():
    """A forked child (a checkpoint writer, an evaluator) gets a copy-on-write snapshot of
    the packed parameters, as of any NumPy array: its writes never reach the parent."""
    import os
    from neural_arch.models.arena import huge_page_buffer
    buf = huge_page_buffer(3 << 20)
    assert buf.ctypes.data % (2 << 20) == 0 and buf.nbytes == 3 << 20 and not buf.any()
    buf[:] = 1
    pid = os.fork()
    if pid == 0:
        buf[:] = 99
        os._exit(0)
    os.waitpid(pid, 0)
    assert (buf == 1).all()


class _WithUnused(nn.Module):
    """A model whose loss does not use one of its layers (and, with ``detach``, reads another
    only through stop_gradient): torch's optimizers skip a parameter whose .grad is None."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 3)
        self.read = nn.Linear(6, 3)

    def forward(self, x):
        return self.a(x) + F.stop_gradient(self.read(x)) * 0.5


@pytest.mark.parametrize("backend", ["interpreter", "llvm"])
@pytest.mark.parametrize("make_opt", [lambda ps: optim.AdamW(ps, lr=0.05, weight_decay=0.5),
                                      lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1)])
def test_parameters_the_loss_does_not_depend_on_are_left_alone_as_eagerly(backend, make_opt):
    nn.manual_seed(0)
    m1 = _WithUnused()
    nn.manual_seed(0)
    m2 = _WithUnused()
    before = {n: p.data.copy() for n, p in m2.named_parameters()}
    o1, o2 = make_opt(m1.parameters()), make_opt(m2.parameters())
    want = eager_losses(m1, o1, BATCHES)
    step = compile_train_step(m2, mlp_loss, o2, *BATCHES[0], backend=backend)
    got = [step(x, y) for x, y in BATCHES]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert step.program.frozen == ("unused.weight", "unused.bias", "read.weight", "read.bias")
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        np.testing.assert_allclose(b.data, a.data, rtol=1e-4, atol=1e-5, err_msg=n)
        if n.startswith(("unused.", "read.")):  # no weight decay, no momentum: exactly as before
            np.testing.assert_array_equal(b.data, before[n], err_msg=n)
            assert o2.state_for(b)["step"] == o1.state_for(a)["step"] == 0
        else:
            assert o2.state_for(b)["step"] == o1.state_for(a)["step"] == len(BATCHES)


def test_a_loss_that_depends_on_no_parameter_is_an_error():
    model = mlp()
    opt = optim.AdamW(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="depends on none of the optimizer's parameters"):
        compile_train_step(model, lambda m, x, y: F.sum(x * 0.0), opt, *BATCHES[0], backend="interpreter")


def test_an_update_that_changes_a_parameters_dtype_is_named():
    class Naive(optim.Optimizer):  # p - lr * g with the float64 runtime lr: a float64 parameter
        state_names = ()

        def update(self, p, g, state, lr, step):
            return p - g * lr, {}
    model = mlp()
    with pytest.raises(TypeError, match=r"Naive.update turned 0.weight of float32\[16, 6\] into float64\[16, 6\]"):
        compile_train_step(model, mlp_loss, Naive(model.parameters(), lr=0.1), *BATCHES[0], backend="interpreter")


def test_packing_keeps_every_value_bit_for_bit_including_zeros():
    """packed_copies leaves arrays of zero bytes to the zeroed buffer (untouched pages), and
    copies every other array: a -0.0 (sign bit set) and a single nonzero entry survive."""
    from neural_arch.models.arena import packed_copies
    arrays = [np.zeros((5, 7), np.float32), np.full(9, -0.0, np.float32), np.zeros(1000, np.float64),
              np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)), np.zeros(33, np.float32)]
    arrays[2][777] = 1e-300
    views = packed_copies(arrays)
    for a, v in zip(arrays, views):
        assert v.dtype == a.dtype and v.shape == a.shape
        assert a.tobytes() == v.tobytes()  # (both in C order)
        assert np.signbit(a).tolist() == np.signbit(v).tolist()


@pytest.mark.parametrize("make_opt", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
                                      lambda ps: optim.AdamW(ps, lr=0.01, weight_decay=0.1),
                                      lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.05),
                                      lambda ps: optim.SGD(ps, lr=0.1)])
def test_replayed_updates_give_the_step_of_updates_traced_one_by_one(make_opt, monkeypatch):
    """A built-in optimizer's update is traced once per parameter shape and replayed for the
    others (train.replayed_update): the step graph computes bit for bit what tracing every
    update computes, from fewer traced nodes, with the same source lines."""
    from neural_arch.models import train
    from neural_arch.runtime.interpreter import interpret
    from neural_arch.tools.zoo import train_step_inputs
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16),
                          nn.Linear(16, 16), nn.Linear(16, 3))  # (three 16x16 layers: one shape, replayed)
    opt = make_opt(model.parameters())
    graphs = {}
    for replay in (True, False):
        monkeypatch.setattr(train, "REPLAY_UPDATES", replay)
        graphs[replay] = train.build_train_graph(model, mlp_loss, opt, BATCHES[0]).graph
    inputs = train_step_inputs(graphs[True], model, BATCHES[0], 0.01)
    rng = np.random.default_rng(1)
    for k, gi in enumerate(graphs[True].inputs):  # (nonzero moments, so that every term counts)
        if gi.kind == "state":
            inputs[k] = np.abs(rng.standard_normal(gi.type.shape)).astype(gi.type.dtype)
    got, want = interpret(graphs[True], inputs), interpret(graphs[False], inputs)
    assert len(got) == len(want) == 1 + len(opt.params) * (1 + len(opt.state_names))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert len(graphs[True].nodes) < len(graphs[False].nodes)
    assert {n.loc for n in graphs[True].nodes} == {n.loc for n in graphs[False].nodes}


def test_a_users_optimizer_is_traced_for_every_parameter():
    """A user's update may depend on more than its arguments' types (here: how many times
    it was called), so it is never replayed."""
    class Counting(optim.SGD):
        def update(self, p, g, state, lr, step):
            self.calls = getattr(self, "calls", 0) + 1
            return p - g * F.cast(lr, p.dtype) * float(self.calls), {}
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    opt = Counting(model.parameters(), lr=0.1)
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    from neural_arch.models.train import build_train_graph
    build_train_graph(model, lambda m, x: F.sum(m(x) * m(x)), opt, (x,))
    assert opt.calls == 4

    class CountingFactors(optim.Adam):  # (a subclass of ours changing only a helper)
        def _factors(self, lr, step, dtype):
            self.calls = getattr(self, "calls", 0) + 1
            return super()._factors(lr, step, dtype)
    opt = CountingFactors(model.parameters(), lr=0.1)
    build_train_graph(model, lambda m, x: F.sum(m(x) * m(x)), opt, (x,))
    assert opt.calls == 4


class _TwoDtypes(nn.Module):
    """float32 and float64 parameters of one shape in one model."""

    def __init__(self):
        super().__init__()
        r = np.random.default_rng(0)
        self.a = nn.Parameter(r.standard_normal((4, 4)).astype(np.float32) * 0.3)
        self.b = nn.Parameter(Tensor(r.standard_normal((4, 4)) * 0.3), dtype="float64")

    def forward(self, x):
        return F.mean(F.tanh(x @ self.a) ** 2) + F.cast(F.mean(F.tanh(F.cast(x, "float64") @ self.b) ** 2), "float32")


@pytest.mark.parametrize("clip", [None, 0.05])
def test_parameters_of_two_dtypes_train_as_eagerly_with_and_without_clipping(clip):
    """The update of each dtype is replayed for its own parameters; clipping scales each
    gradient in its own dtype (the global norm is float64: the scaled float32 gradient had
    become float64, and the step refused to compile)."""
    batches = [(RNG.standard_normal((3, 4)).astype(np.float32),) for _ in range(4)]
    m1, m2 = _TwoDtypes(), _TwoDtypes()
    assert (m1.b.dtype, m1.a.dtype) == ("float64", "float32")
    o1, o2 = optim.AdamW(m1.parameters(), lr=0.05), optim.AdamW(m2.parameters(), lr=0.05)

    def loss(m, x):
        return m(x)
    want = eager_losses(m1, o1, batches, clip, loss_fn=loss)
    step = compile_train_step(m2, loss, o2, *batches[0], clip_norm=clip)
    got = [step(*b) for b in batches]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        assert p.dtype == q.dtype
        np.testing.assert_allclose(q.data, p.data, rtol=1e-4, atol=1e-6, err_msg=n)


def test_state_shared_between_inputs_updated_in_place_is_refused():
    """One tensor as both of Adam's moments, or one moment given to two parameters: the
    step would write two outputs into one array, a wrong answer; the program refuses it,
    naming both inputs.  A batch that is a parameter's memory likewise."""
    model = mlp()
    opt = optim.Adam(model.parameters(), lr=0.01)
    w = model[0].weight
    opt.state_for(w)["exp_avg_sq"] = opt.state_for(w)["exp_avg"]
    step = compile_train_step(model, mlp_loss, opt, *BATCHES[0])
    with pytest.raises(ValueError, match=r"input %0\.weight\.exp_avg is updated in place and shares memory with "
                                         r"input %0\.weight\.exp_avg_sq"):
        step(*BATCHES[0])
    opt.state_for(w)["exp_avg_sq"] = Tensor(np.zeros(w.shape, np.float32))
    step(*BATCHES[0])  # (each its own array again: it runs)
    x = model[0].weight.data.reshape(-1)[:48].reshape(8, 6)
    with pytest.raises(ValueError, match=r"input %0\.weight is updated in place and shares memory with input %batch0"):
        step(x, BATCHES[0][1])

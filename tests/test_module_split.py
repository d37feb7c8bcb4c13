"""Compile time: identical kernel bodies are compiled once (``codegen/share.py``) and a big
module compiles as parts in parallel processes (``runtime/split.py``, ``jit.compile_objects``),
cached on disk part by part."""
from __future__ import annotations

import ctypes
import re
import time

import llvmlite.ir as ir
import numpy as np
import pytest

from neural_arch.compiler import functional as F
from neural_arch.compiler.codegen.share import canonical_body, share_identical_functions
from neural_arch.compiler.ir import TensorType
from neural_arch.compiler.trace import trace
from neural_arch.runtime import jit, program
from neural_arch.runtime.interpreter import interpret
from neural_arch.runtime.program import Program
from neural_arch.runtime.split import split_module


def _two_layers(x, w1, w2):
    """Two layers of one shape: their kernels differ only in names and buffers."""
    h = F.gelu(x @ w1) * 2.0 + 1.0
    return F.gelu(h @ w2) * 2.0 + 1.0, h.sum(axis=-1)


def _graph():
    t = TensorType((8, 16), "float32")
    return trace(_two_layers, t, TensorType((16, 16), "float32"), TensorType((16, 16), "float32"))


def _inputs():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((8, 16)).astype(np.float32),
            (rng.standard_normal((16, 16)) / 4).astype(np.float32),
            (rng.standard_normal((16, 16)) / 4).astype(np.float32)]


def _check(p, g):
    args = _inputs()
    want = interpret(g, args)
    for got, w in zip(p(*args), want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


def _bodies(text: str) -> list[str]:
    return re.findall(r'define internal void @"([^"]+\.body)"', text)


def test_identical_bodies_are_defined_once_and_results_hold(monkeypatch):
    g = _graph()
    p = Program(g, options={"module_cache": False})
    names = _bodies(p.module.llvm_ir)
    # the two layers' gelu(x @ w) * 2 + 1 kernels now call one matmul body and one epilogue
    # body, each defined once and called from both kernels' tasks
    shared = [n for n in names if p.module.llvm_ir.count(f'@"{n}"(') >= 3]  # defined + 2 callers
    assert len(shared) >= 2, (names, [k.name for k in p.kernels])
    _check(p, g)
    monkeypatch.setattr(program, "share_identical_functions", lambda module: {})
    program.clear_memory_cache()
    unshared = Program(g, options={"module_cache": False})
    assert len(_bodies(unshared.module.llvm_ir)) == len(names) + len(shared)
    _check(unshared, g)


def _function(module, name, const, local):
    fn = ir.Function(module, ir.FunctionType(ir.FloatType(), [ir.FloatType()]), name=name)
    fn.linkage = "internal"
    b = ir.IRBuilder(fn.append_basic_block(f"entry.{local}"))
    b.ret(b.fmul(fn.args[0], ir.Constant(ir.FloatType(), const), name=f"t.{local}"))
    return fn


def test_canonical_body_ignores_names_but_not_code():
    m = ir.Module()
    a, b, c = _function(m, "a", 2.0, "x"), _function(m, "b", 2.0, "yy"), _function(m, "c", 3.0, "x")
    assert canonical_body(a) == canonical_body(b)
    assert canonical_body(a) != canonical_body(c)
    # (the cheaper text without local names, which sharing compares first, is equal where
    # the numbered one is, and tells the constants apart too)
    assert canonical_body(a, numbered=False) == canonical_body(b, numbered=False)
    assert canonical_body(a, numbered=False) != canonical_body(c, numbered=False)
    caller = ir.Function(m, ir.FunctionType(ir.FloatType(), [ir.FloatType()]), name="caller")
    bb = ir.IRBuilder(caller.append_basic_block())
    bb.ret(bb.fadd(bb.call(a, [caller.args[0]]), bb.fadd(bb.call(b, [caller.args[0]]),
                                                          bb.call(c, [caller.args[0]]))))
    assert share_identical_functions(m) == {"b": "a"}
    text = str(m)
    assert '@"b"' not in text and text.count('call float @"a"') == 2 and 'call float @"c"' in text
    assert "noinline" in str(m.get_global("a"))
    loaded = jit.load(jit.optimize(text))  # keeps the code alive while f is called
    f = loaded.function("caller", ctypes.c_float, ctypes.c_float)
    assert f(1.5) == pytest.approx(1.5 * 2 + 1.5 * 2 + 1.5 * 3)


def test_callers_of_merged_functions_print_the_kept_one_and_merge_in_turn():
    """Internal callers of two identical functions become identical once their calls point
    at the kept one (the next round merges them), and no text llvmlite cached while
    comparing still names a dropped function (it once did: the module failed to parse)."""
    m = ir.Module()
    a, b = _function(m, "a", 2.0, "x"), _function(m, "b", 2.0, "y")
    callers = []
    for name, callee in (("ca", a), ("cb", b)):
        fn = ir.Function(m, ir.FunctionType(ir.FloatType(), [ir.FloatType()]), name=name)
        fn.linkage = "internal"
        bb = ir.IRBuilder(fn.append_basic_block("entry"))
        bb.ret(bb.call(callee, [fn.args[0]]))
        callers.append(fn)
    main = ir.Function(m, ir.FunctionType(ir.FloatType(), [ir.FloatType()]), name="main")
    bb = ir.IRBuilder(main.append_basic_block())
    bb.ret(bb.fadd(bb.call(callers[0], [main.args[0]]), bb.call(callers[1], [main.args[0]])))
    str(m)  # (every function's text is now cached)
    assert share_identical_functions(m) == {"b": "a", "cb": "ca"}
    text = str(m)
    assert '@"b"' not in text and '@"cb"' not in text and text.count('call float @"ca"') == 2
    loaded = jit.load(jit.optimize(text))
    f = loaded.function("main", ctypes.c_float, ctypes.c_float)
    assert f(1.5) == pytest.approx(6.0)


def test_split_parts_link_and_agree_then_load_from_the_disk_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NEURAL_ARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(program, "compile_parts", lambda nbytes: 3)
    g = _graph()
    program.clear_memory_cache()
    p = Program(g)
    assert p.native.parts == 3 and not p.native.from_cache
    _check(p, g)
    del p
    program.clear_memory_cache()
    q = Program(g)
    assert q.native.parts == 3 and q.native.from_cache
    _check(q, g)


def test_every_part_declares_what_it_calls_in_another():
    text = Program(_graph(), options={"module_cache": False}).module.llvm_ir
    parts = split_module(text, 2)
    assert len(parts) == 2
    defined = [set(re.findall(r'^define [^@]*@"([^"]+)"', p, re.M)) for p in parts]
    entry = [k for k, d in enumerate(defined) if program.ENTRY in d]
    assert len(entry) == 1
    other = defined[1 - entry[0]]
    exported = {n for n in other if not re.search(rf'^define internal [^@]*@"{re.escape(n)}"', parts[1 - entry[0]], re.M)}
    called = set(re.findall(r'call [^@]*@"([^"]+)"', parts[entry[0]]))
    assert exported & called, "the entry point calls no kernel of the other part"
    for name in exported & called:
        assert f'declare i32 @"{name}"' in parts[entry[0]]
    for k, part in enumerate(parts):  # whatever a part calls, it defines or declares
        for name in set(re.findall(r'call [^@]*@"([^"]+)"', part)):
            assert name in defined[k] or re.search(rf'^declare [^@]*@"{re.escape(name)}"', part, re.M), (k, name)


def test_unexpected_module_shapes_stay_whole():
    text = '@"g" = global i32 0\ndefine i32 @"a"()\n{\nentry:\n  ret i32 1\n}\ndefine i32 @"b"()\n{\nentry:\n  ret i32 2\n}\n'
    assert split_module(text, 2) == [text]
    plain = text.split("\n", 1)[1]
    assert len(split_module(plain, 2)) == 2


def test_a_part_that_fails_to_compile_names_the_error():
    good = 'define i32 @"a"()\n{\nentry:\n  ret i32 1\n}\n'
    with pytest.raises(RuntimeError, match=r"LLVM failed to compile m: .*(error|expected)"):
        jit.compile_objects([good, "this is not LLVM IR"], "m")


def _parts_and_inputs():
    text = Program(_graph(), options={"module_cache": False}).module.llvm_ir
    return split_module(text, 2)


def _run_objects(objs):
    """Load the parts' objects together and run the program's entry on fresh buffers."""
    g = _graph()
    p = Program(g, options={"module_cache": False})
    loaded = jit.load(None, objs)
    entry = loaded.function(program.ENTRY, ctypes.c_int32, ctypes.c_void_p)
    args = _inputs()
    p(*args)  # sets up the buffer table; rerun with the separately loaded code
    outs = [np.empty(t.shape, t.dtype) for t in (p.graph.types[o] for o in p.graph.outputs)]
    for (slot, name, _, _), o in zip(p._out_alloc, outs):
        p._ptrs[slot] = o.ctypes.data
    assert entry(ctypes.cast(p._ptrs, ctypes.c_void_p)) == 0
    want = interpret(g, args)
    for got, w in zip(outs, want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
    del loaded


def test_parts_compile_here_when_fork_fails(monkeypatch):
    def no_fork():
        raise OSError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(jit.os, "fork", no_fork)
    _run_objects(jit.compile_objects(_parts_and_inputs(), "m"))


def test_a_part_whose_process_dies_is_compiled_here(monkeypatch):
    import os
    parent = os.getpid()
    real = jit.emit_object

    def dies_in_child(mod):
        if os.getpid() != parent:
            os._exit(3)  # a child killed before it answers
        return real(mod)
    monkeypatch.setattr(jit, "emit_object", dies_in_child)
    _run_objects(jit.compile_objects(_parts_and_inputs(), "m"))


def _module_of(groups: dict) -> str:
    """A module whose exported functions ``e`` call an internal function ``body`` with
    ``loops`` loops: {body: (loops, [exported names])}."""
    out = []
    for body, (loops, users) in groups.items():
        lines = [f'define internal i64 @"{body}"(i64 %"n")', "{", "entry:", '  br label %"l0"']
        for k in range(loops):
            nxt = f'"l{k + 1}"' if k + 1 < loops else '"done"'
            lines += [f"l{k}:", f'  %"i{k}" = phi i64 [0, %"{"entry" if k == 0 else f"l{k - 1}"}"], [%"j{k}", %"l{k}"]',
                      f'  %"j{k}" = add i64 %"i{k}", 1', f'  %"c{k}" = icmp slt i64 %"j{k}", %"n"',
                      f'  br i1 %"c{k}", label %"l{k}", label %{nxt}']
        lines += ["done:", f'  ret i64 %"j{loops - 1}"', "}"]
        out.append("\n".join(lines))
        for u in users:
            out.append(f'define i64 @"{u}"(i64 %"n")\n{{\nentry:\n  %"r" = call i64 @"{body}"(i64 %"n")\n  ret i64 %"r"\n}}')
    return "\n".join(out) + "\n"


def _defined(part: str) -> set:
    return set(re.findall(r'^define [^@]*@"([^"]+)"', part, re.M))


def test_kernels_sharing_a_body_compile_in_one_part_the_costliest_first():
    """Two layers' kernels call one body each: dealing them one by one would compile
    each body in both parts; grouped, every body is compiled once, and the part with the
    most loops (LLVM's time grows with them as much as with text) comes first."""
    text = _module_of({"attn.body": (6, ["k0", "k2", "k4"]), "mlp.body": (2, ["k1", "k3", "k5"])})
    parts = split_module(text, 2)
    assert [_defined(p) for p in parts] == [{"attn.body", "k0", "k2", "k4"}, {"mlp.body", "k1", "k3", "k5"}]
    # a module of one shared body still uses every worker when that costs little
    spread = split_module(_module_of({"small": (1, ["a", "b"]), "big": (12, ["c"]), "big2": (12, ["d"])}), 3)
    assert sorted(map(sorted, map(_defined, spread))) == [["a", "b", "small"], ["big", "c"], ["big2", "d"]]


def test_workers_take_parts_from_a_queue_and_a_dead_worker_is_made_up_for(monkeypatch):
    import os
    texts = [f'define i64 @"f{k}"()\n{{\nentry:\n  ret i64 {k * 7}\n}}\n' for k in range(7)]
    parent = os.getpid()
    real = jit.emit_object
    done_here = []

    def second_part_kills_the_child(mod):
        if os.getpid() != parent and mod.name == "m.3":
            os._exit(3)  # the child dies with part 3 claimed, after answering others
        if os.getpid() == parent:
            done_here.append(mod.name)
            time.sleep(0.05)  # the child takes parts meanwhile
        return real(mod)
    monkeypatch.setattr(jit, "emit_object", second_part_kills_the_child)
    objs = jit.compile_objects(texts, "m", workers=2)
    loaded = jit.load(None, objs)
    assert [loaded.function(f"f{k}", ctypes.c_int64)() for k in range(7)] == [k * 7 for k in range(7)]
    # the child compiled parts (the queue is shared), and part 3 was compiled here: either
    # taken here from the queue, or after the child died with it
    assert len(done_here) < 7 and "m.3" in done_here, done_here


def test_a_built_module_leaves_no_ir_for_the_cyclic_collector():
    """``build`` breaks the printed llvmlite module's cycles (``release_ir``): left to the
    cyclic collector, the small GPT-2 step's 240 000 IR objects cost a 0.44 s collection
    after the compile."""
    import gc
    g = _graph()
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)
        program.clear_memory_cache()
        p = Program(g, options={"module_cache": False})
        gc.collect()
        left = [o for o in gc.garbage if type(o).__module__.startswith("llvmlite.ir")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was:
            gc.enable()
    assert not left, f"{len(left)} llvmlite.ir objects were left to the cyclic collector, e.g. {left[:5]}"
    _check(p, g)


def _fields(k):
    return (k.name, tuple(n.name for n in k.nodes), k.inputs, k.outputs, k.strategy, k.tasks, dict(k.loops),
            k.workspace_bytes, tuple(k.buffers), k.externals, k.reuse, k.note)


def test_kernels_alike_run_one_function_with_their_own_buffers():
    """The second layer's kernels are the first's but for their values' names: ``build``
    lowers them once (``share.kernel_key``) and calls that function with each kernel's own
    buffers.  The records are those a separate lowering gives, the results bitwise those of
    separately lowered kernels; a layer differing in one constant gets its own function."""
    def four_layers(x, w1, w2, w3, w4):
        # the second and third layers are alike; the first reads a program input (its
        # arguments come in another order), the last writes the program's output
        for w in (w1, w2, w3):
            x = F.gelu(x @ w) * 2.0 + 1.0
        return F.gelu(x @ w4) * 2.0 + 1.0
    t, w = TensorType((8, 16), "float32"), TensorType((16, 16), "float32")
    g = trace(four_layers, t, w, w, w, w)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((8, 16)).astype(np.float32)] + \
        [(rng.standard_normal((16, 16)) / 4).astype(np.float32) for _ in range(4)]
    program.clear_memory_cache()
    shared = Program(g, options={"module_cache": False})
    alike = [k for k in shared.kernels if k.same_as]
    assert [(k.name, k.same_as) for k in alike] == [(shared.kernels[2].name, shared.kernels[1].name)]
    assert alike and all(k.same_as in [j.name for j in shared.kernels] for k in alike), shared.kernels
    for k in alike:
        assert f'define i32 @"{k.name}"' not in shared.module.llvm_ir
    program.clear_memory_cache()
    separate = Program(g, options={"module_cache": False, "kernel_memo": False})
    assert not any(k.same_as for k in separate.kernels)
    assert [_fields(k) for k in shared.kernels] == [_fields(k) for k in separate.kernels]
    for a, b in zip(shared(*args), separate(*args)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(shared(*args)[0], interpret(g, args)[0], rtol=1e-5, atol=1e-6)

    def other_constant(x, w1, w2, w3, w4):
        for w, c in ((w1, 2.0), (w2, 2.0), (w3, 3.0)):
            x = F.gelu(x @ w) * c + 1.0
        return F.gelu(x @ w4) * 2.0 + 1.0
    g3 = trace(other_constant, t, w, w, w, w)
    p3 = Program(g3, options={"module_cache": False})
    assert not any(k.same_as for k in p3.kernels), p3.kernels
    np.testing.assert_allclose(p3(*args)[0], interpret(g3, args)[0], rtol=1e-5, atol=1e-6)


def test_the_gpt2_step_lowers_each_layer_kind_once_and_computes_the_same():
    from neural_arch.tools.bench.train import bench_step_graph
    g, inputs, opts = bench_step_graph("tiny")
    outs, records = [], []
    for memo in (True, False):
        program.clear_memory_cache()
        p = Program(g, options=dict(opts, kernel_memo=memo, module_cache=False))
        records.append([_fields(k) for k in p.kernels])
        if memo:  # the second layer's kernels (all but those with index checks) run the first's
            assert sum(1 for k in p.kernels if k.same_as) >= 20, p.kernels
        outs.append([np.array(o, copy=True) for o in p(*[np.array(a, copy=True) for a in inputs])])
    assert records[0] == records[1]
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_an_index_error_in_a_kernel_alike_another_names_its_own_node():
    """Kernels with index checks are lowered each on its own: the error record names the
    node whose index was out of range, not the first kernel of its kind."""
    table = TensorType((10, 4), "float32")
    idx = TensorType((3,), "int64")

    def two_lookups(t1, t2, i, j):
        first = F.gather(t1, i, axis=0) * 2.0
        second = F.gather(t2, j, axis=0) * 2.0
        return first, second
    g = trace(two_lookups, table, table, idx, idx)
    p = Program(g, options={"module_cache": False})
    rng = np.random.default_rng(0)
    t1, t2 = rng.standard_normal((10, 4)).astype(np.float32), rng.standard_normal((10, 4)).astype(np.float32)
    good, bad = np.array([1, 2, 3]), np.array([1, 12, 3])
    messages = []
    for i, j in ((bad, good), (good, bad)):
        with pytest.raises(IndexError, match="12") as err:
            p(t1, t2, i, j)
        messages.append(str(err.value))
    line = two_lookups.__code__.co_firstlineno
    assert [m.endswith(f"test_module_split.py:{line + n})") for n, m in ((1, messages[0]), (2, messages[1]))] == [True, True], messages

"""Compiler bugs found by `narch difftest` (docs/tools.md), held as small graphs in the IR's
text form: each compiles, equals the interpreter, and writes nothing past its outputs."""
import textwrap

import numpy as np
import pytest

from neural_arch.compiler import functional as F, parse, trace
from neural_arch.compiler.ir import TensorType
from neural_arch.runtime.interpreter import interpret
from neural_arch.runtime.program import Program

GRAPHS = {
    # a column row kernel applied one loop space's parallel bounds to loops planned with a
    # different merge of the kept dims: it wrote 31 floats into an 8-float output
    "broadcast_plus_column_sum": """
        graph g(%44: f32[1, 4], %53: f32[3, 2, 4]) {
          %45: f32[2, 4] = broadcast_to(%44) {shape=[2, 4]}
          %55: f32[2, 4] = sum(%53) {axes=[0], keepdims=false}
          %56: f32[2, 4] = add(%45, %55)
          return (%56)
        }""",
    "column_sum_of_transpose": """
        graph g(%57: f32[2, 2, 5], %80: f32[2, 2, 5]) {
          %81: f32[2, 2, 5] = transpose(%57) {perm=[1, 0, 2]}
          %82: f32[2, 2, 5] = add(%80, %81)
          %83: f32[2, 5] = sum(%82) {axes=[0], keepdims=false}
          return (%83)
        }""",
    "column_sum_of_slice": """
        graph g(%46: f32[3, 5, 6], %61: f32[2, 4, 5]) {
          %51: f32[2, 4, 5] = slice(%46) {starts=[1, 0, 0], steps=[1, 1, 1], stops=[3, 4, 5]}
          %62: f32[2, 4, 5] = sub(%51, %61)
          %64: f32[4, 5] = sum(%62) {axes=[0], keepdims=false}
          return (%64)
        }""",
    "gather_of_column_sum": """
        graph g(%0: f32[4, 4, 4], %2: f32[4, 4], %7: i64[4]) {
          %1: f32[4, 4] = sum(%0) {axes=[0], keepdims=false}
          %3: f32[4, 4] = div(%1, %2)
          %8: f32[4, 4] = gather(%3, %7) {axis=0}
          return (%8)
        }""",
    # fusion merged the loop kernel computing a matmul's operand into that matmul's kernel
    "matmul_operand_not_merged_into_its_matmul": """
        graph g(%32: f32[3, 1], %36: f32[1, 2], %37: f32[1, 4], %44: bool[1, 2], %47: f32[1, 2], %53: f32[1, 1]) {
          %38: f32[3, 4] = matmul(%32, %37)
          %41: f32[1, 2] = slice(%38) {starts=[1, 1], steps=[1, 1], stops=[2, 3]}
          %48: f32[1, 2] = where(%44, %41, %47)
          %49: f32[1, 2] = sub(%41, %48)
          %50: f32[1, 2] = add(%36, %49)
          %54: f32[1, 2] = matmul(%53, %48)
          %55: f32[1, 2] = add(%50, %54)
          return (%55)
        }""",
    # the column sums split by rows ran every reduction in one pass and stored them after
    # the tasks: a sum over axis 0 computed from another (a variance from its mean) read the
    # mean's buffer before it was written (found by fuzzing; serial=False only)
    "column_sum_of_a_column_sum": """
        graph g(%x: f32[256, 64]) {
          %0: f32[64] = sum(%x) {axes=[0], keepdims=false}
          %1: f32[64] = full() {dtype="float32", shape=[64], value=256.0}
          %2: f32[64] = div(%0, %1)
          %3: f32[256, 64] = broadcast_to(%2) {shape=[256, 64]}
          %4: f32[256, 64] = sub(%x, %3)
          %5: f32[256, 64] = mul(%4, %4)
          %6: f32[64] = sum(%5) {axes=[0], keepdims=false}
          return (%6)
        }""",
}


def _inputs(graph, rng):
    out = []
    for gi in graph.inputs:
        t = gi.type
        if t.dtype == "bool":
            out.append(rng.random(t.shape) < 0.5)
        elif t.dtype.startswith("int"):
            out.append(rng.integers(0, t.shape[0] if t.shape else 1, t.shape).astype(t.dtype))
        else:
            out.append(rng.uniform(0.5, 2.0, t.shape).astype(t.dtype))
    return out


@pytest.mark.parametrize("name", sorted(GRAPHS))
@pytest.mark.parametrize("serial", [False, True])
def test_difftest_reproducer_is_fixed(name, serial):
    graph = parse(textwrap.dedent(GRAPHS[name]))
    ins = _inputs(graph, np.random.default_rng(0))
    if name == "gather_of_column_sum":
        ins[2] = np.array([3, 0, 2, 1])
    prog = Program(graph, options={"serial": serial})
    want = interpret(graph, ins)
    # outputs live at the start of buffers with a guard tail: nothing may be written past them
    guards, outs = [], []
    for t in graph.output_types:
        buf = np.full(t.size + 256, 7.25, t.dtype)
        guards.append(buf)
        outs.append(buf[:t.size].reshape(t.shape))
    got = prog(*ins, out=outs)
    for g, w, buf, t in zip(got, want, guards, graph.output_types):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        assert np.all(buf[t.size:] == 7.25), f"{name}: wrote past the end of its output"


@pytest.mark.parametrize("serial", [False, True])
def test_column_kernel_output_written_over_an_input_a_later_sum_reads(serial):
    """A column row kernel (sums over axis 0) with a full-domain output that needs no row
    value stored it in the first reduction's pass; written in place over an input that a
    later reduction's pass reads, that pass read the overwritten values (exp(2r) for exp(r))."""
    graph = parse(textwrap.dedent("""
        graph g(%r: f32[9, 8]) {
          %0: f32[9, 8] = full() {dtype="float32", shape=[9, 8], value=2.0}
          %1: f32[9, 8] = mul(%r, %0)
          %2: f32[8] = sum(%1) {axes=[0], keepdims=false}
          %3: f32[9, 8] = exp(%r)
          %4: f32[8] = sum(%3) {axes=[0], keepdims=false}
          return (%1, %2, %4)
        }"""))
    r = np.random.default_rng(0).uniform(-1.0, 1.0, (9, 8)).astype(np.float32)
    want = interpret(graph, [r.copy()])
    prog = Program(graph, options={"inplace": {0: 0}, "serial": serial})
    assert prog.inplace == {0: 0}
    arr = r.copy()
    got = prog(arr)
    assert got[0] is arr
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1])
def test_reshape_of_a_reduction_is_not_written_over_an_input_its_kernel_reads(axis):
    """An output that is a reshape of a reduction is stored as the reduction, before the
    kernel's other outputs: written over an input those read, they read the sum instead
    (s * s for s * b).  inplace_pairs refused a reduction there, but not a reshape of one."""
    x = np.random.default_rng(0).standard_normal((10, 13)).astype(np.float32)
    rows = (1, 13) if axis == 0 else (10, 1)
    b = np.random.default_rng(1).standard_normal(rows).astype(np.float32)

    def f(x, b):
        return F.reshape(x.sum(axis=axis), rows), x.sum(axis=axis, keepdims=True) * b
    graph = trace(f, TensorType(x.shape), TensorType(rows))
    prog = Program(graph, options={"inplace": {0: 1}})
    assert prog.inplace == {} and "is a reduction" in prog.inplace_refused[graph.outputs[0]]
    want = interpret(graph, [x, b.copy()])
    for g, w in zip(prog(x, b.copy()), want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_in_place_pairs_that_would_order_kernels_in_a_cycle_are_refused():
    """Two kernels each writing over the input the other reads: the first pair makes its
    kernel run after the other, so the second (which needs the reverse) is refused; it
    used to be accepted and the program raised an internal error ordering the kernels."""
    t = TensorType((8, 8))
    graph = trace(lambda x, y: (y * 1.5, x * 2.0), t, t)
    prog = Program(graph, options={"inplace": {0: 0, 1: 1}})
    assert prog.inplace == {0: 0} and list(prog.inplace_refused) == [graph.outputs[1]]
    x, y = (np.random.default_rng(k).standard_normal((8, 8)).astype(np.float32) for k in (0, 1))
    a, b = prog(x.copy(), y.copy())
    np.testing.assert_allclose(a, y * 1.5, rtol=1e-6)
    np.testing.assert_allclose(b, x * 2.0, rtol=1e-6)


def test_an_input_also_returned_is_not_overwritten_in_place():
    """An input returned as an output is copied from its array after the kernels ran: with
    another output written over it, the copy held the new values."""
    t = TensorType((8, 8))
    graph = trace(lambda x: (x * 2.0, x), t)
    prog = Program(graph, options={"inplace": {0: 0}})
    assert prog.inplace == {} and "also returned" in prog.inplace_refused[graph.outputs[0]]
    x = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    a, b = prog(x.copy())
    np.testing.assert_allclose(a, 2 * x, rtol=1e-6)
    np.testing.assert_array_equal(b, x)


def test_values_computed_from_an_input_and_read_through_a_remap_keep_it_from_being_overwritten():
    """inplace_pairs checked only the nodes reading the input itself (here exp, elementwise),
    not what is computed from them: x + transpose(exp(x)) written over x read exp of
    elements already overwritten."""
    t = TensorType((64, 64))
    for f in (lambda x: (x + F.transpose(F.exp(x), 1, 0),),
              lambda x: (x + F.transpose(F.exp(x), 1, 0).sum(axis=1, keepdims=True),)):
        graph = trace(f, t)
        prog = Program(graph, options={"inplace": {0: 0}})
        assert prog.inplace == {} and "computed from %x" in prog.inplace_refused[graph.outputs[0]]
        x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
        np.testing.assert_allclose(prog(x.copy())[0], interpret(graph, [x])[0], rtol=1e-5, atol=1e-5)


def test_an_output_not_computed_from_the_input_it_overwrites_is_refused_when_its_kernel_reads_it():
    """%4 (from a0, a1) written over a2, which the same row kernel reads for %6 and %12: no
    store of %4 depends on a load of a2, so under the kernels' ``noalias`` LLVM loaded a2
    after storing %4 (found by fuzzing in-place pairs; the 4x4 kernel is fully unrolled)."""
    graph = parse(textwrap.dedent("""
        graph g(%a0: f32[4, 4], %a1: f32[4, 4], %a2: f32[4, 4]) {
          %1: f32[4, 4] = add(%a0, %a1)
          %4: f32[4, 4] = add(%a0, %1)
          %5: f32[4, 4] = transpose(%a1) {perm=[1, 0]}
          %6: f32[4, 4] = add(%5, %a2)
          %7: f32[4, 1] = sum(%4) {axes=[1], keepdims=true}
          %11: f32[4, 4] = broadcast_to(%7) {shape=[4, 4]}
          %12: f32[4, 4] = div(%6, %11)
          return (%4, %6, %12)
        }"""))
    prog = Program(graph, options={"inplace": {0: 2}})
    assert prog.inplace == {} and "not computed from %a2" in prog.inplace_refused["4"]
    ins = [np.random.default_rng(k).standard_normal((4, 4)).astype(np.float32) for k in range(3)]
    for g, w in zip(prog(*[a.copy() for a in ins]), interpret(graph, ins)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_row_kernel_output_written_over_an_input_is_computed_from_its_loads():
    """%6 = a1 + mean(a0) / 10 written over a1 in a row kernel that also reads a1 for %14: the
    kernel kept %6's row on the stack for its sum and stored %6 from there, so no store of
    %6 depended on a load of a1, and under ``noalias`` LLVM loaded a1 for %14 after storing
    %6 (found by fuzzing in-place pairs).  Such kernels now compute their outputs again."""
    graph = parse(textwrap.dedent("""
        graph g(%a0: f32[8, 33], %a1: f32[8, 33]) {
          %0: f32[] = sum(%a0) {axes=[0, 1], keepdims=false}
          %1: f32[] = full() {dtype="float32", shape=[], value=0.1}
          %2: f32[] = mul(%0, %1)
          %3: f32[8, 33] = broadcast_to(%2) {shape=[8, 33]}
          %6: f32[8, 33] = add(%a1, %3)
          %8: f32[] = sum(%6) {axes=[0, 1], keepdims=false}
          %9: f32[] = mul(%8, %1)
          %10: f32[8, 33] = broadcast_to(%9) {shape=[8, 33]}
          %14: f32[8, 33] = add(%a1, %10)
          return (%6, %14)
        }"""))
    ins = [np.random.default_rng(k).standard_normal((8, 33)).astype(np.float32) for k in range(2)]
    for serial in (False, True):
        prog = Program(graph, options={"inplace": {0: 1}, "serial": serial})
        assert prog.inplace == {0: 1}
        arr = ins[1].copy()
        got = prog(ins[0], arr)
        assert got[0] is arr
        for g, w in zip(got, interpret(graph, ins)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

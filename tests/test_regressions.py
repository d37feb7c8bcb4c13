"""Compiler bugs found by `narch difftest` (docs/tools.md), held as small graphs in the IR's
text form: each compiles, equals the interpreter, and writes nothing past its outputs."""
import textwrap

import numpy as np
import pytest

from neural_arch.compiler import parse
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

"""`narch difftest` and `narch profile` through the CLI function: short seeded runs of every
suite pass; a real failing comparison (tolerance 0 where compiled code rounds differently)
exits 1, writes reproducers, is minimized, and replays; the profiler's table and trace."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from neural_arch.compiler.ir import parse
from neural_arch.compiler.ops.registry import PRIMITIVES
from neural_arch.runtime.interpreter import interpret
from neural_arch.tools import difftest, zoo
from neural_arch.tools.cli import main

ROW = re.compile(r"^(ops|models|random|passes)\s+(\S+)\s+(.+?)\s{2,}(\S+)\s+(\S+)\s+rtol (\S+) atol (\S+)\s+(.*)$")


def table(out: str) -> list[tuple]:
    return [m.groups() for line in out.splitlines() if (m := ROW.match(line))]


def summary(out: str) -> tuple[int, int, int]:
    m = re.search(r"^(\d+) cases, (\d+) passed, (\d+) failed", out, re.M)
    assert m, out[-2000:]
    return tuple(int(x) for x in m.groups())


def test_ops_suite_covers_every_op_forward_backward_and_torch(capsys, tmp_path):
    assert main(["difftest", "ops", "--count", "2", "--seed", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    names = {r[1] for r in rows}
    for op, prim in PRIMITIVES.items():
        if prim.spec is not None:
            assert f"{op}/forward" in names, op
    assert {"exp/backward", "matmul/backward", "gather/backward", "scatter_add/backward"} <= names
    assert {"tanh/torch0", "matmul/torch0", "sum/torch1"} <= names
    assert all(r[7] == "pass" for r in rows), [r for r in rows if r[7] != "pass"]
    n, passed, failed = summary(out)
    assert n == len(rows) == passed and failed == 0
    assert not any(os.scandir(tmp_path))  # no failures, no reproducers


def test_models_suite_forward_and_training_step(capsys, tmp_path):
    assert main(["difftest", "models", "--only", "mlp*,gpt2-tiny*", "--out", str(tmp_path)]) == 0
    rows = table(capsys.readouterr().out)
    assert [r[1] for r in rows] == ["mlp/forward", "mlp/train", "gpt2-tiny/forward", "gpt2-tiny/train"]
    for r in rows:
        assert r[2] == "compiled vs interpreter" and r[7] == "pass" and float(r[3]) <= 1e-5


def test_every_zoo_model_in_the_models_suite():
    cases = difftest.model_cases(0, 1, None)
    assert [c.name for c in cases] == [f"{n}/{k}" for n in zoo.names() for k in ("forward", "train")]


@pytest.mark.parametrize("suite, checks", [("random", {"compiled vs interpreter"}),
                                           ("passes", {"passes vs unoptimized", "passes+compiled vs unoptimized"})])
def test_random_and_passes_suites(suite, checks, capsys, tmp_path):
    assert main(["difftest", suite, "--count", "6", "--seed", "11", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    assert {r[2] for r in rows} == checks
    assert {r[1] for r in rows} == {f"graph{s}" for s in range(11, 17)}
    assert all(r[7] == "pass" for r in rows)


def test_all_suites_quiet_prints_only_the_summary(capsys, tmp_path):
    assert main(["difftest", "all", "--count", "1", "--only", "graph0,exp*,mlp*", "--quiet",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert table(out) == [] and summary(out)[2] == 0 and summary(out)[0] >= 6


def test_a_real_failure_exits_1_writes_a_reproducer_is_minimized_and_replays(capsys, tmp_path):
    # tolerance 0: fused compiled code contracts a*b-c into an FMA (one rounding instead of two),
    # so the compiled result differs from the interpreter's in the last bit on this graph
    assert main(["difftest", "random", "--count", "1", "--seed", "3", "--tolerance", "0",
                 "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    rows = table(out)
    assert len(rows) == 1 and rows[0][7].startswith("FAIL") and float(rows[0][3]) > 0
    assert summary(out) == (1, 0, 1)
    repro = tmp_path / "random-graph3-compiled"
    mini = tmp_path / "random-graph3-min-compiled"
    for d in (repro, mini):
        assert {p.name for p in d.iterdir()} >= {"graph.txt", "inputs.npz", "case.json", "pipeline.txt", "README.txt"}
        assert f"narch difftest --replay {d}" in out
    big, small = parse((repro / "graph.txt").read_text()), parse((mini / "graph.txt").read_text())
    assert len(small.nodes) < len(big.nodes) and 1 <= len(small.nodes) <= 3
    m = re.search(r"minimized random graph3: (\d+) -> (\d+) nodes", out)
    assert m and int(m.group(2)) == len(small.nodes)
    meta = json.loads((mini / "case.json").read_text())
    assert meta["check"] == "compiled" and meta["rtol"] == 0 and meta["info"]["minimized_from"] == len(big.nodes)
    with np.load(mini / "inputs.npz") as z:
        assert [z[k].shape for k in sorted(z.files)] == [i.type.shape for i in small.inputs]
    # replay reproduces the failure ...
    assert main(["difftest", "--replay", str(mini)]) == 1
    assert "still fails" in capsys.readouterr().out
    # ... and really re-evaluates: at a sane tolerance the same case passes
    meta["rtol"], meta["atol"] = 1e-5, 1e-6
    (mini / "case.json").write_text(json.dumps(meta))
    assert main(["difftest", "--replay", str(mini)]) == 0
    assert "passes now" in capsys.readouterr().out


def test_a_failing_op_case_replays(capsys, tmp_path):
    assert main(["difftest", "ops", "--only", "tanh/forward", "--tolerance", "0", "--count", "3",
                 "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    (path,) = re.findall(r"reproducer: narch difftest --replay (\S+)", out)
    assert os.path.basename(path) == "ops-tanh_forward-compiled"
    assert main(["difftest", "--replay", path]) == 1


def test_cut_nodes_keeps_the_values():
    g, inputs, _ = difftest.random_graph(5)
    values = dict(zip(g.input_names, inputs))
    values.update(zip([n.name for n in g.nodes], interpret(g.replace(outputs=[n.name for n in g.nodes]), inputs)))
    want = interpret(g, inputs)
    cut = [n.name for n in g.nodes[: len(g.nodes) // 2] if n.name not in g.outputs]
    small, small_inputs = difftest.cut_nodes(g, inputs, values, cut)
    assert len(small.nodes) < len(g.nodes)
    for a, b in zip(interpret(small, small_inputs), want):
        np.testing.assert_array_equal(a, b)


def test_compare():
    f = np.array([1.0, np.nan, 3.0], np.float32)
    assert difftest.compare([f], [f.copy()], 0, 0)[2]
    a, r, ok, worst = difftest.compare([np.array([1.0, 2.0])], [np.array([1.0, 2.5])], 0.1, 0.0, ["y"])
    assert (a, r, ok, worst) == (0.5, 0.2, False, "y")
    assert difftest.compare([np.array([1.0, 2.0])], [np.array([1.0, 2.5])], 0.2, 0.0)[2]
    assert not difftest.compare([np.array([1, 2])], [np.array([1, 3])], 1.0, 1.0)[2]  # integers: exact
    with pytest.raises(AssertionError, match="shape"):
        difftest.compare([np.zeros(2)], [np.zeros(3)], 1, 1)


def test_batched_workers_give_the_same_table(capsys, tmp_path):
    assert main(["difftest", "random", "--count", "3", "--seed", "20", "--batch", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert [r[1] for r in table(out)] == ["graph20", "graph21", "graph22"]
    assert re.search(r"^3 cases, 3 passed, 0 failed \(0 crashes\)", out, re.M)


def test_replay_of_a_missing_directory_is_one_line(capsys, tmp_path):
    assert main(["difftest", "--replay", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "not a difftest reproducer directory" in err and err.strip().count("\n") == 0


def test_only_matching_no_case_fails_instead_of_passing(capsys, tmp_path):
    """A misspelt --only compared nothing and exited 0, like a clean run."""
    assert main(["difftest", "ops", "--only", "tanhh", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^0 cases, 0 passed, 0 failed", out, re.M)
    assert "no case matches --only tanhh: nothing was compared" in out
    assert main(["difftest", "random", "--count", "2", "--only", "graph9", "--batch", "2", "--out", str(tmp_path)]) == 1
    assert "no case matches --only graph9" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["difftest", "ops", "--count", "0"], "narch difftest: --count must be at least 1, got 0"),
    (["difftest", "random", "--batch", "-1"], "narch difftest: --batch must be at least 0, got -1"),
    (["profile", "mlp", "--top", "-2"], "narch profile: --top must be at least 1"),
    (["profile", "mlp", "--warmup", "-1"], "narch profile: --warmup must be at least 0"),
    (["demo", "--steps", "-5"], "narch demo: --steps must be 0 or more, got -5"),
])
def test_counts_that_make_no_sense_are_refused(argv, message, capsys):
    """--count 0 ran 47 empty op cases; --top -2 listed one of three kernels and "(5 more
    kernels)"; --steps -5 reported "after -5 steps"."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == message


# ----------------------------------------------------------------------------- profile


def test_profile_table_and_chrome_trace(capsys, tmp_path):
    trace = tmp_path / "t.json"
    assert main(["profile", "mlp", "--iters", "4", "--warmup", "1", "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    ex = zoo.example("mlp")
    from neural_arch.runtime.program import Program
    kernels = Program(ex.graph).kernels
    assert "Python-side overhead" in out and "4 calls" in out
    for k in kernels:
        assert k.name in out
    shares = [float(x) for x in re.findall(r"\s(\d+\.\d)%\s", out)]
    assert abs(sum(shares) - 100) < 1.0
    gflops = re.search(r"k0\.\S+\s+matmul\s+\S+\s+\S+%\s+(\d+\.\d+)", out)
    assert gflops and float(gflops.group(1)) > 0
    data = json.loads(trace.read_text())
    events = [e for e in data["traceEvents"] if e["ph"] == "X"]
    calls = [e for e in events if e["cat"] == "call"]
    kevents = [e for e in events if e["cat"] != "call"]
    assert len(calls) == 4 and len(kevents) == 4 * len(kernels)
    for e in kevents:  # each kernel lies inside its call (same clock), in order
        call = next(c for c in calls if c["ts"] <= e["ts"] <= c["ts"] + c["dur"])
        assert e["ts"] + e["dur"] <= call["ts"] + call["dur"] + 1.0 and e["dur"] >= 0


def test_profile_flops_and_bytes():
    from neural_arch.runtime.program import Program
    from neural_arch.tools import profile
    ex = zoo.example("mlp")
    p = Program(ex.graph)
    k0 = p.kernels[0]
    assert [n.op for n in k0.nodes][0] == "matmul"
    assert profile.kernel_flops(k0, p.graph.types) == 2 * 8 * 32 * 16
    assert profile.kernel_bytes(p.kernels[1], p.graph.types) > 0 and profile.kernel_flops(p.kernels[1],
                                                                                          p.graph.types) == 0


def test_profile_training_step_and_errors(capsys):
    assert main(["profile", "gpt2-tiny", "--train", "--iters", "2", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "training step" in out and re.search(r"\((\d+) more kernels", out)
    assert main(["profile", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown target" in err and err.strip().count("\n") == 0


def test_profile_and_dump_the_benchmarks_own_training_step(capsys):
    """bench:mlp is the step `narch bench train` times: its MLP, batch and AdamW update."""
    from neural_arch.runtime.program import Program
    from neural_arch.tools.bench.train import bench_step_graph
    assert main(["profile", "bench:mlp", "--iters", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    g, inputs, options = bench_step_graph("mlp")
    assert options["flush_denormals"] and len(options["inplace"]) == 1 + 6 + 12 - 1  # (not the loss)
    assert out.startswith(f"bench:mlp (training step, AdamW): {len(Program(g, options=options).kernels)} kernels, 2 calls")
    assert "sqrt" in out  # (AdamW's update in the weight-gradient kernels)
    assert [i.name for i in g.inputs][:5] == ["lr", "step", "seed", "batch0", "batch1"]
    assert inputs[3].shape == (64, 64) and len(g.inputs) == 5 + 6 + 12
    assert main(["profile", "bench:huge"]) == 2
    assert "unknown benchmark case 'huge' (small, tiny, mlp)" in capsys.readouterr().err
    assert main(["dump", "bench:mlp", "--stage", "kernels"]) == 0
    assert "k9" in capsys.readouterr().out


def test_a_miss_within_float32_noise_is_settled_against_float64():
    """Two float32 evaluation orders may differ by more than the tolerance while both are as
    close to the float64 truth as float32 allows; a result farther off still fails."""
    g = parse("graph g(%x: f32[3], %y: f32[3]) {\n  %s: f32[3] = add(%x, %y)\n  return (%s)\n}\n")
    x, y = np.float32([1.0, 1.0, -3.0]), np.float32([2.0, 2.0, 5.0])
    case = difftest.Case("random", "t", g, [x, y], "compiled", 1e-6, 1e-6, oracle=True)
    want = [x + y]                                      # exact
    noisy = [want[0] + np.float32([0, 1e-5, 0])]        # 1e-5 off: beyond tolerance, noise and 8 ulps of 5
    assert not difftest.within_float32_noise(case, noisy, want)
    far_interp = [want[0] + np.float32([0, 1e-3, 0])]   # an interpreter 1e-3 off allows 1e-3
    assert difftest.within_float32_noise(case, noisy, far_interp)
    # cancellation: values of 1e4 summing to 3 leave float32 ulps of 1e4 (1e-3) of noise
    big = difftest.Case("random", "t", g, [np.float32([1e4, 1.0, -3.0]), np.float32([-1e4 + 3, 2.0, 5.0])],
                        "compiled", 1e-6, 1e-6, oracle=True)
    exact = [big.inputs[0] + big.inputs[1]]
    assert difftest.within_float32_noise(big, [exact[0] + np.float32([2e-3, 0, 0])], exact)
    assert not difftest.within_float32_noise(big, [exact[0] + np.float32([2e-2, 0, 0])], exact)


def test_the_cancellation_case_of_the_long_run_is_settled(capsys):
    """graph 107149 of the 10,000-graph run: x and -x of magnitude 300 cancel in a scatter_add;
    the compiled order misses the float64 truth by 3.8e-5 (2 ulps of 300)."""
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "difftest", "random-graph107149-min-compiled")
    case = difftest.load_reproducer(path)
    case.oracle = True
    res = difftest.run_case(case)
    assert res.ok, difftest.row(res)

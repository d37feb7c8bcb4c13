"""narch bench train --interleave: two live workers (``--serve``) taking turns.  Structure
only: no test asserts a time."""
import math

from neural_arch.tools.bench import train as bench


def test_interleaved_workers_take_turns_and_report_block_ratios():
    res = bench.interleave(["mlp", "ours"], ["mlp", "ours"], blocks=3, per=4, log=lambda m: None)
    assert "error" not in res, res
    assert res["per"] == 4 and len(res["ours"]) == len(res["torch"]) == len(res["ratios"]) == 3
    assert all(t > 0 and math.isfinite(t) for t in res["ours"] + res["torch"])
    assert res["ratios"] == [t / o for o, t in zip(res["ours"], res["torch"])]
    line = bench.format_interleaved(res)
    assert "3 blocks of 4 steps" in line and "block ratios median" in line


def test_a_worker_that_cannot_start_is_reported():
    res = bench.interleave(["mlp", "ours"], ["gpt", "no-such-size", "llvm"], blocks=1, per=1, log=lambda m: None)
    assert res["error"].startswith("the torch worker did not start")
    assert "failed: the torch worker did not start" in bench.format_interleaved(res)


# ----------------------------------------------------------------------------- the JAX peer

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from neural_arch.models import compile_train_step  # noqa: E402
from neural_arch.tools.bench.common import have  # noqa: E402

needs_jax = pytest.mark.skipif(not have("jax"), reason="jax is not installed (the test extra pins jax/jaxlib 0.10.2)")

# JAX runs in a child process: XLA's thread pool is sized when its backend starts (NPROC,
# set by the bench), and this process forks to compile our kernels, which a process holding
# XLA's threads should not do
_JAX_CHILD = """
import sys, numpy as np
from neural_arch.tools.bench import train as bench
case, out, wd = sys.argv[1], sys.argv[2], sys.argv[3]
step, info = bench._jax_mlp() if case == "mlp" else bench._jax_gpt(bench.GPT_CONFIGS[case])
if wd != "default":
    step.opt.weight_decay = float(wd)
losses = [step() for _ in range(3)]
np.savez(out, __losses__=np.array(losses, np.float64), **step.numpy_params())
"""


def _jax_three_steps(case: str, tmp_path, weight_decay: str = "default"):
    out = tmp_path / f"jax_{case}_{weight_decay}.npz"
    p = subprocess.run([sys.executable, "-c", _JAX_CHILD, case, str(out), weight_decay],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    z = np.load(out)
    return list(z["__losses__"]), {k: z[k] for k in z.files if k != "__losses__"}


def _ours_three_steps(case: str):
    """Our compiled step as the bench builds it: (initial state dict, 3 losses, state dict after)."""
    if case == "mlp":
        model, opt, loss_fn, batch, _ = bench._mlp_setup()
    else:
        model, opt, loss_fn, batch = bench._gpt_setup(bench.GPT_CONFIGS[case])
    init = model.state_dict()
    step = compile_train_step(model, loss_fn, opt, *batch)
    losses = [step(*batch) for _ in range(3)]
    return init, losses, model.state_dict()


@needs_jax
def test_jax_gpt_tiny_step_matches_ours_for_three_steps(tmp_path):
    init, ours, after = _ours_three_steps("tiny")
    jax_losses, jax_params = _jax_three_steps("tiny", tmp_path)
    # losses 2 and 3 come after AdamW updates: the optimizer must match as well as the model
    np.testing.assert_allclose(jax_losses, ours, rtol=1e-5)
    assert ours[2] < ours[0] - 0.3  # (the steps do move the parameters)
    assert set(jax_params) == {k for k in after if k != "lm_head.weight"}  # wte tied: one parameter
    for k, v in jax_params.items():
        d = np.abs(v - after[k])
        # elements whose gradient is rounding noise may take the other sign of the update
        # (lr 1e-3 a step); the rest agree to float32 rounding
        assert np.mean(d > 1e-5) < 1e-3 and d.max() < 6e-3, (k, d.max(), np.mean(d > 1e-5))
        assert np.abs(v - init[k]).max() > 1e-3, k  # every parameter was updated
        if k.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            # LayerNorm gains ~1: decoupled weight decay moves them by 3e-5 in 3 steps
            np.testing.assert_allclose(v, after[k], rtol=0, atol=2e-6, err_msg=k)


@needs_jax
def test_jax_mlp_step_matches_ours_for_three_steps_and_weight_decay_counts(tmp_path):
    init, ours, after = _ours_three_steps("mlp")
    jax_losses, jax_params = _jax_three_steps("mlp", tmp_path)
    np.testing.assert_allclose(jax_losses, ours, rtol=1e-5)
    assert sorted(jax_params) == sorted(after)
    for k, v in jax_params.items():
        np.testing.assert_allclose(v, after[k], rtol=0, atol=5e-7, err_msg=k)
    # the tolerance sees the optimizer: without weight decay (ours has 0.01) the weights differ
    _, no_wd = _jax_three_steps("mlp", tmp_path, "0.0")
    assert max(np.abs(no_wd[k] - after[k]).max() for k in after if k.endswith("weight")) > 1e-6


def test_bench_cli_mlp_has_a_jax_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--only", "mlp", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["mlp"]
    jax_lines = [ln for ln in text.splitlines() if ln.strip().startswith("jax ")]
    if not have("jax"):
        print("jax is not installed: checking that the row says so")
        assert rows["jax"] == {"skipped": bench.JAX_MISSING}
        assert jax_lines and "skipped: jax is not installed" in jax_lines[0]
        return
    r = rows["jax"]
    assert "error" not in r, r
    assert r["steps"] == 300 and 0 < r["min_s"] <= r["median_s"] and r["compile_s"] > 0
    assert r["threads"] == int(os.environ.get("NARCH_BENCH_THREADS", "2")) and r["jax"] and r["jaxlib"]
    assert len(jax_lines) == 1 and "ms/step" in jax_lines[0]
    ratio = rows["jax"]["median_s"] / rows["ours"]["median_s"]
    assert f"ours faster by {ratio:.2f}x" in jax_lines[0]
    assert any(ln.strip().startswith("jax: ") and "first call (trace + compile)" in ln for ln in text.splitlines())


def test_gpt_table_has_a_jax_row_or_says_it_is_missing():
    ours = bench._spawn(["gpt", "tiny", "llvm", "2"])
    assert "error" not in ours, ours
    missing = bench.format_gpt("tiny", {"ours": ours, "jax": {"skipped": bench.JAX_MISSING}})
    assert f"  {'jax':16} skipped: {bench.JAX_MISSING}" in missing.splitlines()
    # a compile-only worker (steps 0) is one more sample of the cached compile; the table
    # gives their median and each
    again = bench._spawn(["gpt", "tiny", "llvm", "0"])
    assert set(again) == {"compile_s", "nodes"} and again["nodes"] == ours["nodes"], again
    samples = dict(ours, cached_compiles_s=[0.31, 0.2, 0.25])
    table = bench.format_gpt("tiny", {"ours": samples, "ours_cold": {"compile_s": 4.0, "cold_compiles_s": [4.0, 3.5, 5.5]}})
    assert "compile cold 4.00 s (median of 3 processes: 4.00, 3.50, 5.50), cached 0.25 s (median of 3 processes: " \
        "0.31, 0.20, 0.25)" in table
    if not have("jax"):
        print("jax is not installed: only the missing-jax row is checked")
        return
    jx = bench._spawn(["gpt", "tiny", "jax", "2"])
    assert "error" not in jx, jx
    assert jx["steps"] == 2 and jx["compile_s"] > 0 and jx["median_s"] > 0
    lines = bench.format_gpt("tiny", {"ours": ours, "jax": jx}).splitlines()
    row = [ln for ln in lines if ln.startswith("  jax ")]
    assert len(row) == 1 and f"{jx['median_s'] / ours['median_s']:.2f}x" in row[0]
    assert any(ln.startswith("  jax: ") and f"{jx['threads']} XLA threads" in ln for ln in lines)

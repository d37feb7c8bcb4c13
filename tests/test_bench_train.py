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

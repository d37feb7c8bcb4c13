"""`narch bench models` end to end at its tiny size: the driver spawns our worker (cold and
cached) and PyTorch's, on the same weights, and prints one table per case."""
import json

import numpy as np

import pytest

from neural_arch.tools.bench import models as bench

pytest.importorskip("torch", reason="the benchmark compares against PyTorch (test extra)")
pytest.importorskip("transformers", reason="the benchmark's twins come from transformers (test extra)")


def test_bert_case_prints_ratios_and_ours_equals_torch_on_the_same_weights(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--size", "tiny", "--only", "bert", "--steps", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["size"] == "tiny" and data["steps"] == 1 and list(data["cases"]) == ["bert"]
    rows = data["cases"]["bert"]
    for key in ("ours", "ours_cold", "torch"):
        assert "error" not in rows[key], (key, rows[key])
    ours, theirs = rows["ours"], rows["torch"]
    assert ours["steps"] == theirs["steps"] == 1
    assert ours["median_s"] > 0 and theirs["median_s"] > 0 and ours["min_s"] <= ours["median_s"]
    assert ours["kernels"] > 0 and ours["nodes"] > ours["kernels"]  # fusion merged nodes into kernels
    assert rows["ours_cold"]["compile_s"] > 0 and ours["compile_s"] > 0
    # our compiled forward and transformers' BertModel agree on the weights our worker wrote
    ag = rows["agreement"]
    assert ag["hidden_max_abs"] < 1e-4 and ag["pooled_max_abs"] < 1e-4, ag
    # the table: the case header, our row, torch's row with the ratio, compile times, the summary
    assert "BERT inference (hidden 32, 2 layers" in text and "batch 4 x 16 tokens (2 rows padded" in text
    ratio = theirs["median_s"] / ours["median_s"]
    lines = text.splitlines()
    assert any(ln.split()[:1] == ["ours"] and float(ln.split()[1]) > 0 for ln in lines)
    assert any(ln.strip().startswith("torch eager") and f"{ratio:.2f}x" in ln for ln in lines)
    assert f"compile cold {rows['ours_cold']['compile_s']:.2f} s, cached {ours['compile_s']:.2f} s" in text
    assert "max |ours - torch|: last_hidden_state" in text
    summary = next(ln for ln in lines if ln.split()[:1] == ["bert"])
    assert summary.split()[3] == f"{ratio:.2f}x"


def test_unknown_cases_are_refused():
    with pytest.raises(SystemExit, match="unknown case.*gpt.*available: bert, vit, clip"):
        bench.main(["--only", "bert,gpt"])


@pytest.mark.parametrize("case", ["vit", "clip"])
def test_training_cases_run_ours_and_profile_the_first_step(tmp_path, case):
    """Our side of a training case (the compiled step and its profile from the first step's
    inputs), whichever way the step calls its native program."""
    row = bench.worker_ours(case, "tiny", 2, str(tmp_path), profile=True)
    assert row["steps"] == 2 and row["median_s"] > 0 and row["kernels"] > 0, row
    assert len(row["losses"]) >= 2 and all(np.isfinite(row["losses"])), row["losses"]  # (warm-up steps too)
    head = row["profile"].splitlines()[0]
    assert head.startswith(f"{case} (tiny): {row['kernels']} kernels"), head

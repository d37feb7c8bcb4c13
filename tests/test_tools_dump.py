"""`narch dump`: every format for every zoo model; the text parses back to an equal graph;
the JSON is complete (it rebuilds the graphs); DOT/SVG carry the fusion clusters; the HTML
report renders in headless Chromium with no console errors (and a screenshot is taken)."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from neural_arch.compiler.ir import TensorType, parse
from neural_arch.tools import browser, dump, zoo
from neural_arch.tools.dump import parse_shape
from neural_arch.tools.cli import main

MODELS = [n for n, why in zoo.available().items() if why is None]
UNAVAILABLE = {n: why for n, why in zoo.available().items() if why is not None}
_DUMPS: dict = {}


def collected(name: str, train: bool = False) -> dump.Dump:
    """One Dump per (model, train) for the whole module (compiling is the slow part)."""
    key = (name, train)
    if key not in _DUMPS:
        _DUMPS[key] = dump.collect(name, train=train)
    return _DUMPS[key]


def test_the_zoo_has_its_models():
    assert {"mlp", "gpt2-tiny"} <= set(MODELS), UNAVAILABLE
    for name in UNAVAILABLE:
        print(f"zoo entry {name} is not available: {UNAVAILABLE[name]}")


@pytest.mark.parametrize("name", MODELS)
def test_text_parses_back_to_an_equal_graph(name):
    d = collected(name)
    for stage in ("trace", "final", "backward", "pass:cse", "pass:1"):
        text = dump.render(d, [stage], "text")
        assert parse(text) == d.graph(stage), stage
    assert parse(dump.render(d, ["trace"], "text")).nodes[0].loc is not None  # source lines survive


@pytest.mark.parametrize("name", ["mlp", "gpt2-tiny"])
def test_training_step_text_and_passes(name):
    d = collected(name, train=True)
    g = parse(dump.render(d, ["trace"], "text"))
    assert g == d.traced and {i.kind for i in g.inputs} == {"arg", "param", "state"}
    passes = dump.render(d, ["passes"], "text")
    # every pass's graph appears, parseable, after its header with its time and node counts
    chunks = re.split(r"^// ----- after .*-----\n", passes, flags=re.M)[1:]
    assert len(chunks) == len(d.pipeline.records)
    for chunk, (_, g_after) in zip(chunks, d.pipeline.stages[1:]):
        assert parse(chunk[:chunk.index("\n}\n") + 3]) == g_after


@pytest.mark.parametrize("name", MODELS)
def test_json_is_valid_and_complete(name):
    d = collected(name)
    data = json.loads(dump.render(d, ["all"], "json"))
    st = data["stages"]
    assert set(st) == set(dump.STAGES)
    for stage in ("trace", "final", "backward"):
        assert dump.graph_from_json(st[stage]["graph"]) == d.graph(stage)
        assert parse(st[stage]["text"]) == d.graph(stage)
    assert [p["pass"] for p in st["passes"]] == [r.name for r in d.pipeline.records]
    for p, (_, g) in zip(st["passes"], d.pipeline.stages[1:]):
        assert dump.graph_from_json(p["graph"]) == g and p["ms"] >= 0
    # fusion: every computed node is in exactly one kernel, and every node has a decision
    fused = [n for k in st["fusion"]["kernels"] for n in k["nodes"]]
    assert len(fused) == len(set(fused)) and set(fused) == set(d.plan.group_of)
    assert {x["node"] for x in st["fusion"]["decisions"]} == {n.name for n in d.final.nodes}
    assert all(x["reason"] for x in st["fusion"]["decisions"])
    # memory: the program's own plan, buffers with offsets inside the arena
    mem = st["memory"]
    assert {b["name"] for b in mem["buffers"]} == set(d.memory.buffers if d.memory else ())
    for b in mem["buffers"]:
        assert 0 <= b["offset"] and b["offset"] + b["nbytes"] <= mem["arena_bytes"] and b["start"] <= b["end"]
    assert mem["arena_bytes"] <= mem["naive_bytes"]
    assert [k["name"] for k in st["kernels"]] == [k.name for k in d.program.kernels]
    assert "define" in st["llvm"]["text"] and "narch_main" in st["llvm-opt"]["text"]
    assert "narch_main:" in st["asm"]["text"]


def test_json_keeps_non_finite_attributes():
    from neural_arch.compiler.ir import Graph, GraphInput, Node, TensorType
    t = TensorType((2,), "float32")
    g = Graph("g", (GraphInput("x", t),), (Node.make("y", "pad", ["x"], TensorType((4,)),
                                                       {"lo": (1,), "hi": (1,), "interior": (0,),
                                                        "value": float("-inf")}),), ("y",))
    assert dump.graph_from_json(json.loads(json.dumps(dump.graph_json(g)))) == g


@pytest.mark.parametrize("name", MODELS)
def test_dot_has_a_cluster_per_kernel_and_every_node(name):
    d = collected(name)
    text = dump.render(d, ["final"], "dot")
    assert text.startswith("digraph") and text.rstrip().endswith("}")
    assert text.count("subgraph cluster_k") == d.plan.kernel_count
    for n in d.final.nodes:
        assert f'id="{dump.node_id(n.name)}"' in text
    # the traced graph has no fusion plan: no clusters
    assert "cluster" not in dump.render(d, ["trace"], "dot")


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` is not installed (tools/setup_system.sh)")
@pytest.mark.parametrize("name", MODELS)
def test_svg_from_dot(name):
    svg = dump.render(collected(name), ["final"], "svg")
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg.count('class="cluster"') == collected(name).plan.kernel_count


def test_svg_without_dot_is_one_line_saying_how_to_get_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no `dot` on it
    assert main(["dump", "mlp", "--format", "svg"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "apt-get install graphviz" in err


def test_llvm_and_assembly_of_one_kernel(capsys):
    d = collected("mlp")
    k = d.select_kernel("1")
    assert k == d.program.kernels[1].name and d.select_kernel(k.split(".")[0]) == k
    ll = dump.render(d, ["llvm"], "text", kernel=k)
    opt = dump.render(d, ["llvm-opt"], "text", kernel=k)
    asm = dump.render(d, ["asm"], "text", kernel=k)
    assert re.search(rf'define .*@"?{re.escape(k)}"?\(', ll) and "narch_main" not in ll
    assert re.search(rf'define .*@"?{re.escape(k)}"?\(', opt)
    assert f"{k}:" in asm and ".size" in asm
    with pytest.raises(dump.DumpError, match="no such kernel"):
        d.select_kernel("k999")


def test_fusion_memory_and_kernels_text():
    d = collected("gpt2-tiny")
    fusion = dump.render(d, ["fusion"], "text")
    assert f"{d.plan.kernel_count} kernels" in fusion and "decisions:" in fusion and "starts" in fusion
    mem = dump.render(d, ["memory"], "text")
    assert "planned peak" in mem and all(f"%{b}" in mem for b in d.memory.buffers)
    assert dump.render(d, ["kernels"], "text").count("\n") >= len(d.program.kernels)


# ----------------------------------------------------------------------------- the CLI


def test_cli_dump_zoo_and_user_function(tmp_path, capsys):
    assert main(["dump", "mlp", "--stage", "fusion,memory"]) == 0
    out = capsys.readouterr().out
    assert "// ===== fusion =====" in out and "planned peak" in out
    src = tmp_path / "model.py"
    src.write_text("from neural_arch.compiler import functional as F\n"
                   "def loss(x, w):\n    return F.sum(F.tanh(x @ w))\n")
    assert main(["dump", f"{src}:loss", "--shape", "4x8", "--shape", "8x3"]) == 0
    g = parse(capsys.readouterr().out)
    assert [n.op for n in g.nodes] == ["matmul", "tanh", "sum"] and g.nodes[0].loc.line == 3
    out_path = tmp_path / "grad.txt"
    assert main(["dump", f"{src}:loss", "--shape", "4x8", "--shape", "8x3", "--grad", "-o", str(out_path)]) == 0
    assert len(parse(out_path.read_text()).outputs) == 2


@pytest.mark.parametrize("argv, message", [
    (["dump", "nosuch"], "unknown target 'nosuch'"),
    (["dump", "mlp", "--stage", "bogus"], "unknown stage 'bogus'"),
    (["dump", "mlp", "--stage", "pass:nosuch"], "no such pass"),
    (["dump", "mlp", "--stage", "asm", "--kernel", "99"], "--kernel 99"),
    (["dump", "missing.py:f"], "no such file"),
    (["dump", "mlp", "--grad"], "--grad is for"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0, err


def test_cli_dot_without_a_stage_draws_the_final_graph_with_its_kernels(capsys):
    """`narch dump mlp --format dot` (and svg, docs/dump.md) draws the kernels as clusters;
    it drew the traced graph, which has none."""
    assert main(["dump", "mlp", "--format", "dot"]) == 0
    text = capsys.readouterr().out
    assert text == dump.render(collected("mlp"), ["final"], "dot")
    assert text.count("subgraph cluster_k") == collected("mlp").plan.kernel_count > 0
    assert main(["dump", "mlp", "--format", "dot", "--stage", "trace"]) == 0  # a named stage still wins
    assert "cluster" not in capsys.readouterr().out


def test_every_stage_header_starts_a_line():
    """LLVM's text ends without a newline: the next stage's header joined its last line."""
    text = dump.render(collected("mlp"), ["llvm", "llvm-opt", "asm", "trace"], "text")
    assert re.findall(r"^// ===== (\S+) =====$", text, flags=re.M) == ["llvm", "llvm-opt", "asm", "trace"]
    assert text.count("// =====") == 4 and dump.render(collected("mlp"), ["llvm"], "text").endswith("}\n")


def test_stage_all_of_a_function_without_a_gradient(tmp_path, capsys):
    """`--stage all` of a function whose output is not a float scalar dumps every other stage
    (it failed on the backward graph); asking for `backward` by name is still an error."""
    src = tmp_path / "model.py"
    src.write_text("from neural_arch.compiler import functional as F\n"
                   "def act(x):\n    return F.tanh(x) * 2.0\n")
    assert main(["dump", f"{src}:act", "--shape", "4x8", "--stage", "all"]) == 0
    text = capsys.readouterr().out
    assert re.findall(r"^// ===== (\S+) =====$", text, flags=re.M) == [s for s in dump.STAGES if s != "backward"]
    assert main(["dump", f"{src}:act", "--shape", "4x8", "--stage", "all", "--format", "json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["stages"]) == [s for s in dump.STAGES if s != "backward"]
    assert main(["dump", f"{src}:act", "--shape", "4x8", "--stage", "backward"]) == 2
    assert "no backward graph: autodiff: the output of act must be a float scalar" in capsys.readouterr().err


def test_cli_shape_errors_name_the_whole_argument(tmp_path, capsys):
    src = tmp_path / "model.py"
    src.write_text("def f(x):\n    return x\n")
    assert main(["dump", f"{src}:f", "--shape", "4x8:float16"]) == 2
    assert "bad --shape '4x8:float16': unsupported dtype 'float16'" in capsys.readouterr().err
    assert main(["dump", f"{src}:f", "--shape", "4xq"]) == 2
    assert "bad --shape '4xq'" in capsys.readouterr().err
    for loose in ("4xx8", "4x8x", "4 x 8"):  # (were read as 4x8)
        assert main(["dump", f"{src}:f", "--shape", loose]) == 2
        assert f"bad --shape '{loose}': dimensions are non-negative integers joined by 'x'" in capsys.readouterr().err
    with pytest.raises(dump.DumpError, match="bad --shape '4x-8': dimensions are non-negative integers"):
        parse_shape("4x-8")
    assert parse_shape("4x8:int64") == TensorType((4, 8), "int64") and parse_shape("scalar") == TensorType((), "float32")


def test_user_files_load_as_python_runs_them(tmp_path, capsys, monkeypatch):
    """A model file importing its own helper module failed (ModuleNotFoundError: its folder
    was not importable), a dataclass in it failed ('NoneType' object has no attribute
    '__dict__': the module was not in sys.modules), and a FileNotFoundError raised by its own
    code was reported as the file itself missing."""
    monkeypatch.setattr("sys.path", list(__import__("sys").path))  # loading adds the file's folder
    (tmp_path / "helper_for_narch_test.py").write_text(
        "from neural_arch.compiler import functional as F\ndef block(x):\n    return F.tanh(x)\n")
    src = tmp_path / "model.py"
    src.write_text("from __future__ import annotations\n"
                   "from dataclasses import dataclass\n"
                   "from neural_arch.compiler import functional as F\n"
                   "from helper_for_narch_test import block\n"
                   "@dataclass\nclass Cfg:\n    scale: float = 2.0\n"
                   "def loss(x):\n    return F.sum(block(x)) * Cfg().scale\n"
                   "limit = 3\n")
    assert main(["dump", f"{src}:loss", "--shape", "4x8"]) == 0, capsys.readouterr().err
    assert [n.op for n in parse(capsys.readouterr().out).nodes][:2] == ["tanh", "sum"]
    assert main(["dump", f"{src}:limit"]) == 2
    assert f"{src}: 'limit' is not a function (its value is of type int)" in capsys.readouterr().err
    reads = tmp_path / "reads.py"
    reads.write_text("open('weights_that_are_not_there.bin')\n")
    assert main(["dump", f"{reads}:f"]) == 1
    err = capsys.readouterr().err
    assert "weights_that_are_not_there.bin" in err and "no such file" not in err


@pytest.mark.parametrize("argv, message", [
    (["dump", "mlp", "--shape", "4x8"], "--shape is for path/to/file.py:function targets; mlp has its own"),
    (["dump", "bench:mlp", "--grad"], "--grad is for path/to/file.py:function targets; bench:mlp has its own"),
    (["profile", "mlp", "--shape", "4x8"], "--shape is for path/to/file.py:function targets"),
])
def test_options_a_zoo_target_ignores_are_refused(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0, err


def test_debug_after_the_command_shows_the_traceback(capsys):
    """The one-line errors say `--debug` shows the traceback; it was only accepted before the
    command (`narch --debug dump ...`)."""
    with pytest.raises(dump.DumpError, match="unknown target 'nosuch'"):
        main(["dump", "nosuch", "--debug"])
    with pytest.raises(dump.DumpError, match="unknown target 'nosuch'"):
        main(["--debug", "dump", "nosuch"])
    assert main(["dump", "nosuch"]) == 2


def test_help_lists_every_option_with_examples(capsys):
    for cmd in ("dump", "difftest", "profile"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "example" in out
        parser = {a.dest for a in _subparser(cmd)._actions}
        for dest in parser - {"help"}:
            assert dest.replace("_", "-") in out or dest in out, (cmd, dest)


def _subparser(cmd):
    from neural_arch.tools.cli import build_parser
    p = build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[cmd]


# ----------------------------------------------------------------------------- the HTML report


def _chromium_or_skip():
    if browser.find_chromium() is None:
        reason = browser.why_no_chromium()
        print(f"SKIP: {reason}")
        pytest.skip(reason)


@pytest.mark.parametrize("name, layout", [(m, "auto") for m in MODELS] + [("mlp", "builtin")])
def test_html_report_renders_in_headless_chromium(name, layout, tmp_path):
    d = collected(name)
    page = tmp_path / f"{name}.html"
    page.write_text(dump.render(d, ["all"], "html", layout=layout))
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text  # no network
    _chromium_or_skip()
    shot = tmp_path / f"{name}-{layout}.png"
    res = browser.load_page(str(page), screenshot=str(shot))
    status = re.search(r'data-status="([^"]*)"', res.dom)
    assert status, res.dom[:500]
    m = re.fullmatch(r"rendered: (\d+) graph nodes, (\d+) kernels, (\d+) buffers", status.group(1))
    assert m, status.group(1)
    assert int(m.group(1)) >= len(d.final.nodes) + len(d.final.inputs)
    assert int(m.group(2)) == d.plan.kernel_count
    assert "data-error" not in res.dom
    assert res.console == [], res.console
    # the node table has a row per value; the pipeline lists every pass
    assert res.dom.count('id="row-v_') == len(d.final.nodes) + len(d.final.inputs)
    assert shot.exists() and shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")


def test_browser_reports_console_errors(tmp_path):
    """The console check can fail: a page with an error is caught."""
    _chromium_or_skip()
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); undefinedFunction();</script></body></html>")
    res = browser.load_page(str(bad))
    assert any("boom" in c for c in res.console) and any("undefinedFunction" in c for c in res.console)


def test_html_training_step_report_is_self_contained(tmp_path):
    d = collected("mlp", train=True)
    html = dump.render(d, ["all"], "html")
    data = json.loads(re.search(r'<script type="application/json" id="narch-data">(.*?)</script>', html,
                                re.S).group(1))
    assert [s["name"] for s in data["stages"]] == ["trace"] + [r.name for r in d.pipeline.records]
    assert all(s["ms"] is not None for s in data["stages"][1:])
    assert set(data["llvm"]) == {k.name for k in d.program.kernels}
    assert all(e["llvm"] and e["opt"] and e["asm"] for e in data["llvm"].values())
    assert not re.search(r"<(script|link)[^>]+(src|href)=", html)  # nothing loaded from elsewhere


def test_llvm_of_a_kernel_alike_another_shows_the_function_it_runs():
    """GPT-2's second block lowers to the first block's kernels (``Kernel.same_as``): its
    kernels have no functions of their own, and --kernel shows the one they run."""
    d = collected("gpt2-tiny", train=True)
    alike = [k for k in d.program.kernels if k.same_as]
    assert alike, [k.name for k in d.program.kernels]
    k = alike[0]
    ll = dump.render(d, ["llvm"], "text", kernel=k.name)
    assert ll.startswith(f"; {k.name} runs the function of {k.same_as} ")
    assert re.search(rf'define .*@"?{re.escape(k.same_as)}"?\(', ll)
    assert not re.search(rf'define .*@"?{re.escape(k.name)}"?\(', ll)

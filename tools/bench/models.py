"""Model-zoo benchmarks (``narch bench models``): our compiled BERT, ViT and CLIP against
their ``transformers`` twins with the same config and the same weights, measured in one run:

* ``bert``: BERT at all-MiniLM-L6-v2 size (hidden 384, 6 layers, 12 heads, intermediate 1536,
  vocab 30522), inference on a batch of 32 sentences of 128 tokens (random ids; an attention
  mask pads every other row to a random length), forward only: our compiled
  ``BERTModel.encode`` vs ``BertModel`` under ``torch.no_grad()``;
* ``vit``: a ViT training step (image 32, patch 4, 3 channels, hidden 128, depth 4, 4 heads,
  MLP ratio 4, 10 classes, batch 32; cross entropy, AdamW): ``compile_train_step`` vs
  ``ViTForImageClassification`` + ``torch.optim.AdamW``;
* ``clip``: a CLIP training step (the vision tower as the ViT above; a causal text tower with
  hidden 128, 4 layers, 4 heads, context 16, vocab 1000; projection 128; batch 32 image/caption
  pairs with padded captions; the symmetric contrastive loss, AdamW) vs ``CLIPModel``.

PyTorch runs eager with 2 threads (``NARCH_BENCH_THREADS``) and HF's default attention
(``sdpa``; ``--torch-attn eager`` for the plain matmul/softmax path); ``--torch-compile`` adds
torch.compile (the first call compiles, for a minute or more). Each measurement runs in its own
subprocess (``--worker``), as in ``narch bench train``: step times are medians over ``--steps``
timed steps after 2 warm-up steps, peak memory is the growth of the worker's resident set while
it steps (high-water mark reset through /proc/self/clear_refs), our compile time is measured
cold (a fresh, empty NEURAL_ARCH_CACHE_DIR) and cached (a second process reading that cache).

Both sides run the same weights: our worker draws them (``nn.manual_seed(0)``) and writes them
as a Hugging Face ``model.safetensors``, which the torch worker loads with ``from_pretrained``
(every tensor must load). The table reports how far the two agree: BERT's hidden states and
pooler output, and the training losses step by step (AdamW with the same hyperparameters).

    narch bench models [--only bert,vit,clip] [--steps 10] [--torch-compile] [--profile] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from neural_arch.tools.bench.common import have, ratio_row, spawn_worker, time_steps

CASES = ("bert", "vit", "clip")

# size "full" is the benchmark; "tiny" is a few-second smoke run of the same code (the tests use it)
BERT = {  # vocab, hidden, layers, heads, intermediate, batch, tokens
    "full": dict(vocab=30522, hidden=384, layers=6, heads=12, inter=1536, batch=32, tokens=128),
    "tiny": dict(vocab=100, hidden=32, layers=2, heads=4, inter=64, batch=4, tokens=16),
}
VIT = {
    "full": dict(image=32, patch=4, channels=3, classes=10, hidden=128, depth=4, heads=4, mlp_ratio=4, batch=32),
    "tiny": dict(image=8, patch=4, channels=3, classes=10, hidden=16, depth=1, heads=2, mlp_ratio=2, batch=4),
}
CLIP_TEXT = {
    "full": dict(hidden=128, layers=4, heads=4, context=16, vocab=1000, projection=128),
    "tiny": dict(hidden=16, layers=1, heads=2, context=8, vocab=50, projection=8),
}
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01  # AdamW, the same on both sides

WEIGHTS = "model.safetensors"


# ----------------------------------------------------------------------------- configs and data


def _bert_kw(size):
    c = BERT[size]
    return dict(vocab_size=c["vocab"], hidden_size=c["hidden"], num_hidden_layers=c["layers"],
                num_attention_heads=c["heads"], intermediate_size=c["inter"], max_position_embeddings=512,
                type_vocab_size=2, layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                pad_token_id=0)


def _vit_kw(size):
    c = VIT[size]
    return dict(image_size=c["image"], patch_size=c["patch"], num_channels=c["channels"], hidden_size=c["hidden"],
                num_hidden_layers=c["depth"], num_attention_heads=c["heads"],
                intermediate_size=c["mlp_ratio"] * c["hidden"], hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)


def _clip_kw(size):
    t, v = CLIP_TEXT[size], VIT[size]
    text = dict(vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=4 * t["hidden"],
                num_hidden_layers=t["layers"], num_attention_heads=t["heads"], max_position_embeddings=t["context"],
                pad_token_id=0, bos_token_id=t["vocab"] - 2, eos_token_id=t["vocab"] - 1)
    vision = dict(image_size=v["image"], patch_size=v["patch"], num_channels=v["channels"], hidden_size=v["hidden"],
                  intermediate_size=v["mlp_ratio"] * v["hidden"], num_hidden_layers=v["depth"],
                  num_attention_heads=v["heads"])
    return text, vision, t["projection"]


def bert_batch(size):
    """ids (B, T), token types (zeros) and a mask padding every other row to a random length."""
    c = BERT[size]
    b, t = c["batch"], c["tokens"]
    rng = np.random.default_rng(0)
    ids = rng.integers(1, c["vocab"], (b, t)).astype(np.int64)
    mask = np.ones((b, t), np.int64)
    for r in range(1, b, 2):
        mask[r, rng.integers(t // 8, t):] = 0
    ids[mask == 0] = 0
    return ids, np.zeros((b, t), np.int64), mask


def vit_batch(size):
    c = VIT[size]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((c["batch"], c["channels"], c["image"], c["image"])).astype(np.float32)
    return x, rng.integers(0, c["classes"], c["batch"]).astype(np.int64)


def clip_batch(size):
    """Captions [bos, words..., eos, pad...] of random lengths with their mask, and images."""
    t, v = CLIP_TEXT[size], VIT[size]
    b, ctx, vocab = v["batch"], t["context"], t["vocab"]
    rng = np.random.default_rng(2)
    ids = np.zeros((b, ctx), np.int64)
    mask = np.zeros((b, ctx), np.int64)
    for r in range(b):
        end = int(rng.integers(2, ctx))  # the eos position
        ids[r, 0] = vocab - 2
        ids[r, 1:end] = rng.integers(1, vocab - 2, end - 1)
        ids[r, end] = vocab - 1
        mask[r, :end + 1] = 1
    x = rng.standard_normal((b, v["channels"], v["image"], v["image"])).astype(np.float32)
    return ids, x, mask


def describe(case: str, size: str) -> str:
    if case == "bert":
        c = BERT[size]
        ids, _, mask = bert_batch(size)
        padded = int((mask.sum(1) < c["tokens"]).sum())
        return (f"BERT inference ({'all-MiniLM-L6-v2 size: ' if size == 'full' else ''}hidden {c['hidden']}, "
                f"{c['layers']} layers, {c['heads']} heads, intermediate {c['inter']}, vocab {c['vocab']}), "
                f"batch {c['batch']} x {c['tokens']} tokens ({padded} rows padded, {int(mask.sum())} real tokens), "
                f"forward only")
    v = VIT[size]
    vit = (f"image {v['image']}, patch {v['patch']}, {v['channels']} channels, hidden {v['hidden']}, "
           f"depth {v['depth']}, {v['heads']} heads, mlp ratio {v['mlp_ratio']}")
    if case == "vit":
        return f"ViT training step ({vit}, {v['classes']} classes), batch {v['batch']}, cross entropy + AdamW"
    t = CLIP_TEXT[size]
    return (f"CLIP training step (vision: {vit}; text: hidden {t['hidden']}, {t['layers']} layers, {t['heads']} heads, "
            f"context {t['context']}, vocab {t['vocab']}; projection {t['projection']}), batch {v['batch']}, "
            f"symmetric contrastive loss + AdamW")


# ----------------------------------------------------------------------------- our side


def _our_model(case: str, size: str, weights_dir: str):
    """Our model drawn with seed 0; its weights written as the HF checkpoint file the torch
    worker loads (or read back from it when an earlier worker wrote it)."""
    from safetensors.numpy import load_file, save_file

    from neural_arch.models import (BERTConfig, BERTModel, CLIPConfig, CLIPModel, ViTConfig,
                                    ViTForImageClassification, nn)
    nn.manual_seed(0)
    if case == "bert":
        model = BERTModel(BERTConfig(**_bert_kw(size)))
    elif case == "vit":
        model = ViTForImageClassification(ViTConfig(**_vit_kw(size), num_classes=VIT[size]["classes"]))
    else:
        text, vision, proj = _clip_kw(size)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj))
    path = os.path.join(weights_dir, WEIGHTS)
    if os.path.exists(path):
        model.load_state_dict(load_file(path))
    else:
        tmp = path + f".{os.getpid()}.tmp"
        save_file({k: np.require(v, requirements="C") for k, v in model.state_dict().items()}, tmp)  # keeps 0-d
        os.replace(tmp, path)
    return model


def _profile_table(graph, inputs, label: str, iters: int) -> str:
    from neural_arch.tools.profile import profile_program
    return profile_program(graph, inputs, label, iters=iters, warmup=1).table(top=15)


def worker_ours(case: str, size: str, steps: int, weights_dir: str, profile: bool = False) -> dict:
    from neural_arch.models import compile_train_step, optim
    model = _our_model(case, size, weights_dir)
    if case == "bert":
        from neural_arch.compiler import compile
        model.eval()
        ids, types, mask = bert_batch(size)
        t = time.perf_counter()
        f = compile(model.encode, ids, types, mask, name="bert")
        compile_s = time.perf_counter() - t
        hidden, pooled = f.run_arrays(ids, types, mask)
        np.savez(os.path.join(weights_dir, "out_ours.npz"), hidden=hidden, pooled=pooled)
        res = time_steps(lambda: f.run_arrays(ids, types, mask), steps)
        prog, graph, inputs = f.program, f.traced_graph, f._inputs((ids, types, mask))
    else:
        if case == "vit":
            batch = vit_batch(size)

            def loss_fn(m, x, y):
                return m(x, y)[1]
        else:
            batch = clip_batch(size)

            def loss_fn(m, i, px, msk):
                return m(i, px, msk, return_loss=True)["loss"]
        opt = optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        t = time.perf_counter()
        step = compile_train_step(model, loss_fn, opt, *batch)
        compile_s = time.perf_counter() - t
        captured, run_inner, program = [], step._run, step.runtime_program

        def keep(inputs):  # the first step's inputs, for the profile below
            if not captured:
                captured.append([np.array(a, copy=True) for a in inputs])

        def runner(inputs):  # the step without its native program's fast path
            keep(inputs)
            return run_inner(inputs)
        step._run = runner

        class FirstCall:  # the fast path calls runtime_program: see its first call, then step aside
            def __call__(self, *inputs):
                keep(inputs)
                step.runtime_program = program
                return program(*inputs)  # (a bug fixed: the fast path skipped step._run, and the
                #                            vit and clip cases failed looking for these inputs)

            def __getattr__(self, name):  # the rest of the program's face (fresh_outputs, ...)
                return getattr(program, name)
        if program is not None:
            step.runtime_program = FirstCall()
        losses = []
        res = time_steps(lambda: losses.append(step(*batch)), steps)
        res["losses"] = losses
        prog, graph, inputs = step.runtime_program, step.graph, captured[0]
    res.update(compile_s=compile_s, kernels=len(prog.kernels), nodes=len(prog.graph.nodes))
    if prog.memory_plan is not None:
        res["arena_mb"] = prog.memory_plan.arena_bytes / 2**20
    if profile:
        res["profile"] = _profile_table(graph, inputs, f"{case} ({size})", iters=max(3, min(steps, 10)))
    return res


# ----------------------------------------------------------------------------- PyTorch's side


def _hf_model(case: str, size: str, weights_dir: str, attn: str):
    """The transformers twin, loaded from the checkpoint file our worker wrote."""
    import transformers
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if case == "bert":
        cfg, cls = transformers.BertConfig(**_bert_kw(size)), transformers.BertModel
    elif case == "vit":
        cfg = transformers.ViTConfig(**_vit_kw(size), num_labels=VIT[size]["classes"])
        cls = transformers.ViTForImageClassification
    else:
        text, vision, proj = _clip_kw(size)
        cfg, cls = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj), \
            transformers.CLIPModel
    if not os.path.exists(os.path.join(weights_dir, WEIGHTS)):
        raise SystemExit(f"no {WEIGHTS} in {weights_dir}: our worker writes it first")
    cfg.save_pretrained(weights_dir)
    model, info = cls.from_pretrained(weights_dir, config=cfg, attn_implementation=attn, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
    if missing or info["mismatched_keys"]:
        raise SystemExit(f"{cls.__name__} did not load every weight: missing {missing}, "
                         f"mismatched {info['mismatched_keys']}")
    return model


def worker_torch(case: str, size: str, steps: int, weights_dir: str, compiled: bool, attn: str) -> dict:
    import torch
    torch.set_num_threads(int(os.environ.get("NARCH_BENCH_THREADS", "2")))
    model = _hf_model(case, size, weights_dir, attn)
    if case == "bert":
        model.eval()
        ids, types, mask = (torch.from_numpy(a) for a in bert_batch(size))
        fn = torch.compile(model) if compiled else model

        def run():
            with torch.no_grad():
                return fn(input_ids=ids, attention_mask=mask, token_type_ids=types)
        t = time.perf_counter()
        out = run()
        first_s = time.perf_counter() - t
        if not compiled:
            np.savez(os.path.join(weights_dir, "out_torch.npz"), hidden=out.last_hidden_state.numpy(),
                     pooled=out.pooler_output.numpy())
        res = time_steps(run, steps)
    else:
        model.train()
        if case == "vit":
            x, y = (torch.from_numpy(a) for a in vit_batch(size))

            def loss_fn():
                return model(pixel_values=x, labels=y).loss
        else:
            ids, px, mask = (torch.from_numpy(a) for a in clip_batch(size))

            def loss_fn():
                return model(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True).loss
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        fn = torch.compile(loss_fn) if compiled else loss_fn
        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            loss = fn()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        t = time.perf_counter()
        step()
        first_s = time.perf_counter() - t
        res = time_steps(step, steps)
        res["losses"] = losses
    res["first_call_s"] = first_s
    res["attn"] = attn
    return res


def run_worker(spec: list[str]) -> dict:
    case, size, who, steps, weights_dir = spec[:5]
    if case not in CASES or size not in BERT:
        raise SystemExit(f"unknown worker {spec}")
    if who == "ours":
        return worker_ours(case, size, int(steps), weights_dir, profile=len(spec) > 5 and spec[5] == "profile")
    if who in ("torch", "torch.compile"):
        return worker_torch(case, size, int(steps), weights_dir, who == "torch.compile", spec[5])
    raise SystemExit(f"unknown worker {spec}")


# ----------------------------------------------------------------------------- driver


def _spawn(spec: list[str], env: dict | None = None, timeout: float = 3600) -> dict:
    return spawn_worker("neural_arch.tools.bench.models", spec, env, timeout)


def _agreement(case: str, size: str, rows: dict, weights_dir: str) -> dict:
    """How far ours and PyTorch eager agree on the same weights and inputs."""
    ours, theirs = rows.get("ours", {}), rows.get("torch", {})
    if "error" in ours or "error" in theirs or not theirs:
        return {}
    if case == "bert":
        a = np.load(os.path.join(weights_dir, "out_ours.npz"))
        b = np.load(os.path.join(weights_dir, "out_torch.npz"))
        mask = bert_batch(size)[2].astype(bool)
        return {"hidden_max_abs": float(np.abs(a["hidden"] - b["hidden"])[mask].max()),
                "hidden_padded_max_abs": float(np.abs(a["hidden"] - b["hidden"]).max()),
                "pooled_max_abs": float(np.abs(a["pooled"] - b["pooled"]).max())}
    la, lb = np.array(ours["losses"]), np.array(theirs["losses"])  # both from step 1 on
    n = min(len(la), len(lb))
    d = np.abs(la[:n] - lb[:n])
    return {"loss_first": [float(la[0]), float(lb[0])], "loss_last": [float(la[n - 1]), float(lb[n - 1])],
            "loss_steps": n, "loss_max_abs": float(d.max()), "loss_first_abs": float(d[0])}


def bench_case(case: str, size: str, steps: int, torch_compile: bool, attn: str, profile: bool, log=print) -> dict:
    cache = tempfile.mkdtemp(prefix="narch-bench-cache-")
    weights = tempfile.mkdtemp(prefix=f"narch-bench-{case}-")
    env = {"NEURAL_ARCH_CACHE_DIR": cache}
    try:
        log(f"[{case}] ours, cold kernel cache ...")
        cold = _spawn([case, size, "ours", "1", weights], env)
        log(f"[{case}] ours, cached ...")
        rows = {"ours": _spawn([case, size, "ours", str(steps), weights] + (["profile"] if profile else []), env),
                "ours_cold": cold}
        if have("torch") and have("transformers"):
            log(f"[{case}] PyTorch eager ...")
            rows["torch"] = _spawn([case, size, "torch", str(steps), weights, attn])
            if torch_compile:
                log(f"[{case}] torch.compile ...")
                rows["torch.compile"] = _spawn([case, size, "torch.compile", str(steps), weights, attn])
        rows["agreement"] = _agreement(case, size, rows, weights)
        return rows
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(weights, ignore_errors=True)


def format_case(case: str, size: str, rows: dict) -> str:
    ours = rows["ours"]
    lines = [describe(case, size),
             f"  {'':14} {'step ms':>9} {'min ms':>9} {'ours faster by':>15} {'peak MB':>8}"]
    for key, label in (("ours", "ours"), ("torch", "torch eager"), ("torch.compile", "torch.compile")):
        r = rows.get(key)
        if r is not None:
            lines.append(ratio_row(label, r, ours, 14, 9))
    if "error" not in ours:
        cold = rows.get("ours_cold", {})
        cold_s = f"{cold['compile_s']:.2f} s" if "compile_s" in cold else f"failed ({cold.get('error', '?')})"
        lines.append(f"  ours: {ours['kernels']} kernels for {ours['nodes']} IR nodes, arena "
                     f"{ours.get('arena_mb', 0):.1f} MB; compile cold {cold_s}, cached {ours['compile_s']:.2f} s")
    tc = rows.get("torch.compile")
    if tc and "first_call_s" in tc:
        lines.append(f"  torch.compile: first call (compiles) {tc['first_call_s']:.1f} s")
    if "torch" in rows and "attn" in rows["torch"]:
        lines.append(f"  torch: {os.environ.get('NARCH_BENCH_THREADS', '2')} threads, "
                     f"attn_implementation={rows['torch']['attn']}")
    ag = rows.get("agreement") or {}
    if "hidden_max_abs" in ag:
        lines.append(f"  same weights, max |ours - torch|: last_hidden_state {ag['hidden_max_abs']:.1e} "
                     f"(real tokens; {ag['hidden_padded_max_abs']:.1e} with padding), "
                     f"pooler_output {ag['pooled_max_abs']:.1e}")
    elif "loss_max_abs" in ag:
        lines.append(f"  same weights, loss ours vs torch: step 1 {ag['loss_first'][0]:.5f} vs {ag['loss_first'][1]:.5f}, "
                     f"step {ag['loss_steps']} {ag['loss_last'][0]:.5f} vs {ag['loss_last'][1]:.5f} "
                     f"(max |diff| {ag['loss_max_abs']:.1e})")
    if "profile" in ours:
        lines.append("  per-kernel profile of ours:")
        lines += ["    " + ln for ln in ours["profile"].splitlines()]
    return "\n".join(lines)


def summary(out: dict) -> str:
    lines = ["Summary (median step time; ratio > 1: ours faster)",
             f"  {'case':6} {'ours ms':>9} {'torch ms':>9} {'vs eager':>9} {'vs compile':>11}"]
    for case, rows in out.items():
        o = rows["ours"]
        if "error" in o:
            lines.append(f"  {case:6} ours failed")
            continue
        cells = []
        for key in ("torch", "torch.compile"):
            r = rows.get(key)
            cells.append(f"{r['median_s'] / o['median_s']:.2f}x" if r and "error" not in r else "-")
        t = rows.get("torch")
        tms = f"{t['median_s'] * 1e3:9.1f}" if t and "error" not in t else f"{'-':>9}"
        lines.append(f"  {case:6} {o['median_s'] * 1e3:9.1f} {tms} {cells[0]:>9} {cells[1]:>11}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="narch bench models", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: narch bench models --only bert,vit --steps 5 --json models.json")
    ap.add_argument("--only", default=",".join(CASES), help="comma-separated cases: bert, vit, clip (default: all)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per framework, after 2 warm-up steps (default 10)")
    ap.add_argument("--torch-compile", action="store_true", help="also time torch.compile (compiles a minute or more)")
    ap.add_argument("--torch-attn", default="sdpa", choices=("sdpa", "eager"),
                    help="transformers' attention implementation (default sdpa, its default)")
    ap.add_argument("--profile", action="store_true", help="print our per-kernel profile (top 15) for each case")
    ap.add_argument("--size", default="full", choices=tuple(BERT),
                    help="full: the sizes above (default); tiny: a seconds-long smoke run of the same code")
    ap.add_argument("--json", help="also write the raw measurements to this file")
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker)))
        return 0
    cases = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        raise SystemExit(f"narch bench models: unknown case(s) {', '.join(unknown) or '(none)'} "
                         f"(available: {', '.join(CASES)})")
    if args.steps < 1:
        raise SystemExit("narch bench models: --steps must be at least 1")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    out, report = {}, []
    if not (have("torch") and have("transformers")):
        report.append("PyTorch or transformers is not installed: only our own numbers are printed "
                      "(pip install torch==2.13.0 transformers for the comparisons)")
    for case in CASES:
        if case in cases:
            out[case] = bench_case(case, args.size, args.steps, args.torch_compile, args.torch_attn, args.profile, log)
            report.append(format_case(case, args.size, out[case]))
    report.append(summary(out))
    print("\n\n".join(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "steps": args.steps, "cases": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

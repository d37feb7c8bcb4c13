"""Training and generation benchmarks (``narch bench train``), printed as ratios against
peers measured in the same run:

* a GPT-2 training step (forward, cross-entropy, backward, AdamW update) at two sizes:
  ``small`` (n_embd 384, 6 layers, 6 heads, context 128, batch 8, vocab 256) and ``tiny``
  (n_embd 128, 2 layers, 4 heads, context 64, batch 16, vocab 256): our compiled step vs
  PyTorch eager (the same model from ``transformers``), torch.compile (``--torch-compile``:
  it compiles for about a minute), JAX (``jax.jit`` of the whole step, where jax is
  installed: ``jax_steps.py``, started from our model's weights), and our NumPy interpreter
  running the same graph;
* an MLP 64-256-256-10 on scikit-learn's handwritten digits, batch 64, AdamW (ours, PyTorch
  eager, JAX);
* generation with the small config, batch 1, a 16-token prompt and 64 new tokens (greedy):
  our prefill + compiled decode over a KV cache vs PyTorch eager with its KV cache.

Every measurement runs in its own subprocess (``--worker``), so peak memory is the growth of
that process's resident set while it steps (the kernel's high-water mark, reset with
/proc/self/clear_refs after the warm-up steps) in a separate short run with glibc's mmap
threshold fixed, so freed blocks leave the resident set (times come from runs with the
default allocator: the fixed threshold costs PyTorch up to 2x); ours adds the arena and
workspace it allocated at compile time.
Step times are medians over the timed steps; the compile time of our step is measured cold
(an empty kernel cache) and cached (a fresh process reading the disk cache), each in three
processes (their median is printed, and each of them: one process swings with the host).

    narch bench train [--only small,tiny,mlp,generate] [--steps 10] [--torch-compile] [--rounds 3]
                      [--interleave 12]

``--interleave N``: ours and PyTorch also run in two live workers (``--serve``) that take
turns, N blocks each, the side going first alternating; a drift of the host's speed, which
lasts minutes, then hits both alike, and the median of the per-block ratios is the steadier
reading.
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

INTERLEAVE_STEPS = {"small": 3, "tiny": 20, "mlp": 300}  # steps per block of --interleave (~1-2 s for us)

GPT_CONFIGS = {  # n_embd, n_layer, n_head, context, batch, vocab
    "small": (384, 6, 6, 128, 8, 256),
    "tiny": (128, 2, 4, 64, 16, 256),
}


# ----------------------------------------------------------------------------- workers


def _gpt_batch(cfg):
    E, L, H, T, B, V = cfg
    rng = np.random.default_rng(0)
    return rng.integers(0, V, (B, T)).astype(np.int64), rng.integers(0, V, (B, T)).astype(np.int64)


def _gpt_setup(cfg):
    """Our side of a GPT-2 case: (model, AdamW, loss_fn, batch), seeded."""
    from neural_arch.compiler import functional as F
    from neural_arch.models import GPT2, GPT2Config, nn, optim
    E, L, H, T, B, V = cfg
    nn.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=V, n_positions=T, n_embd=E, n_layer=L, n_head=H, dropout=0.0))

    def loss_fn(m, x, y):
        return F.cross_entropy(m(x).reshape((-1, V)), y.reshape((-1,)))
    return model, optim.AdamW(model.parameters(), lr=1e-3), loss_fn, _gpt_batch(cfg)


def import_compiler() -> None:
    """Import the modules a compile loads on first use, so that our compile time, like
    torch.compile's and JAX's, counts compiling and not importing the library (which, where
    Python may not write bytecode caches, as with PYTHONDONTWRITEBYTECODE=1, compiles their
    sources on every start: 0.1-0.3 s)."""
    import neural_arch.compiler.codegen.gemm  # noqa: F401
    import neural_arch.compiler.codegen.lowering  # noqa: F401
    import neural_arch.compiler.codegen.mathlib  # noqa: F401
    import neural_arch.compiler.passes.fusion  # noqa: F401
    import neural_arch.compiler.passes.memory  # noqa: F401
    import neural_arch.runtime.cache  # noqa: F401
    import neural_arch.runtime.program  # noqa: F401
    import neural_arch.runtime.threadpool  # noqa: F401


def _ours_gpt(cfg, backend: str):
    from neural_arch.models import compile_train_step
    model, opt, loss_fn, (x, y) = _gpt_setup(cfg)
    import_compiler()
    t = time.perf_counter()
    step = compile_train_step(model, loss_fn, opt, x, y, backend=backend)
    compile_s = time.perf_counter() - t
    info = {"compile_s": compile_s, "nodes": len(step.graph.nodes)}
    return (lambda: step(x, y)), info, step


def worker_gpt_ours(cfg, backend: str, steps: int) -> dict:
    run, info, step = _ours_gpt(cfg, backend)
    if steps == 0:  # (the compile alone: one more sample of the cached compile)
        return info
    res = time_steps(run, steps, warmup=1 if backend == "interpreter" else 2)
    res.update(info)
    if backend == "llvm":
        prog = step.runtime_program
        res["kernels"] = len(prog.kernels)
        res["inplace"] = len(prog.inplace)
        res["flush_denormals"] = bool(prog.options.get("flush_denormals"))
        arena = prog.memory_plan.arena_bytes if prog.memory_plan is not None else 0
        res["arena_mb"] = arena / 2**20
        res["intermediates_mb"] = (prog.memory_plan.naive_bytes if prog.memory_plan is not None else 0) / 2**20
        # memory a step needs beyond parameters and optimizer state: the arena and GEMM
        # workspace (allocated once, at compile time) plus what the steps allocate
        res["growth_mb"] = res["peak_mb"]
        if res["peak_mb"] is not None:
            res["peak_mb"] += (arena + prog._ws.nbytes) / 2**20
    return res


def worker_gpt_torch(cfg, steps: int, compiled: bool) -> dict:
    step, compile_s = _torch_gpt(cfg, compiled)
    res = time_steps(step, steps)
    if compiled:
        res["compile_s"] = compile_s
    return res


def _torch_gpt(cfg, compiled: bool):
    """PyTorch's training step for ``cfg`` (and torch.compile's compile time, if compiled)."""
    import torch
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("NARCH_BENCH_THREADS", "2")))
    E, L, H, T, B, V = cfg
    torch.manual_seed(0)
    model = GPT2LMHeadModel(HFConfig(vocab_size=V, n_positions=T, n_embd=E, n_layer=L, n_head=H,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0))
    model.config._attn_implementation = "eager"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = (torch.from_numpy(a) for a in _gpt_batch(cfg))

    def loss_fn():
        return torch.nn.functional.cross_entropy(model(x).logits.reshape(-1, V), y.reshape(-1))
    fn = torch.compile(loss_fn) if compiled else loss_fn

    def step():
        opt.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        opt.step()
    t = time.perf_counter()
    if compiled:
        step()
    return step, time.perf_counter() - t


JAX_MISSING = "jax is not installed (pip install jax==0.10.2 jaxlib==0.10.2, in the test extra)"


def _adamw(opt) -> dict:
    """Our AdamW's settings, for JAX's."""
    return {"lr": opt.lr, "betas": opt.betas, "eps": opt.eps, "weight_decay": opt.weight_decay}


def _jax_threads() -> int:
    """XLA's CPU thread pool: as many threads as PyTorch gets (jax_steps.configure)."""
    from neural_arch.tools.bench import jax_steps
    jax_steps.configure(int(os.environ.get("NARCH_BENCH_THREADS", "2")))
    return int(os.environ["NPROC"])


def _jax_gpt(cfg):
    """JAX's training step for ``cfg`` (jax_steps.JaxTrainStep, not yet called) from our
    model's initial weights, on the same batch, with the same AdamW settings."""
    threads = _jax_threads()
    from neural_arch.tools.bench import jax_steps
    model, opt, _, batch = _gpt_setup(cfg)
    step = jax_steps.gpt2_step(model.state_dict(), cfg[2], batch, model.config.layer_norm_epsilon, **_adamw(opt))
    return step, {"threads": threads, **jax_steps.versions()}


def worker_gpt_jax(cfg, steps: int) -> dict:
    step, info = _jax_gpt(cfg)
    step()  # the first call (trace + XLA compile + one step): the compile time
    res = time_steps(step, steps)
    res.update(info, compile_s=step.compile_s)
    return res


def _mlp_data():
    try:
        from sklearn.datasets import load_digits
        d = load_digits()
        x = (d.data / 16.0).astype(np.float32)
        y = d.target.astype(np.int64)
        source = "scikit-learn digits"
    except ImportError:  # the shape is what the benchmark measures
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 1, (1797, 64)).astype(np.float32)
        y = rng.integers(0, 10, 1797).astype(np.int64)
        source = "random digits-shaped data (scikit-learn not installed)"
    return x[:64], y[:64], source


def _mlp_setup():
    """Our side of the MLP case: (model, AdamW, loss_fn, batch, data source), seeded."""
    from neural_arch.compiler import functional as F
    from neural_arch.models import nn, optim
    x, y, source = _mlp_data()
    nn.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return model, optim.AdamW(model.parameters(), lr=1e-3), (lambda m, a, b: F.cross_entropy(m(a), b)), (x, y), source


def _ours_mlp():
    from neural_arch.models import compile_train_step
    model, opt, loss_fn, (x, y), source = _mlp_setup()
    t = time.perf_counter()
    step = compile_train_step(model, loss_fn, opt, x, y)
    info = {"compile_s": time.perf_counter() - t, "data": source, "kernels": len(step.runtime_program.kernels),
            "flush_denormals": bool(step.runtime_program.options.get("flush_denormals"))}
    return (lambda: step(x, y)), info


def _torch_mlp():
    import torch
    torch.set_num_threads(int(os.environ.get("NARCH_BENCH_THREADS", "2")))
    x, y, source = _mlp_data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return step, {"data": source}


def _jax_mlp():
    threads = _jax_threads()
    from neural_arch.tools.bench import jax_steps
    model, opt, _, batch, source = _mlp_setup()
    step = jax_steps.mlp_step(model.state_dict(), batch, **_adamw(opt))
    return step, {"data": source, "threads": threads, **jax_steps.versions()}


def worker_mlp_jax(steps: int) -> dict:
    step, info = _jax_mlp()
    step()  # the first call: the compile time
    res = time_steps(step, steps, warmup=20)
    res.update(info, compile_s=step.compile_s)
    return res


def worker_mlp_ours(steps: int) -> dict:
    step, info = _ours_mlp()
    res = time_steps(step, steps, warmup=20)
    res.update(info)
    return res


def worker_mlp_torch(steps: int) -> dict:
    step, info = _torch_mlp()
    res = time_steps(step, steps, warmup=20)
    res.update(info)
    return res


def worker_generate_ours(new_tokens: int, prompt: int) -> dict:
    from neural_arch.models import GPT2, GPT2Config, nn
    from neural_arch.models.generate import Decoder, sample_next
    E, L, H, T, B, V = GPT_CONFIGS["small"]
    nn.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=V, n_positions=T, n_embd=E, n_layer=L, n_head=H, dropout=0.0))
    model.eval()
    idx = np.random.default_rng(0).integers(0, V, (1, prompt)).astype(np.int64)
    t = time.perf_counter()
    dec = Decoder(model, 1, prompt)
    compile_s = time.perf_counter() - t
    rng = np.random.default_rng(0)

    def run():
        logits, caches = dec.prefill(idx)
        out = idx
        for i in range(new_tokens):
            nxt = sample_next(logits, rng, 0.0)[:, None]
            out = np.concatenate([out, nxt], 1)
            if i + 1 < new_tokens:
                logits, caches = dec.decode(nxt, out.shape[1] - 1, caches)
        return out
    res = time_steps(run, 3, warmup=1)
    res.update(compile_s=compile_s, tokens_per_s=new_tokens / res["median_s"])
    return res


def worker_generate_torch(new_tokens: int, prompt: int) -> dict:
    import torch
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("NARCH_BENCH_THREADS", "2")))
    E, L, H, T, B, V = GPT_CONFIGS["small"]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(HFConfig(vocab_size=V, n_positions=T, n_embd=E, n_layer=L, n_head=H,
                                     bos_token_id=0, eos_token_id=0)).eval()
    idx = torch.from_numpy(np.random.default_rng(0).integers(0, V, (1, prompt)).astype(np.int64))

    def run():
        with torch.no_grad():  # greedy with the KV cache, one token at a time
            out = model(idx, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(new_tokens - 1):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    res = time_steps(run, 3, warmup=1)
    res["tokens_per_s"] = new_tokens / res["median_s"]
    return res


def run_worker(spec: list[str]) -> dict:
    kind = spec[0]
    if kind == "gpt":
        cfg, who, steps = GPT_CONFIGS[spec[1]], spec[2], int(spec[3])
        if who in ("llvm", "interpreter"):
            return worker_gpt_ours(cfg, who, steps)
        if who == "jax":
            return worker_gpt_jax(cfg, steps)
        return worker_gpt_torch(cfg, steps, compiled=(who == "torch.compile"))
    if kind == "mlp":
        workers = {"ours": worker_mlp_ours, "torch": worker_mlp_torch, "jax": worker_mlp_jax}
        return workers[spec[1]](int(spec[2]))
    if kind == "generate":
        n, p = int(spec[2]), int(spec[3])
        return worker_generate_ours(n, p) if spec[1] == "ours" else worker_generate_torch(n, p)
    raise SystemExit(f"unknown worker {spec}")


def bench_step_graph(case: str):
    """The training-step graph this benchmark compiles for ``case`` (small, tiny, mlp: the same
    model, batch and AdamW), example inputs (the initial parameters, zero moments, step 1;
    the parameters and moments packed into one buffer as ``compile_train_step`` packs them) and
    the Program options it gives the step (parameters and moments updated in place,
    subnormals flushed), for ``narch profile bench:CASE`` and ``narch dump bench:CASE``."""
    from neural_arch.models.arena import packed_copies
    from neural_arch.models.train import build_train_graph, train_program_options
    from neural_arch.tools.zoo import train_step_inputs
    if case in GPT_CONFIGS:
        model, opt, loss_fn, batch = _gpt_setup(GPT_CONFIGS[case])
    elif case == "mlp":
        model, opt, loss_fn, batch, _ = _mlp_setup()
    else:
        raise KeyError(f"unknown benchmark case {case!r} (small, tiny, mlp)")
    prog = build_train_graph(model, loss_fn, opt, batch, name=f"bench_{case}_train_step")
    inputs = train_step_inputs(prog.graph, model, batch, opt.lr)
    # the parameters and moments in one buffer, as compile_train_step places them
    big = [k for k, i in enumerate(prog.graph.inputs) if i.kind in ("param", "state")]
    for k, v in zip(big, packed_copies([inputs[k] for k in big])):
        inputs[k] = v
    return prog.graph, inputs, train_program_options(prog.graph, model, opt)


def make_step(spec: list[str]):
    """The step a serving worker times: ["gpt", name, "llvm" | "torch"] or ["mlp", "ours" | "torch"]."""
    if spec[0] == "gpt":
        cfg = GPT_CONFIGS[spec[1]]
        return _ours_gpt(cfg, "llvm")[0] if spec[2] == "llvm" else _torch_gpt(cfg, False)[0]
    if spec[0] == "mlp":
        return _ours_mlp()[0] if spec[1] == "ours" else _torch_mlp()[0]
    raise SystemExit(f"unknown serving worker {spec}")


def serve(spec: list[str]) -> None:
    """A worker that stays alive: builds its step, says it is ready, then for each line N
    on stdin times N steps and answers their times (JSON lines on stdout), until EOF."""
    step = make_step(spec)
    for _ in range(3):
        step()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        n = int(line)
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t)
        print(json.dumps({"times": ts}), flush=True)


def interleave(ours_spec: list[str], torch_spec: list[str], blocks: int, per: int, env=None, log=print) -> dict:
    """Ours and PyTorch, each in its own live worker, taking turns: ``blocks`` blocks of
    ``per`` steps each, the side going first alternating.  Both workers exist throughout, so
    a block of one is followed seconds later by a block of the other: a drift of the host's
    speed, which lasts minutes, hits both alike.  Returns each side's block medians (s) and
    the per-block ratios (PyTorch's median / ours)."""
    import subprocess
    procs = {}
    for side, spec, e in (("ours", ours_spec, env), ("torch", torch_spec, None)):
        procs[side] = subprocess.Popen([sys.executable, "-m", "neural_arch.tools.bench.train", "--serve", *spec],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       env={**os.environ, **(e or {})})
    try:
        for side, p in procs.items():
            line = p.stdout.readline()
            if not line or not json.loads(line).get("ready"):
                return {"error": f"the {side} worker did not start (exit status {p.poll()})"}
        med = {"ours": [], "torch": []}
        for b in range(blocks):
            for side in (("ours", "torch") if b % 2 == 0 else ("torch", "ours")):
                p = procs[side]
                p.stdin.write(f"{per}\n")
                p.stdin.flush()
                line = p.stdout.readline()
                if not line:
                    return {"error": f"the {side} worker died (exit status {p.poll()})"}
                med[side].append(float(np.median(json.loads(line)["times"])))
            if (b + 1) % 5 == 0:
                log(f"  interleaved block {b + 1} of {blocks} ...")
        return {"ours": med["ours"], "torch": med["torch"], "per": per,
                "ratios": [t / o for o, t in zip(med["ours"], med["torch"])]}
    finally:
        for p in procs.values():
            if p.stdin and not p.stdin.closed:
                p.stdin.close()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def format_interleaved(res: dict) -> str:
    if "error" in res:
        return f"  interleaved: failed: {res['error']}"
    r = np.array(res["ratios"])
    o, t = np.median(res["ours"]), np.median(res["torch"])
    unit, scale = ("ms", 1e3)
    return (f"  ours vs torch interleaved, {len(r)} blocks of {res['per']} steps (two live workers taking turns): "
            f"block ratios median {np.median(r):.2f}x (quartiles {np.percentile(r, 25):.2f}x-"
            f"{np.percentile(r, 75):.2f}x); block medians ours {o * scale:.3f} {unit}, torch {t * scale:.3f} {unit}")


# ----------------------------------------------------------------------------- driver


def _spawn(spec: list[str], env: dict | None = None, timeout: float = 1800, memory: bool = False) -> dict:
    return spawn_worker("neural_arch.tools.bench.train", spec, env, timeout, memory)


def alternate(ours_spec: list[str], torch_spec: list[str], first: tuple, rounds: int, env=None, log=print) -> list:
    """Ours and PyTorch timed ``rounds`` times in alternation (``first``: the pair already
    measured), each in a fresh worker: [(ours median s, torch median s), ...].  On a host
    whose speed drifts for minutes at a time, the per-round ratios show the drift and
    their median is the steadier reading."""
    pairs = [first]
    for k in range(1, rounds):
        log(f"  round {k + 1} of {rounds} ...")
        a, b = _spawn(ours_spec, env), _spawn(torch_spec)
        if "error" in a or "error" in b:
            break
        pairs.append((a["median_s"], b["median_s"]))
    return pairs


def format_rounds(pairs: list) -> str:
    ratios = [t / o for o, t in pairs]
    return (f"  ours vs torch in {len(pairs)} alternating rounds: "
            + ", ".join(f"{r:.2f}x" for r in ratios) + f"; median {float(np.median(ratios)):.2f}x")


def _cold_compile(name: str) -> dict:
    """One more cold compile of the ``name`` step: a fresh process, an empty cache of its own."""
    cache = tempfile.mkdtemp(prefix="narch-bench-cold-")
    try:
        return _spawn(["gpt", name, "llvm", "0"], {"NEURAL_ARCH_CACHE_DIR": cache})
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def bench_gpt(name: str, steps: int, torch_compile: bool, interpreter: bool, log=print, rounds: int = 1,
              blocks: int = 0) -> dict:
    cache = tempfile.mkdtemp(prefix="narch-bench-cache-")
    try:
        env = {"NEURAL_ARCH_CACHE_DIR": cache}
        log(f"[{name}] our step, cold kernel cache ...")
        cold = _spawn(["gpt", name, "llvm", "1"], env)
        if "error" not in cold:  # (likewise the cold compile, each in an empty cache of its own)
            cold["cold_compiles_s"] = [cold["compile_s"]] + [
                c["compile_s"] for c in (_cold_compile(name) for _ in range(COMPILE_SAMPLES - 1)) if "compile_s" in c]
        log(f"[{name}] our step, cached ...")
        ours = _spawn(["gpt", name, "llvm", str(steps)], env)
        if "error" not in ours:  # (one process's cached compile swings with the host: three of them)
            more = [_spawn(["gpt", name, "llvm", "0"], env) for _ in range(COMPILE_SAMPLES - 1)]
            ours["cached_compiles_s"] = [ours["compile_s"]] + [r["compile_s"] for r in more if "compile_s" in r]
        rows = {"ours": ours, "ours_cold": cold}
        if have("torch"):
            log(f"[{name}] PyTorch eager ...")
            rows["torch"] = _spawn(["gpt", name, "torch", str(steps)])
            if rounds > 1 and "error" not in ours and "error" not in rows["torch"]:
                rows["rounds"] = alternate(["gpt", name, "llvm", str(steps)], ["gpt", name, "torch", str(steps)],
                                           (ours["median_s"], rows["torch"]["median_s"]), rounds, env, log)
            if blocks:
                log(f"[{name}] ours and PyTorch interleaved ...")
                rows["interleaved"] = interleave(["gpt", name, "llvm"], ["gpt", name, "torch"], blocks,
                                                 INTERLEAVE_STEPS[name], env, log)
            if torch_compile:
                log(f"[{name}] torch.compile ...")
                rows["torch.compile"] = _spawn(["gpt", name, "torch.compile", str(steps)])
        if have("jax"):
            log(f"[{name}] JAX jit ...")
            rows["jax"] = _spawn(["gpt", name, "jax", str(steps)])
        else:
            rows["jax"] = {"skipped": JAX_MISSING}
        if interpreter:
            log(f"[{name}] our interpreter ...")
            rows["interpreter"] = _spawn(["gpt", name, "interpreter", "2" if name == "small" else "3"])
        log(f"[{name}] peak memory (a separate run each) ...")
        for key, spec, e in (("ours", ["gpt", name, "llvm", "3"], env), ("torch", ["gpt", name, "torch", "3"], None),
                             ("jax", ["gpt", name, "jax", "3"], None),
                             ("interpreter", ["gpt", name, "interpreter", "1"], None)):
            if key in rows and "error" not in rows[key] and "skipped" not in rows[key]:
                mem = _spawn(spec, e, memory=True)
                rows[key]["peak_mb"] = mem.get("peak_mb")
        return rows
    finally:  # (the cold kernel cache: megabytes a run)
        shutil.rmtree(cache, ignore_errors=True)


def format_gpt(name: str, rows: dict) -> str:
    E, L, H, T, B, V = GPT_CONFIGS[name]
    ours = rows["ours"]
    lines = [f"GPT-2 training step '{name}': n_embd {E}, {L} layers, {H} heads, context {T}, batch {B}, vocab {V}",
             "  (peak MB: memory a step needs beyond parameters and optimizer state: the growth of the "
             "resident set while stepping, plus, for ours, the arena and workspace allocated at compile time)",
             f"  {'':16} {'step ms':>9} {'min ms':>8} {'ours faster by':>15} {'peak MB':>8}"]
    for key in ("ours", "torch", "torch.compile", "jax", "interpreter"):
        r = rows.get(key)
        if r is not None and "skipped" in r:
            lines.append(f"  {key:16} skipped: {r['skipped']}")
        elif r is not None:
            lines.append(ratio_row(key, r, ours, 16, 8))
    if "error" not in ours:
        cold = rows.get("ours_cold", {})
        lines.append(f"  ours: parameters and optimizer state updated in place ({ours.get('inplace', 0)} buffers)"
                     + ("; subnormals flushed (MXCSR FTZ/DAZ; PyTorch runs as it comes)"
                        if ours.get("flush_denormals") else ""))
        lines.append(f"  ours: {ours.get('kernels', '?')} kernels for {ours['nodes']} IR nodes; arena "
                     f"{ours.get('arena_mb', 0):.1f} MB planned for {ours.get('intermediates_mb', 0):.1f} MB of "
                     f"intermediates; compile cold {format_compiles(cold, 'cold_compiles_s')}, cached "
                     f"{format_compiles(ours, 'cached_compiles_s')} (trace + passes + codegen lookup)")
        if rows.get("rounds"):
            lines.append(format_rounds(rows["rounds"]))
        if rows.get("interleaved"):
            lines.append(format_interleaved(rows["interleaved"]))
        tc = rows.get("torch.compile")
        if tc and "compile_s" in tc:
            lines.append(f"  torch.compile: first call (compile) {tc['compile_s']:.1f} s")
    jx = rows.get("jax")
    if jx and "compile_s" in jx:
        lines.append(_jax_note(jx))
    return "\n".join(lines)


COMPILE_SAMPLES = 3  # fresh processes compiling cold (each its own empty cache) and from the disk cache


def format_compiles(row: dict, key: str) -> str:
    """A compile time: the median of its samples (``row[key]``), and all of them."""
    samples = row.get(key) or [row.get("compile_s", float("nan"))]
    if len(samples) == 1:
        return f"{samples[0]:.2f} s"
    return f"{float(np.median(samples)):.2f} s (median of {len(samples)} processes: " + \
        ", ".join(f"{s:.2f}" for s in samples) + ")"


def _jax_note(r: dict) -> str:
    return (f"  jax: {r.get('jax', '?')} (jaxlib {r.get('jaxlib', '?')}), one jax.jit step from our initial "
            f"weights, parameters and state donated, {r.get('threads', '?')} XLA threads; first call (trace + "
            f"compile) {r['compile_s']:.2f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="narch bench train", description=" ".join(__doc__.split("\n\n")[0].split()),
                                 epilog="example: narch bench train --only tiny,mlp --steps 20")
    ap.add_argument("--only", default="small,tiny,mlp,generate",
                    help="comma-separated cases: small, tiny, mlp, generate (default: all)")
    ap.add_argument("--steps", type=int, default=10, help="timed GPT-2 steps per framework (default 10)")
    ap.add_argument("--torch-compile", action="store_true", help="also time torch.compile (compiles ~1 min)")
    ap.add_argument("--no-interpreter", action="store_true", help="skip our NumPy interpreter (slow)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time ours and PyTorch this many times in alternation (GPT-2 steps, MLP) and print "
                         "each round's ratio and their median (default 1)")
    ap.add_argument("--interleave", type=int, default=0, metavar="BLOCKS",
                    help="also time ours and PyTorch in two live workers taking turns, BLOCKS blocks each "
                         "(GPT-2 small 3 steps a block, tiny 20, MLP 300), and print the block ratios' median")
    ap.add_argument("--json", help="also write the raw measurements to this file")
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ap.add_argument("--serve", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker)))
        return 0
    if args.serve:
        serve(args.serve)
        return 0
    if args.interleave < 0:
        raise SystemExit("narch bench train: --interleave needs a block count >= 0")
    cases = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in cases if c not in ("small", "tiny", "mlp", "generate")]
    if unknown:
        raise SystemExit(f"narch bench train: unknown case(s) {', '.join(unknown)}")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    out, report = {}, []
    if not have("torch"):
        report.append("PyTorch is not installed: only our own numbers are printed "
                      "(pip install torch==2.13.0 for the comparisons)")
    for name in ("small", "tiny"):
        if name in cases:
            out[name] = bench_gpt(name, args.steps, args.torch_compile, not args.no_interpreter, log, args.rounds,
                                  args.interleave)
            report.append(format_gpt(name, out[name]))
    if "mlp" in cases:
        log("[mlp] ours, PyTorch eager ...")
        ours = _spawn(["mlp", "ours", "300"])
        rows = {"ours": ours}
        if have("torch"):
            rows["torch"] = _spawn(["mlp", "torch", "300"])
            if args.rounds > 1 and "error" not in ours and "error" not in rows["torch"]:
                rows["rounds"] = alternate(["mlp", "ours", "300"], ["mlp", "torch", "300"],
                                           (ours["median_s"], rows["torch"]["median_s"]), args.rounds, None, log)
            if args.interleave:
                log("[mlp] ours and PyTorch interleaved ...")
                rows["interleaved"] = interleave(["mlp", "ours"], ["mlp", "torch"], args.interleave,
                                                 INTERLEAVE_STEPS["mlp"], None, log)
        if have("jax"):
            log("[mlp] JAX jit ...")
            rows["jax"] = _spawn(["mlp", "jax", "300"])
        else:
            rows["jax"] = {"skipped": JAX_MISSING}
        out["mlp"] = rows
        lines = [f"MLP 64-256-256-10, batch 64, AdamW ({ours.get('data', '?')}), 300 steps"]
        for k, r in rows.items():
            if k in ("rounds", "interleaved"):
                continue
            if "skipped" in r:
                lines.append(f"  {k:8} skipped: {r['skipped']}")
                continue
            if "error" in r:
                lines.append(f"  {k:8} failed: {r['error']}")
                continue
            ratio = "" if k == "ours" or "error" in ours else f"  ours faster by {r['median_s'] / ours['median_s']:.2f}x"
            lines.append(f"  {k:8} {r['median_s'] * 1e3:8.3f} ms/step (min {r['min_s'] * 1e3:.3f}){ratio}")
        if ours.get("flush_denormals"):
            lines.append("  ours: subnormals flushed (MXCSR FTZ/DAZ, compile_train_step's default; PyTorch runs as it comes)")
        if rows.get("rounds"):
            lines.append(format_rounds(rows["rounds"]))
        if rows.get("interleaved"):
            lines.append(format_interleaved(rows["interleaved"]))
        if "compile_s" in rows["jax"]:
            lines.append(_jax_note(rows["jax"]))
        report.append("\n".join(lines))
    if "generate" in cases:
        log("[generate] ours, PyTorch eager ...")
        rows = {"ours": _spawn(["generate", "ours", "64", "16"])}
        if have("torch"):
            rows["torch"] = _spawn(["generate", "torch", "64", "16"])
        out["generate"] = rows
        ours = rows["ours"]
        lines = ["Generation, GPT-2 'small', batch 1, 16-token prompt, 64 new tokens, greedy, KV cache"]
        for k, r in rows.items():
            if "error" in r:
                lines.append(f"  {k:8} failed: {r['error']}")
                continue
            ratio = "" if k == "ours" or "error" in ours else \
                f"  ours faster by {ours['tokens_per_s'] / r['tokens_per_s']:.2f}x"
            lines.append(f"  {k:8} {r['tokens_per_s']:8.1f} tokens/s{ratio}")
        report.append("\n".join(lines))
    print("\n\n".join(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

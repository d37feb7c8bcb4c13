"""GPT-2 with Hugging Face-compatible parameter names, shapes and layouts.

State dict names match ``GPT2LMHeadModel`` (``transformer.h.0.attn.c_attn.weight`` in the
Conv1D (in, out) layout, ...), so real GPT-2 checkpoints load.  Pre-LN blocks, learned
positions, causal attention, tanh-GELU MLP, final LayerNorm, LM head tied to the token
embedding.
"""
from __future__ import annotations

import math
from dataclasses import InitVar, dataclass

import numpy as np

from neural_arch.compiler import functional as F
from neural_arch.compiler.tensor import Tensor

from . import nn


@dataclass(frozen=True)
class GPT2Config:
    """``n_ctx`` is an alias of ``n_positions`` (the context length), in the constructor and
    as an attribute; giving both with different values is an error."""
    vocab_size: int = 50257
    n_positions: int | None = None  # 1024 unless given (here or as n_ctx)
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0  # embd, attn and resid dropout (HF's *_pdrop)
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    n_ctx: InitVar[int | None] = None

    def __post_init__(self, n_ctx):
        if n_ctx is not None and self.n_positions is not None and n_ctx != self.n_positions:
            raise ValueError(f"GPT2Config: n_ctx {n_ctx} and n_positions {self.n_positions} disagree "
                             f"(n_ctx is an alias of n_positions: give one)")
        n_positions = next((v for v in (self.n_positions, n_ctx) if v is not None), 1024)
        if isinstance(n_positions, bool) or not isinstance(n_positions, (int, np.integer)) or n_positions < 1:
            raise ValueError(f"GPT2Config: n_positions (n_ctx) must be a positive int, got {n_positions!r}")
        object.__setattr__(self, "n_positions", int(n_positions))
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")


# the attribute: n_ctx reads n_positions (the InitVar above is the constructor's alias)
GPT2Config.n_ctx = property(lambda self: self.n_positions, doc="Alias of n_positions.")


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored (in_features, out_features); y = x @ W + b."""

    def __init__(self, nx: int, nf: int, std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(nn.normal_((nx, nf), std))
        self.bias = nn.Parameter(np.zeros(nf, np.float32))

    def forward(self, x):
        return F.matmul(x, self.weight) + self.bias


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        proj_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd, cfg.initializer_range)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd, proj_std)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def _split(self, x):
        b, t, _ = x.shape
        return x.reshape(b, t, self.n_head, self.n_embd // self.n_head).transpose(0, 2, 1, 3)

    def forward(self, x, cache: nn.KVCache | None = None):
        b, t, c = x.shape
        hd = c // self.n_head
        if cache is None and self.attn_dropout.inactive:
            # the fused causal attention, reading q, k, v in place from c_attn's output
            # (batch, t, 3, heads, hd) and writing (batch, t, heads, hd): no head transposes
            q, k, v = (z.reshape(b, t, self.n_head, hd) for z in F.split(self.c_attn(x), 3, axis=-1))
            y = F.attention(q, k, v, causal=True, scale=1.0 / math.sqrt(hd)).reshape(b, t, c)
            return self.resid_dropout(self.c_proj(y))
        q, k, v = (self._split(z) for z in F.split(self.c_attn(x), 3, axis=-1))
        if cache is None:
            scores = F.matmul(q, F.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(hd))
            r = F.iota((t, t), 0)
            cidx = F.iota((t, t), 1)
            scores = F.where(F.ge(r, cidx), scores, -math.inf)
        else:
            # decode: append k, v to the cache at its position; attend to positions <= each query's
            start = cache.position
            k, v = cache.update(k, v)
            scores = F.matmul(q, F.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(hd))
            scores = F.where(nn.cached_attention_mask(start, t, k.shape[2], causal=True),
                             scores, -math.inf)
        att = self.attn_dropout(F.softmax(scores, -1))
        y = F.matmul(att, v).transpose(0, 2, 1, 3).reshape(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, 4 * cfg.n_embd, cfg.initializer_range)
        self.c_proj = Conv1D(4 * cfg.n_embd, cfg.n_embd, cfg.initializer_range / math.sqrt(2 * cfg.n_layer))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, cache: nn.KVCache | None = None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Transformer(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd, cfg.initializer_range)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd, cfg.initializer_range)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)


class _TiedHead(nn.Module):
    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight  # the token embedding itself: one parameter, two names


class GPT2(nn.Module):
    """GPT-2 language model.  ``model(idx)`` gives logits (B, T, vocab);
    ``model(idx, targets)`` gives (logits, loss) with targets aligned to idx (already shifted)."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Transformer(cfg)
        self.lm_head = _TiedHead(self.transformer.wte.weight)

    def _check_idx(self, idx, offset: int = 0):
        if not isinstance(idx, Tensor):
            arr = np.asarray(idx)
            if arr.dtype.kind not in "iu":  # (a cast would truncate 1.5 to 1)
                raise TypeError(f"GPT2: token ids must be integers, got {arr.dtype}")
            idx = Tensor(arr.astype(np.int64, copy=False))
        if idx.ndim != 2:
            raise ValueError(f"GPT2: input ids must be (batch, seq), got shape {idx.shape}")
        if idx.shape[1] + offset > self.config.n_positions:
            raise ValueError(f"GPT2: sequence length {idx.shape[1] + offset} exceeds n_positions "
                             f"{self.config.n_positions}")
        return idx

    def forward(self, idx, targets=None):
        idx = self._check_idx(idx)
        b, t = idx.shape
        tr = self.transformer
        x = tr.drop(tr.wte(idx) + tr.wpe(F.arange(t)))
        for blk in tr.h:
            x = blk(x)
        logits = F.matmul(tr.ln_f(x), F.transpose(self.lm_head.weight))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits, targets)

    def decode_step(self, idx, caches: list):
        """Logits (B, t, vocab) for tokens ``idx`` (B, t) at positions pos .. pos + t - 1, where
        pos is the caches' position: one ``nn.KVCache`` per layer, all at the same position,
        each appended to (advanced by t) and attended over.  The position may be a runtime
        tensor (``nn.KVCache(keys, values, pos)`` inside a trace), so one compiled program
        serves every position."""
        tr = self.transformer
        if len(caches) != len(tr.h) or not all(isinstance(c, nn.KVCache) for c in caches):
            raise TypeError(f"GPT2.decode_step: caches must be {len(tr.h)} nn.KVCache (one per layer), got "
                            f"{[type(c).__name__ for c in caches]}")
        pos = caches[0].position
        if isinstance(pos, int):
            idx = self._check_idx(idx, pos)
        if any(c.position is not pos if isinstance(pos, Tensor) else c.position != pos for c in caches):
            raise ValueError("GPT2.decode_step: the layers' caches are at different positions")
        t = idx.shape[1]
        x = tr.wte(idx) + tr.wpe(F.add(F.arange(t), pos))
        for blk, cache in zip(tr.h, caches):
            x = blk(x, cache)
        if isinstance(pos, Tensor):  # one advanced position for all layers (each update made its own)
            for cache in caches[1:]:
                cache.position = caches[0].position
        return F.matmul(tr.ln_f(x), F.transpose(self.lm_head.weight))

    def empty_caches(self, batch: int) -> list:
        """One zero-filled ``nn.KVCache`` per layer, (batch, n_head, n_positions, head_dim), at position 0."""
        cfg = self.config
        return [nn.KVCache.empty(batch, cfg.n_head, cfg.n_positions, cfg.n_embd // cfg.n_head)
                for _ in range(cfg.n_layer)]

    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, backend: str = "llvm",
                 use_cache: bool = True) -> np.ndarray:
        """Continue each row of ``input_ids`` (B, T) by ``max_new_tokens`` sampled tokens; returns
        (B, T + max_new_tokens) ids.  ``models.generate.generate(self, ...)``: see there."""
        from .generate import generate
        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, backend=backend, use_cache=use_cache)

    def load_state_dict(self, state: dict, strict: bool = True) -> dict:
        """HF checkpoints may omit the tied ``lm_head.weight``; old ones carry attention-mask
        buffers (``attn.bias``, ``attn.masked_bias``) we do not need.  The hub's GPT-2 files are
        ``GPT2Model``'s, without the ``transformer.`` prefix (``wte.weight``, ``h.0...``): it is
        added, as transformers' ``from_pretrained`` does."""
        state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        if "wte.weight" in state and not any(k.startswith("transformer.") for k in state):
            state = {k if k.startswith("lm_head.") else "transformer." + k: v for k, v in state.items()}
        if "lm_head.weight" not in state and "transformer.wte.weight" in state:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        return super().load_state_dict(state, strict)

    @classmethod
    def from_hf_state_dict(cls, cfg: GPT2Config, state: dict) -> "GPT2":
        model = cls(cfg)
        model.load_state_dict({k: np.asarray(v) for k, v in state.items()})
        return model

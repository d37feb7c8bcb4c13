"""Neural-network modules: Module, Parameter, containers and layers.

Modules hold Parameters and child Modules as attributes, PyTorch style.  A module's forward
uses the functional ops, so it runs eagerly, traces into the IR, and compiles.

    from neural_arch.models import nn
    layer = nn.Linear(16, 32)
    y = layer(x)
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Iterator

import numpy as np

from neural_arch.compiler import functional as F
from neural_arch.compiler.tensor import Tensor, bind

# ----------------------------------------------------------------------------- seeding

_generator = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed parameter initialisation (and eager dropout) for reproducible models."""
    global _generator
    _generator = np.random.default_rng(seed)
    _dropout_state.counter = seed * 1_000_003


def generator() -> np.random.Generator:
    return _generator


class _DropoutState:
    """Where dropout takes its randomness: eagerly a fresh seed per call; inside a compiled
    training step, the step's seed input with one stream per dropout site."""

    def __init__(self):
        self.counter = 0
        self.seed = None  # a 0-d int64 Tensor (symbolic inside a compiled step)
        self.stream = 0


_dropout_state = _DropoutState()


@contextlib.contextmanager
def dropout_seed(seed):
    """Within this block every dropout site draws from ``seed`` (a 0-d int tensor or int), each
    site on its own stream.  compile_train_step uses this with a per-step seed input."""
    prev = (_dropout_state.seed, _dropout_state.stream)
    _dropout_state.seed, _dropout_state.stream = seed, 0
    try:
        yield
    finally:
        _dropout_state.seed, _dropout_state.stream = prev


def _next_dropout_seed():
    st = _dropout_state
    if st.seed is not None:
        st.stream += 1
        return st.seed, st.stream
    st.counter += 1
    return st.counter, 0


# ----------------------------------------------------------------------------- Parameter


class Parameter(Tensor):
    """A tensor that a Module owns and an optimizer updates (requires_grad=True)."""

    def __init__(self, data, dtype=None):
        arr = np.asarray(data.data if isinstance(data, Tensor) else data)
        if dtype is None:
            dtype = "float64" if arr.dtype == np.float64 and isinstance(data, Tensor) else "float32"
        super().__init__(np.array(arr, dtype=dtype, copy=True), requires_grad=True)

    def __repr__(self) -> str:
        return "Parameter" + super().__repr__()[len("tensor"):]


# ----------------------------------------------------------------------------- Module


class Module:
    """Base class: parameters and sub-modules registered by attribute assignment."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() before "
                                 f"assigning {name!r}")
        if name in self._parameters and value is not None and not isinstance(value, Parameter):
            raise TypeError(f"cannot assign {type(value).__name__} as parameter {name!r} of {type(self).__name__} "
                            f"(nn.Parameter or None expected)")
        if name in self._buffers and isinstance(value, Tensor) and not isinstance(value, Parameter):
            self._buffers[name] = value  # (a new value of the buffer, as in torch)
            object.__setattr__(self, name, value)
            return
        for table in (self._parameters, self._modules, self._buffers):
            table.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, value) -> None:
        """A non-trained tensor that belongs to the module's state (saved in state_dict)."""
        t = value if isinstance(value, Tensor) else Tensor(value)
        object.__setattr__(self, name, t)
        self._buffers[name] = t

    # -- traversal
    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        return iter(self._modules.items())

    def children(self) -> Iterator["Module"]:
        return iter(self._modules.values())

    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return (m for _, m in self.named_modules())

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Every parameter once (a parameter shared by two modules appears under its first name)."""
        seen = set()
        for mname, m in self.named_modules(prefix):
            for pname, p in m._parameters.items():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mname}.{pname}" if mname else pname), p

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = ""):
        for mname, m in self.named_modules(prefix):
            for bname, b in m._buffers.items():
                yield (f"{mname}.{bname}" if mname else bname), b

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    # -- state
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Name -> a copy of each parameter's and buffer's values."""
        sd = OrderedDict()
        for mname, m in self.named_modules():
            for table in (m._parameters, m._buffers):
                for n, t in table.items():
                    sd[f"{mname}.{n}" if mname else n] = np.array(t.data, copy=True)
        return sd

    def load_state_dict(self, state: dict, strict: bool = True) -> dict:
        """Copy values in by name.  With ``strict`` every name must match both ways; shapes must
        always match.  Returns {"missing": [...], "unexpected": [...]}."""
        own = OrderedDict()
        for mname, m in self.named_modules():
            for table in (m._parameters, m._buffers):
                for n, t in table.items():
                    own[f"{mname}.{n}" if mname else n] = t
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        bad = [f"{k}: checkpoint {tuple(np.shape(state[k]))} vs model {own[k].shape}"
               for k in own if k in state and tuple(np.shape(state[k])) != own[k].shape]
        problems = []
        if bad:
            problems.append("shape mismatch for " + "; ".join(bad))
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if problems:
            raise ValueError(f"load_state_dict into {type(self).__name__}: " + ". ".join(problems))
        for k, t in own.items():
            if k in state:
                v = state[k]
                t.data = np.asarray(v.data if isinstance(v, Tensor) else v)
        return {"missing": missing, "unexpected": unexpected}

    # -- modes
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


class Sequential(Module):
    def __init__(self, *layers: Module):
        super().__init__()
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def forward(self, x):
        for layer in self:
            x = layer(x)
        return x


class ModuleList(Module):
    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, m: Module) -> "ModuleList":
        setattr(self, str(len(self._modules)), m)
        return self

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return list(self._modules.values())[i]


# ----------------------------------------------------------------------------- initialisation


def normal_(shape, std: float = 0.02) -> np.ndarray:
    return _generator.normal(0.0, std, size=shape).astype(np.float32)


def uniform_(shape, bound: float) -> np.ndarray:
    return _generator.uniform(-bound, bound, size=shape).astype(np.float32)


# ----------------------------------------------------------------------------- layers


class Linear(Module):
    """y = x @ weight.T + bias, weight (out_features, in_features) as in torch; initialised
    normal(0, init_std) as GPT-2 and BERT do (pass init_std=None for torch's uniform)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_std: float | None = 0.02):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if init_std is None:
            w = uniform_((out_features, in_features), 1 / math.sqrt(max(in_features, 1)))
        else:
            w = normal_((out_features, in_features), init_std)
        self.weight = Parameter(w)
        self.bias = Parameter(np.zeros(out_features, np.float32)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float = 0.02):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(normal_((num_embeddings, embedding_dim), init_std))

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        if elementwise_affine:
            self.weight = Parameter(np.ones(self.normalized_shape, np.float32))
            self.bias = Parameter(np.zeros(self.normalized_shape, np.float32))
        else:
            self.weight = self.bias = None

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


class RMSNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(np.ones(dim, np.float32))

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps)


class Dropout(Module):
    """Inverted dropout with the counter-based random op (so it compiles); identity in eval()."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must lie in [0, 1], got {p}")
        self.p = p

    @property
    def inactive(self) -> bool:
        """True when forward is the identity (eval mode or p == 0)."""
        return not self.training or self.p == 0.0

    def forward(self, x):
        if self.inactive:
            return x
        seed, stream = _next_dropout_seed()
        return F.dropout(x, self.p, True, seed, stream)

    def extra_repr(self):
        return f"p={self.p}"


class GELU(Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, self.approximate)


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class SiLU(Module):
    def forward(self, x):
        return F.silu(x)


class Tanh(Module):
    def forward(self, x):
        return F.tanh(x)


class Flatten(Module):
    def __init__(self, start_axis: int = 1, end_axis: int = -1):
        super().__init__()
        self.start_axis, self.end_axis = start_axis, end_axis

    def forward(self, x):
        return F.flatten(x, self.start_axis, self.end_axis)


def _key_padding_mask(mask, b: int, lk: int) -> Tensor:
    """A (batch, keys) key-padding mask (True at padding) as a tensor, its shape checked."""
    kpm = mask if isinstance(mask, Tensor) else Tensor(np.asarray(mask))
    if kpm.dtype != "bool":
        raise TypeError(f"MultiHeadAttention: key_padding_mask must be bool (True at padding), got {kpm.dtype}")
    if kpm.shape != (b, lk):
        raise ValueError(f"MultiHeadAttention: key_padding_mask has shape {kpm.shape}, expected {(b, lk)}")
    return kpm


class KVCache:
    """Preallocated key/value buffers for incremental (token-by-token) attention decoding.

    ``keys`` and ``values`` are (batch, heads, max_len, head_dim) buffers (the layout the
    attention layers' scores are computed in); ``position`` is how many positions are filled.
    ``update(k, v)`` writes k, v (batch, heads, t, head_dim) at positions
    position .. position + t - 1, advances ``position`` by t and returns the keys and values so
    far.  The write is an ``iota == position`` select over the whole buffer, so ``position``
    may be a runtime 0-d int64 tensor of a traced program: ONE compiled decode program then
    serves every position (``models/generate.py`` builds GPT-2's that way).  With a Python-int
    position the returned keys/values are exactly the first position + t; with a runtime
    position they are the whole buffers (slots past position + t are zeros, or stale values,
    which the attention masks), and staying within max_len is the caller's job (nothing can be
    checked before the program runs).

        cache = nn.KVCache.empty(batch, heads, max_len, head_dim)
        for t in range(n):
            y_t = mha(x[:, t:t + 1], is_causal=True, kv_cache=cache)
    """

    def __init__(self, keys, values, position=0):
        keys = keys if isinstance(keys, Tensor) else Tensor(np.asarray(keys))
        values = values if isinstance(values, Tensor) else Tensor(np.asarray(values))
        if keys.ndim != 4:
            raise ValueError(f"KVCache: buffers must be (batch, heads, max_len, head_dim), got keys {keys.shape}")
        if keys.shape != values.shape or keys.dtype != values.dtype:
            raise ValueError(f"KVCache: keys {keys.dtype}{list(keys.shape)} and values "
                             f"{values.dtype}{list(values.shape)} differ in shape or dtype")
        if not keys.dtype.startswith("float"):
            raise TypeError(f"KVCache: buffers must be floating point, got {keys.dtype}")
        self.keys, self.values = keys, values
        self.position = self._check_position(position)

    @classmethod
    def empty(cls, batch: int, num_heads: int, max_len: int, head_dim: int, dtype: str = "float32") -> "KVCache":
        """Zero-filled buffers at position 0."""
        shape = (batch, num_heads, max_len, head_dim)
        if any(int(d) < 1 for d in shape):
            raise ValueError(f"KVCache.empty: every dimension must be >= 1, got {shape}")
        return cls(F.zeros(shape, dtype=dtype), F.zeros(shape, dtype=dtype), 0)

    def _check_position(self, position):
        if isinstance(position, Tensor):
            if position.shape != () or not position.dtype.startswith(("int", "uint")):
                raise TypeError(f"KVCache: position must be an int or a 0-d integer tensor, got "
                                f"{position.dtype}{list(position.shape)}")
            if position.is_traced:
                return position  # a runtime value: one program for every position
            position = position.item()
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
            raise TypeError(f"KVCache: position must be an int or a 0-d integer tensor, got "
                            f"{type(position).__name__}")
        position = int(position)
        if not 0 <= position <= self.max_len:
            raise ValueError(f"KVCache: position {position} outside [0, max_len {self.max_len}]")
        return position

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.keys.shape

    @property
    def dtype(self) -> str:
        return self.keys.dtype

    def update(self, k, v):
        """Append k, v (batch, heads, t, head_dim); return (keys, values) so far."""
        b, h, n, d = self.shape
        for name, x in (("keys", k), ("values", v)):
            if x.ndim != 4 or (x.shape[0], x.shape[1], x.shape[3]) != (b, h, d) or x.shape[2] < 1:
                raise ValueError(f"KVCache.update: {name} must be (batch {b}, heads {h}, t >= 1, head_dim {d}), "
                                 f"got {x.shape}")
            if x.dtype != self.dtype:
                raise TypeError(f"KVCache.update: {name} are {x.dtype}, the cache holds {self.dtype}")
        if k.shape != v.shape:
            raise ValueError(f"KVCache.update: keys {k.shape} and values {v.shape} differ in shape")
        t, start = k.shape[2], self.position
        if isinstance(start, int) and start + t > n:
            raise ValueError(f"KVCache.update: appending {t} positions at position {start} overflows max_len {n}")
        if t > n:
            raise ValueError(f"KVCache.update: {t} positions exceed max_len {n}")
        if isinstance(start, Tensor):  # a runtime position: checked when the program runs
            # (the writes select by comparison, so a position past the end would drop them)
            start = bind("check_index", start, size=n - t + 1)
        slot = F.iota((1, 1, n, 1), 2)
        kc, vc = self.keys, self.values
        for i in range(t):
            here = F.eq(slot, F.add(start, i) if isinstance(start, Tensor) else start + i)
            kc = F.where(here, k[:, :, i:i + 1, :], kc)
            vc = F.where(here, v[:, :, i:i + 1, :], vc)
        self.keys, self.values = kc, vc
        self.position = F.add(start, t) if isinstance(start, Tensor) else start + t
        if isinstance(start, int):
            end = start + t
            return (kc, vc) if end == n else (kc[:, :, :end, :], vc[:, :, :end, :])
        return kc, vc

    def __repr__(self):
        pos = self.position if isinstance(self.position, int) else "runtime"
        return f"KVCache(shape={self.shape}, dtype={self.dtype}, position={pos})"


def cached_attention_mask(start, q_len: int, k_len: int, causal: bool):
    """(q_len, k_len) bool, True where a query may attend to a key a KVCache returned; the
    queries sit at positions start .. start + q_len - 1 (``start`` an int, or a runtime
    tensor).  Causal: key position <= query position; otherwise every key written so far
    (key position < start + q_len)."""
    kpos = F.iota((q_len, k_len), 1)
    if causal:
        return F.ge(F.add(F.iota((q_len, k_len), 0), start), kpos)
    return F.lt(kpos, F.add(start, q_len) if isinstance(start, Tensor) else start + q_len)


class MultiHeadAttention(Module):
    """Multi-head attention over (batch, seq, embed) tensors (batch first).

    ``forward(query, key=None, value=None, key_padding_mask=None, attn_mask=None,
    is_causal=False, kv_cache=None)``: self-attention when key/value are omitted, cross
    attention otherwise.  ``key_padding_mask`` (batch, key_len) is True at padding positions
    (as in torch).  ``attn_mask`` is bool (True = attend) or float (added), broadcast against
    (batch, heads, q_len, key_len).  ``kv_cache``: an ``nn.KVCache`` this call appends the new
    keys/values to and attends over (causal: the queries are the cache's last positions);
    ``key_padding_mask`` / ``attn_mask`` then cover the keys the cache returns."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MultiHeadAttention: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.q_proj = Linear(embed_dim, embed_dim, bias)
        self.k_proj = Linear(kdim or embed_dim, embed_dim, bias)
        self.v_proj = Linear(vdim or embed_dim, embed_dim, bias)
        self.out_proj = Linear(embed_dim, embed_dim, bias)
        self.attn_dropout = Dropout(dropout)

    def _heads(self, t):
        b, s, _ = t.shape
        return t.reshape(b, s, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def forward(self, query, key=None, value=None, key_padding_mask=None, attn_mask=None, is_causal=False,
                kv_cache=None):
        key = query if key is None else key
        value = key if value is None else value
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.ndim != 3:
                raise ValueError(f"MultiHeadAttention: {name} must be (batch, seq, embed), got shape {t.shape}")
        b, lq, _ = query.shape
        if kv_cache is None and attn_mask is None and query.shape == key.shape == value.shape and \
                self.attn_dropout.inactive:
            # the fused attention over (batch, seq, heads, head_dim) views: no head transposes;
            # padded keys as a -inf key bias
            bias = None
            if key_padding_mask is not None:
                bias = F.where(_key_padding_mask(key_padding_mask, b, lq), -math.inf, 0.0)
            q, k, v = (t.reshape(b, lq, self.num_heads, self.head_dim)
                       for t in (self.q_proj(query), self.k_proj(key), self.v_proj(value)))
            out = F.attention(q, k, v, causal=is_causal, scale=1.0 / math.sqrt(self.head_dim), key_bias=bias)
            return self.out_proj(out.reshape(b, lq, self.embed_dim))
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        cache_mask = None
        if kv_cache is not None:
            if not isinstance(kv_cache, KVCache):
                raise TypeError(f"MultiHeadAttention: kv_cache must be an nn.KVCache, got {type(kv_cache).__name__}")
            if kv_cache.shape[1] != self.num_heads or kv_cache.shape[3] != self.head_dim:
                raise ValueError(f"MultiHeadAttention: kv_cache {kv_cache.shape} does not hold {self.num_heads} "
                                 f"heads of {self.head_dim} (batch, heads, max_len, head_dim)")
            start, n_new = kv_cache.position, k.shape[2]
            k, v = kv_cache.update(k, v)
            if is_causal or not isinstance(start, int):  # an int position returns only the written keys
                # the queries are the last lq of the positions written so far
                first = start if n_new == lq else (start + n_new - lq if isinstance(start, int)
                                                   else F.add(start, n_new - lq))
                cache_mask = cached_attention_mask(first, lq, k.shape[2], is_causal)
        lk = k.shape[2]
        mask = None
        if key_padding_mask is not None:
            mask = F.logical_not(_key_padding_mask(key_padding_mask, b, lk).reshape(b, 1, 1, lk))
        if attn_mask is not None:
            am = attn_mask if isinstance(attn_mask, Tensor) else Tensor(np.asarray(attn_mask))
            if am.dtype != "bool" and not am.dtype.startswith("float"):  # (as torch: an int mask is ambiguous)
                raise TypeError(f"MultiHeadAttention: attn_mask must be bool (True = attend) or floating (added), "
                                f"got {am.dtype}")
            if am.dtype == "bool":
                mask = am if mask is None else F.logical_and(mask, am)
            else:
                mask = am if mask is None else F.where(mask, am, -math.inf)
        scores = F.mul(F.matmul(q, F.swapaxes(k, -1, -2)), 1.0 / math.sqrt(self.head_dim))
        if cache_mask is not None:
            scores = F.where(cache_mask, scores, -math.inf)
        elif is_causal:
            offset = lk - lq
            r = F.iota((lq, lk), 0)
            c = F.iota((lq, lk), 1)
            scores = F.where(F.ge(F.add(r, offset), c), scores, -math.inf)
        if mask is not None:
            scores = F.where(mask, scores, -math.inf) if mask.dtype == "bool" else F.add(scores, mask)
        attn = self.attn_dropout(F.softmax(scores, -1))
        out = F.matmul(attn, v).transpose(0, 2, 1, 3).reshape(b, lq, self.embed_dim)
        return self.out_proj(out)


class TransformerBlock(Module):
    """A transformer encoder/decoder layer: attention and an MLP, each with a residual.
    ``norm_first=True`` is pre-LN (GPT-2); False is post-LN (BERT, the original)."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int | None = None, dropout: float = 0.0,
                 norm_first: bool = True, activation: str = "gelu", causal: bool = False, eps: float = 1e-5):
        super().__init__()
        d_ff = d_ff or 4 * d_model
        self.norm_first, self.causal = norm_first, causal
        self.attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.ln1 = LayerNorm(d_model, eps)
        self.ln2 = LayerNorm(d_model, eps)
        self.fc1 = Linear(d_model, d_ff)
        self.fc2 = Linear(d_ff, d_model)
        acts = {"gelu": GELU(), "gelu_tanh": GELU("tanh"), "relu": ReLU(), "silu": SiLU()}
        if activation not in acts:
            raise ValueError(f"TransformerBlock: activation must be one of {', '.join(map(repr, acts))}, "
                             f"got {activation!r}")
        self.act = acts[activation]
        self.dropout = Dropout(dropout)

    def _mlp(self, x):
        return self.dropout(self.fc2(self.act(self.fc1(x))))

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        if self.norm_first:
            x = x + self.dropout(self.attn(self.ln1(x), key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                           is_causal=self.causal))
            return x + self._mlp(self.ln2(x))
        x = self.ln1(x + self.dropout(self.attn(x, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                                is_causal=self.causal)))
        return self.ln2(x + self._mlp(x))


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _windows(x, kernel, stride, padding, pad_value=0.0):
    """(N, C, H, W) -> (N, C, kh*kw, OH, OW): every kernel offset's strided view (im2col)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    if ph or pw:
        x = F.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), pad_value)
    hp, wp = h + 2 * ph, w + 2 * pw
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"kernel {kernel} does not fit the padded input {(hp, wp)}")
    views = [x[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] for i in range(kh) for j in range(kw)]
    return F.stack(views, 2), oh, ow


class Conv2d(Module):
    """2-d convolution over (N, C, H, W), lowered as im2col (strided slices) plus a matmul."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.weight = Parameter(uniform_((out_channels, in_channels) + self.kernel_size, 1 / math.sqrt(fan_in)))
        self.bias = Parameter(uniform_((out_channels,), 1 / math.sqrt(fan_in))) if bias else None

    def forward(self, x):
        n, c = x.shape[:2]
        if c != self.in_channels:
            raise ValueError(f"Conv2d: expected {self.in_channels} input channels, got input {x.shape}")
        cols, oh, ow = _windows(x, self.kernel_size, self.stride, self.padding)
        k = self.kernel_size[0] * self.kernel_size[1]
        cols = cols.reshape(n, c * k, oh * ow)
        w = self.weight.reshape(self.out_channels, c * k)
        y = F.matmul(w, cols)  # (N, out, OH*OW)
        if self.bias is not None:
            y = y + self.bias.reshape(self.out_channels, 1)
        return y.reshape(n, self.out_channels, oh, ow)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


class _Pool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride) if stride is not None else self.kernel_size
        self.padding = _pair(padding)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):  # (a window all padding)
            raise ValueError(f"{type(self).__name__}: padding {self.padding} must be at most half the kernel size "
                             f"{self.kernel_size}")


class MaxPool2d(_Pool2d):
    def forward(self, x):
        cols, _, _ = _windows(x, self.kernel_size, self.stride, self.padding, -math.inf)
        return F.max(cols, 2)


class AvgPool2d(_Pool2d):
    def forward(self, x):
        cols, _, _ = _windows(x, self.kernel_size, self.stride, self.padding, 0.0)
        return F.mean(cols, 2)

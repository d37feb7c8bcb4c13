"""Vision Transformer (ViT) with Hugging Face-compatible parameter names, shapes and layouts.

State dict names match the checkpoints of ``ViTModel`` / ``ViTForImageClassification``
(``vit.embeddings.cls_token``, ``vit.embeddings.patch_embeddings.projection.weight`` as a
Conv2d (out, in, kh, kw), ``vit.encoder.layer.0.attention.attention.query.weight``,
``vit.encoder.layer.0.layernorm_before.weight``, ``vit.layernorm.weight``,
``classifier.weight``, ...), so their safetensors files load with ``load_state_dict``.

The image is cut into patches by a strided Conv2d (kernel = stride = patch size), a learned
[CLS] token is prepended, learned position embeddings added, then pre-LN encoder layers,
a final LayerNorm, and (for classification) a linear head on the [CLS] token.

    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, num_classes=10, hidden_size=64,
                    num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2.0)
    model = ViTForImageClassification(cfg)
    logits = model(pixels)                    # (B, num_classes)
    logits, loss = model(pixels, labels)
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields

import numpy as np

from neural_arch.compiler import functional as F
from neural_arch.compiler.tensor import Tensor

from . import nn

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu")


def activation(name: str, x):
    """The activations Hugging Face configs name in ``hidden_act``: ``gelu`` is the exact erf
    form, ``gelu_new``/``gelu_pytorch_tanh`` the tanh form, ``quick_gelu`` is
    ``x * sigmoid(1.702 x)`` (CLIP)."""
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return F.mul(x, F.sigmoid(F.mul(x, 1.702)))
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {name!r} (available: {', '.join(ACTIVATIONS)})")


def patch_conv(conv: nn.Conv2d, x):
    """``conv(x)`` flattened to (N, patches, out_channels) for a patch-embedding Conv2d whose
    kernel equals its stride (no padding).  When the patches tile the image exactly this is a
    reshape, a transpose and one matmul (the same numbers as the im2col Conv2d, which needs a
    strided slice per kernel offset); otherwise it runs the Conv2d itself."""
    n, c, h, w = x.shape
    kh, kw = conv.kernel_size
    if c != conv.in_channels:
        raise ValueError(f"patch embedding: expected {conv.in_channels} input channels, got input {x.shape}")
    if conv.stride != conv.kernel_size or conv.padding != (0, 0):
        raise ValueError(f"patch embedding: needs kernel == stride and no padding, got kernel {conv.kernel_size}, "
                         f"stride {conv.stride}, padding {conv.padding}")
    if h % kh or w % kw:
        y = conv(x)  # remainder rows/columns are dropped, as torch's Conv2d does
        return y.reshape(n, conv.out_channels, -1).transpose(0, 2, 1)
    gh, gw = h // kh, w // kw
    patches = x.reshape(n, c, gh, kh, gw, kw).transpose(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * kh * kw)
    y = F.matmul(patches, F.transpose(conv.weight.reshape(conv.out_channels, c * kh * kw)))
    return y if conv.bias is None else y + conv.bias


def _as_pixels(pixel_values, image_size: int, num_channels: int, who: str) -> Tensor:
    x = pixel_values if isinstance(pixel_values, Tensor) else Tensor(np.asarray(pixel_values, np.float32))
    want = (num_channels, image_size, image_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ValueError(f"{who}: pixel_values must be (batch, {num_channels}, {image_size}, {image_size}), "
                         f"got shape {x.shape}")
    return x


def read_hf_checkpoint(directory: str) -> tuple[dict, dict]:
    """(config.json as a dict, name -> NumPy array) of a Hugging Face model directory as
    ``save_pretrained`` writes it: ``model.safetensors``, or shards listed in
    ``model.safetensors.index.json``."""
    from safetensors.numpy import load_file
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    with open(cfg_path) as f:
        config = json.load(f)
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return config, load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(directory, shard)))
        return config, state
    raise FileNotFoundError(f"{directory}: no model.safetensors (or index); only safetensors checkpoints load "
                            f"(convert a pytorch_model.bin with transformers' save_pretrained)")


def config_fields(cls, d: dict, who: str) -> dict:
    """The entries of a Hugging Face config dict that ``cls`` (a dataclass) has."""
    if not isinstance(d, dict):
        raise TypeError(f"{who}: expected a dict, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class ViTConfig:
    """Hugging Face's ViTConfig fields (``num_classes`` is its ``num_labels``).
    ``intermediate_size`` defaults to ``mlp_ratio * hidden_size``."""
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    num_classes: int = 1000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", int(round(self.mlp_ratio * self.hidden_size)))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"ViTConfig: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.patch_size > self.image_size:
            raise ValueError(f"ViTConfig: patch_size {self.patch_size} exceeds image_size {self.image_size}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"ViTConfig: unknown hidden_act {self.hidden_act!r} (available: {', '.join(ACTIVATIONS)})")

    @classmethod
    def from_hf_config(cls, d: dict) -> "ViTConfig":
        """From a Hugging Face ViT ``config.json`` dict (``num_labels``/``id2label`` give
        ``num_classes``); fields we do not model must keep the values we implement."""
        if d.get("pooler_act", "tanh") != "tanh" or d.get("pooler_output_size", d.get("hidden_size")) != \
                d.get("hidden_size"):
            raise ValueError("ViTConfig.from_hf_config: only a tanh pooler of hidden_size outputs is supported")
        kw = config_fields(cls, d, "ViTConfig.from_hf_config")
        kw.pop("num_classes", None)
        n = d.get("num_labels", len(d.get("id2label") or {}) or 2)  # HF's default: 2 labels
        return cls(num_classes=int(n), **kw)

    # the names the timm / original-paper world uses
    @property
    def embed_dim(self) -> int:
        return self.hidden_size

    @property
    def depth(self) -> int:
        return self.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _trunc_normal(shape, std):
    return np.clip(nn.normal_(shape, std), -2 * std, 2 * std).astype(np.float32)


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return patch_conv(self.projection, x)


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cls_token = nn.Parameter(_trunc_normal((1, 1, cfg.hidden_size), cfg.initializer_range))
        self.position_embeddings = nn.Parameter(_trunc_normal((1, cfg.num_patches + 1, cfg.hidden_size),
                                                              cfg.initializer_range))
        self.patch_embeddings = ViTPatchEmbeddings(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x):
        patches = self.patch_embeddings(x)
        b, _, d = patches.shape
        cls = F.broadcast_to(self.cls_token, (b, 1, d))
        return self.dropout(F.concat([cls, patches], 1) + self.position_embeddings)


class ViTSelfAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d, std = cfg.hidden_size, cfg.initializer_range
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(d, d, cfg.qkv_bias, std)
        self.key = nn.Linear(d, d, cfg.qkv_bias, std)
        self.value = nn.Linear(d, d, cfg.qkv_bias, std)
        self.dropout = nn.Dropout(cfg.attention_probs_dropout_prob)

    def forward(self, x):
        b, s, d = x.shape
        hd = d // self.num_heads

        def heads(t):
            return t.reshape(b, s, self.num_heads, hd).transpose(0, 2, 1, 3)

        if self.dropout.inactive:  # the fused attention, on (batch, seq, heads, hd) views
            q, k, v = (t(x).reshape(b, s, self.num_heads, hd) for t in (self.query, self.key, self.value))
            return F.attention(q, k, v, scale=1.0 / math.sqrt(hd)).reshape(b, s, d)
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = F.matmul(q, F.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(hd))
        att = self.dropout(F.softmax(scores, -1))
        return F.matmul(att, v).transpose(0, 2, 1, 3).reshape(b, s, d)


class _Dense(nn.Module):
    """HF's ViTSelfOutput / ViTIntermediate / ViTOutput: one ``dense`` Linear."""

    def __init__(self, n_in: int, n_out: int, std: float):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out, True, std)

    def forward(self, x):
        return self.dense(x)


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.attention = ViTSelfAttention(cfg)
        self.output = _Dense(cfg.hidden_size, cfg.hidden_size, cfg.initializer_range)

    def forward(self, x):
        return self.output(self.attention(x))


class ViTLayer(nn.Module):
    """Pre-LN: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.act = cfg.hidden_act
        self.attention = ViTAttention(cfg)
        self.intermediate = _Dense(cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range)
        self.output = _Dense(cfg.intermediate_size, cfg.hidden_size, cfg.initializer_range)
        self.layernorm_before = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x):
        x = x + self.dropout(self.attention(self.layernorm_before(x)))
        h = activation(self.act, self.intermediate(self.layernorm_after(x)))
        return x + self.dropout(self.output(h))


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x):
        for layer in self.layer:
            x = layer(x)
        return x


class ViTPooler(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, True, cfg.initializer_range)

    def forward(self, hidden):
        return F.tanh(self.dense(hidden[:, 0]))


class ViTModel(nn.Module):
    """The encoder.  ``model(pixel_values)`` -> {"last_hidden_state": (B, 1 + patches, D),
    "pooler_output": tanh(dense(CLS)) (B, D) or None without the pooling layer}."""

    def __init__(self, cfg: ViTConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = cfg
        self.embeddings = ViTEmbeddings(cfg)
        self.encoder = ViTEncoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.pooler = ViTPooler(cfg) if add_pooling_layer else None

    def forward(self, pixel_values):
        cfg = self.config
        x = _as_pixels(pixel_values, cfg.image_size, cfg.num_channels, type(self).__name__)
        h = self.layernorm(self.encoder(self.embeddings(x)))
        return {"last_hidden_state": h, "pooler_output": self.pooler(h) if self.pooler is not None else None}

    @classmethod
    def from_pretrained(cls, directory: str, add_pooling_layer: bool | None = None) -> "ViTModel":
        """A Hugging Face ViTModel directory (config.json + safetensors); the pooling layer is
        built when the checkpoint has one (unless ``add_pooling_layer`` says otherwise)."""
        config, state = read_hf_checkpoint(directory)
        if add_pooling_layer is None:
            add_pooling_layer = "pooler.dense.weight" in state
        model = cls(ViTConfig.from_hf_config(config), add_pooling_layer)
        model.load_state_dict(state)
        return model


class ViTForImageClassification(nn.Module):
    """ViT with a linear head on the final [CLS] state.  ``model(pixel_values)`` -> logits
    (B, num_classes); ``model(pixel_values, labels)`` -> (logits, mean cross entropy)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.vit = ViTModel(cfg, add_pooling_layer=False)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_classes, True, cfg.initializer_range)

    def forward(self, pixel_values, labels=None):
        h = self.vit(pixel_values)["last_hidden_state"]
        logits = self.classifier(h[:, 0])
        if labels is None:
            return logits
        return logits, F.cross_entropy(logits, labels)

    @classmethod
    def from_hf_state_dict(cls, cfg: ViTConfig, state: dict) -> "ViTForImageClassification":
        model = cls(cfg)
        model.load_state_dict({k: np.asarray(v) for k, v in state.items()})
        return model

    @classmethod
    def from_pretrained(cls, directory: str) -> "ViTForImageClassification":
        """A Hugging Face ViTForImageClassification directory (config.json + safetensors)."""
        config, state = read_hf_checkpoint(directory)
        model = cls(ViTConfig.from_hf_config(config))
        model.load_state_dict(state)
        return model

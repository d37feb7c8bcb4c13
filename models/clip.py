"""CLIP: a ViT image tower and a causal text transformer trained contrastively, with Hugging
Face-compatible parameter names, shapes and layouts.

State dict names match ``CLIPModel`` checkpoints (``text_model.encoder.layers.0.self_attn.q_proj.weight``,
``vision_model.embeddings.patch_embedding.weight`` (Conv2d, no bias),
``vision_model.embeddings.class_embedding``, ``vision_model.pre_layrnorm.weight`` (sic),
``visual_projection.weight``, ``text_projection.weight``, ``logit_scale``, ...).

    cfg = CLIPConfig(text_config=CLIPTextConfig(vocab_size=40, ...),
                     vision_config=CLIPVisionConfig(image_size=8, patch_size=2, num_channels=1, ...),
                     projection_dim=32)
    model = CLIPModel(cfg)
    out = model(input_ids, pixel_values, return_loss=True)
    out["logits_per_image"], out["loss"]

The text tower pools the final-LayerNorm state at the end-of-text token: the first position
holding ``eos_token_id``, or, when ``eos_token_id == 2`` (the value of the original OpenAI
configs), the position of the largest input id, exactly as Hugging Face does.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from neural_arch.compiler import functional as F
from neural_arch.compiler.tensor import Tensor

from . import nn
from .vit import ACTIVATIONS, _as_pixels, activation, config_fields, patch_conv, read_hf_checkpoint


def _check_common(cfg, who):
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{who}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                         f"{cfg.num_attention_heads}")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{who}: unknown hidden_act {cfg.hidden_act!r} (available: {', '.join(ACTIVATIONS)})")


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        _check_common(self, "CLIPTextConfig")


@dataclass(frozen=True)
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    def __post_init__(self):
        _check_common(self, "CLIPVisionConfig")
        if self.patch_size > self.image_size:
            raise ValueError(f"CLIPVisionConfig: patch_size {self.patch_size} exceeds image_size {self.image_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _sub_config(cls, value, who):
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"CLIPConfig: unknown {who} fields {unknown}")
        return cls(**value)
    raise TypeError(f"CLIPConfig: {who} must be a {cls.__name__} or a dict, got {type(value).__name__}")


@dataclass(frozen=True)
class CLIPConfig:
    """``text_config`` and ``vision_config`` may be given as dataclasses or dicts."""
    text_config: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07), as in the paper

    def __post_init__(self):
        object.__setattr__(self, "text_config", _sub_config(CLIPTextConfig, self.text_config, "text_config"))
        object.__setattr__(self, "vision_config", _sub_config(CLIPVisionConfig, self.vision_config, "vision_config"))

    @classmethod
    def from_hf_config(cls, d: dict) -> "CLIPConfig":
        """From a Hugging Face CLIP ``config.json`` dict (fields we do not use are ignored)."""
        return cls(text_config=CLIPTextConfig(**config_fields(CLIPTextConfig, d.get("text_config") or {},
                                                              "CLIPConfig.from_hf_config text_config")),
                   vision_config=CLIPVisionConfig(**config_fields(CLIPVisionConfig, d.get("vision_config") or {},
                                                                  "CLIPConfig.from_hf_config vision_config")),
                   **{k: v for k, v in config_fields(cls, d, "CLIPConfig.from_hf_config").items()
                      if k not in ("text_config", "vision_config")})


# ----------------------------------------------------------------------------- shared encoder


class CLIPMLP(nn.Module):
    def __init__(self, cfg, fc_std: float, proj_std: float):
        super().__init__()
        self.act = cfg.hidden_act
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, True, fc_std)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, True, proj_std)

    def forward(self, x):
        return self.fc2(activation(self.act, self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN: x + self_attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""

    def __init__(self, cfg):
        super().__init__()
        d, n, f = cfg.hidden_size, cfg.num_hidden_layers, cfg.initializer_factor
        in_std = d ** -0.5 * (2 * n) ** -0.5 * f  # Hugging Face's CLIP initialisation
        out_std = d ** -0.5 * f
        self.self_attn = nn.MultiHeadAttention(d, cfg.num_attention_heads, cfg.attention_dropout)
        for lin, std in ((self.self_attn.q_proj, in_std), (self.self_attn.k_proj, in_std),
                         (self.self_attn.v_proj, in_std), (self.self_attn.out_proj, out_std)):
            lin.weight.data = nn.normal_(lin.weight.shape, std)
        self.layer_norm1 = nn.LayerNorm(d, cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg, (2 * d) ** -0.5 * f, in_std)
        self.layer_norm2 = nn.LayerNorm(d, cfg.layer_norm_eps)

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.self_attn(self.layer_norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x, attn_mask=None, is_causal=False):
        for layer in self.layers:
            x = layer(x, attn_mask, is_causal)
        return x


# ----------------------------------------------------------------------------- text tower


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        std = cfg.initializer_range * cfg.initializer_factor
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size, std)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, std)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding(F.arange(ids.shape[1]))


_MASKED = float(np.finfo(np.float32).min)


def eos_positions(input_ids, eos_token_id: int):
    """Per sequence, the position whose final state CLIP's text tower pools: the first
    ``eos_token_id``, or with ``eos_token_id == 2`` (the original configs) the largest id.
    A sequence without the eos token pools position 0 (as Hugging Face's argmax does)."""
    if eos_token_id == 2:
        return F.argmax(input_ids, -1)
    return F.argmax(F.cast(F.eq(input_ids, eos_token_id), "int32"), -1)


class CLIPTextTransformer(nn.Module):
    """``model(input_ids, attention_mask=None)`` -> {"last_hidden_state": (B, T, D),
    "pooler_output": (B, D) the state at each sequence's end-of-text token}.
    ``attention_mask`` (B, T) is 1 at real tokens and 0 at padding, as in Hugging Face."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, input_ids, attention_mask=None):
        cfg = self.config
        ids = input_ids if isinstance(input_ids, Tensor) else Tensor(np.asarray(input_ids, np.int64))
        if ids.ndim != 2:
            raise ValueError(f"CLIPTextTransformer: input_ids must be (batch, seq), got shape {ids.shape}")
        b, t = ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(f"CLIPTextTransformer: sequence length {t} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        bias = None
        if attention_mask is not None:
            am = attention_mask if isinstance(attention_mask, Tensor) else Tensor(np.asarray(attention_mask))
            if am.shape != (b, t):
                raise ValueError(f"CLIPTextTransformer: attention_mask has shape {am.shape}, expected {(b, t)}")
            # padding keys get the most negative finite float added, as in Hugging Face: a query
            # whose every visible key is padding (left padding) then stays finite instead of NaN
            bias = F.where(F.eq(am, 0), _MASKED, 0.0).reshape(b, 1, 1, t)
        h = self.final_layer_norm(self.encoder(self.embeddings(ids), attn_mask=bias, is_causal=True))
        pick = F.one_hot(eos_positions(ids, cfg.eos_token_id), t, h.dtype)  # (B, T)
        pooled = F.sum(h * F.expand_dims(pick, -1), 1)
        return {"last_hidden_state": h, "pooler_output": pooled}


# ----------------------------------------------------------------------------- vision tower


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.initializer_factor
        self.class_embedding = nn.Parameter(nn.normal_((d,), d ** -0.5 * f))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.patch_embedding.weight.data = nn.normal_(self.patch_embedding.weight.shape, cfg.initializer_range * f)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, d, cfg.initializer_range * f)

    def forward(self, x):
        patches = patch_conv(self.patch_embedding, x)
        b, _, d = patches.shape
        cls = F.broadcast_to(self.class_embedding.reshape(1, 1, d), (b, 1, d))
        return F.concat([cls, patches], 1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    """``model(pixel_values)`` -> {"last_hidden_state": (B, 1 + patches, D),
    "pooler_output": post_layernorm of the class token's final state}."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)  # sic: Hugging Face's name
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, pixel_values):
        cfg = self.config
        x = _as_pixels(pixel_values, cfg.image_size, cfg.num_channels, type(self).__name__)
        h = self.encoder(self.pre_layrnorm(self.embeddings(x)))
        return {"last_hidden_state": h, "pooler_output": self.post_layernorm(h[:, 0])}


# ----------------------------------------------------------------------------- the model


def l2_normalize(x, axis=-1):
    """x / ||x||_2 along ``axis`` (no epsilon, as Hugging Face's CLIP)."""
    return F.div(x, F.sqrt(F.sum(x * x, axis, keepdims=True)))


def clip_loss(logits_per_text):
    """The symmetric contrastive loss: the mean of the cross entropies of matching each text to
    its image (rows) and each image to its text (columns); pair i is the positive of i."""
    n = logits_per_text.shape[0]
    if logits_per_text.shape != (n, n):
        raise ValueError(f"clip_loss: needs a square (texts, images) logit matrix, got {logits_per_text.shape}")
    target = F.arange(n)
    return (F.cross_entropy(logits_per_text, target) + F.cross_entropy(F.transpose(logits_per_text), target)) * 0.5


class CLIPModel(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        tc, vc = cfg.text_config, cfg.vision_config
        self.text_model = CLIPTextTransformer(tc)
        self.vision_model = CLIPVisionTransformer(vc)
        self.visual_projection = nn.Linear(vc.hidden_size, cfg.projection_dim, False,
                                           vc.hidden_size ** -0.5 * vc.initializer_factor)
        self.text_projection = nn.Linear(tc.hidden_size, cfg.projection_dim, False,
                                         tc.hidden_size ** -0.5 * tc.initializer_factor)
        self.logit_scale = nn.Parameter(np.asarray(cfg.logit_scale_init_value, np.float32))

    def get_text_features(self, input_ids, attention_mask=None):
        """Projected (not normalised) text embeddings (B, projection_dim)."""
        return self.text_projection(self.text_model(input_ids, attention_mask)["pooler_output"])

    def get_image_features(self, pixel_values):
        """Projected (not normalised) image embeddings (B, projection_dim)."""
        return self.visual_projection(self.vision_model(pixel_values)["pooler_output"])

    def forward(self, input_ids, pixel_values, attention_mask=None, return_loss=False):
        """-> {"image_embeds", "text_embeds" (L2-normalised), "logits_per_image" (images, texts),
        "logits_per_text" (texts, images), and with ``return_loss`` "loss" (clip_loss)}."""
        image_embeds = l2_normalize(self.get_image_features(pixel_values))
        text_embeds = l2_normalize(self.get_text_features(input_ids, attention_mask))
        logits_per_text = F.matmul(text_embeds, F.transpose(image_embeds)) * F.exp(self.logit_scale)
        out = {"image_embeds": image_embeds, "text_embeds": text_embeds,
               "logits_per_image": F.transpose(logits_per_text), "logits_per_text": logits_per_text}
        if return_loss:
            out["loss"] = clip_loss(logits_per_text)
        return out

    def load_state_dict(self, state: dict, strict: bool = True) -> dict:
        """Older checkpoints carry ``*.embeddings.position_ids`` buffers (0..n-1) we do not need."""
        state = {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
        return super().load_state_dict(state, strict)

    @classmethod
    def from_hf_state_dict(cls, cfg: CLIPConfig, state: dict) -> "CLIPModel":
        model = cls(cfg)
        model.load_state_dict({k: np.asarray(v) for k, v in state.items()})
        return model

    @classmethod
    def from_pretrained(cls, directory: str) -> "CLIPModel":
        """A Hugging Face CLIPModel directory (config.json + safetensors)."""
        config, state = read_hf_checkpoint(directory)
        model = cls(CLIPConfig.from_hf_config(config))
        model.load_state_dict(state)
        return model

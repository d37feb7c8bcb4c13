"""BERT with Hugging Face-compatible parameter names, shapes and layouts.

State dict names match ``BertModel`` (``embeddings.word_embeddings.weight``,
``encoder.layer.0.attention.self.query.weight`` in the nn.Linear (out, in) layout, ...),
``BertForMaskedLM`` (``bert.`` prefix, ``cls.predictions.*`` with the decoder tied to the
word embeddings) and ``BertForSequenceClassification`` (``bert.``, ``classifier.*``), so
Hugging Face checkpoints load with ``load_state_dict``.

Embeddings (word + position + token type, LayerNorm), a post-LN encoder (attention, then
LayerNorm of the residual sum; the MLP, then LayerNorm of the residual sum), and a pooler
(dense + tanh on the [CLS] position).  Padding keys are masked by adding the most negative
float32 to their scores, as Hugging Face does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from neural_arch.compiler import functional as F
from neural_arch.compiler.tensor import Tensor

from . import nn

# what Hugging Face adds to the scores of masked keys (torch.finfo(torch.float32).min)
MASK_BIAS = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class BERTConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"  # "gelu" (erf), "gelu_new"/"gelu_pytorch_tanh" (tanh form), "relu", "silu"
    initializer_range: float = 0.02
    pad_token_id: int = 0
    num_labels: int = 2  # BERTForSequenceClassification: 1 means regression (MSE loss)
    classifier_dropout: float | None = None  # None: hidden_dropout_prob

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BERTConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BERTConfig: hidden_act {self.hidden_act!r} is not one of {', '.join(_ACTIVATIONS)}")

    @classmethod
    def from_dict(cls, d: dict) -> "BERTConfig":
        """From a Hugging Face ``config.json`` dict (unknown keys are ignored).  HF writes the
        number of labels as ``id2label`` (``num_labels`` is not saved)."""
        known = cls.__dataclass_fields__
        kw = {k: v for k, v in d.items() if k in known}
        if "num_labels" not in kw and d.get("id2label"):
            kw["num_labels"] = len(d["id2label"])
        if d.get("problem_type") not in (None, "single_label_classification", "regression"):
            raise ValueError(f"BERTConfig: problem_type {d['problem_type']!r} is not supported (its loss is "
                             f"binary cross-entropy in transformers); single_label_classification and "
                             f"regression are")
        return cls(**kw)


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def _as_ids(x, what: str) -> Tensor:
    t = x if isinstance(x, Tensor) else Tensor(np.asarray(x, dtype=np.int64))
    if t.ndim != 2:
        raise ValueError(f"BERT: {what} must be (batch, seq), got shape {t.shape}")
    return t


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BERTConfig):
        super().__init__()
        std = cfg.initializer_range
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, std)
        if 0 <= cfg.pad_token_id < cfg.vocab_size:
            self.word_embeddings.weight.data[cfg.pad_token_id] = 0.0  # as torch initialises padding_idx
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, std)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size, std)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.pad_token_id = cfg.pad_token_id if 0 <= cfg.pad_token_id < cfg.vocab_size else None

    def forward(self, input_ids, token_type_ids=None):
        t = input_ids.shape[1]
        words = self.word_embeddings(input_ids)
        if self.pad_token_id is not None:
            # torch's Embedding(padding_idx=...): the padding row is looked up but never trained
            is_pad = F.expand_dims(F.eq(input_ids, self.pad_token_id), -1)
            words = F.where(is_pad, F.stop_gradient(words), words)
        x = words + self.position_embeddings(F.arange(t))
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # every token is of type 0
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BERTConfig):
        super().__init__()
        h, std = cfg.hidden_size, cfg.initializer_range
        self.num_heads, self.head_dim = cfg.num_attention_heads, h // cfg.num_attention_heads
        self.query = nn.Linear(h, h, init_std=std)
        self.key = nn.Linear(h, h, init_std=std)
        self.value = nn.Linear(h, h, init_std=std)
        self.dropout = nn.Dropout(cfg.attention_probs_dropout_prob)

    def _heads(self, x):
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def forward(self, x, mask_bias=None):
        b, t, c = x.shape
        if self.dropout.inactive:  # the fused attention, on (b, t, heads, hd) views; padding as a key bias
            q, k, v = (lin(x).reshape(b, t, self.num_heads, self.head_dim) for lin in (self.query, self.key, self.value))
            bias = None if mask_bias is None else mask_bias.reshape(b, t)
            return F.attention(q, k, v, scale=1.0 / math.sqrt(self.head_dim), key_bias=bias).reshape(b, t, c)
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = F.matmul(q, F.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(self.head_dim))
        if mask_bias is not None:
            scores = scores + mask_bias  # (b, 1, 1, t): padding keys get MASK_BIAS
        probs = self.dropout(F.softmax(scores, -1))
        return F.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, t, c)


class BertSelfOutput(nn.Module):
    """dense, dropout, then LayerNorm of the residual sum (post-LN)."""

    def __init__(self, cfg: BERTConfig, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size, init_std=cfg.initializer_range)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg, cfg.hidden_size)

    def forward(self, x, mask_bias=None):
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size, init_std=cfg.initializer_range)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size)  # HF's BertOutput has the same shape

    def forward(self, x, mask_bias=None):
        a = self.attention(x, mask_bias)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x, mask_bias=None):
        for layer in self.layer:
            x = layer(x, mask_bias)
        return x


class BertPooler(nn.Module):
    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, init_std=cfg.initializer_range)

    def forward(self, hidden):
        return F.tanh(self.dense(hidden[:, 0]))


def _drop_unused(state: dict) -> dict:
    """Buffers that old HF checkpoints carry and we compute instead (position ids, token
    type ids)."""
    return {k: v for k, v in state.items()
            if not k.endswith(("embeddings.position_ids", "embeddings.token_type_ids"))}


def strip_prefix(state: dict, anchor: str = "embeddings.word_embeddings.weight") -> dict:
    """Names relative to the BertModel: the prefix in front of ``anchor`` (``bert.``,
    ``0.auto_model.``, ...) is removed from every key that carries it; other keys stay."""
    hits = [k for k in state if k == anchor or k.endswith("." + anchor)]
    if len(hits) > 1:
        raise ValueError(f"BERT state dict: {len(hits)} keys end in {anchor!r} ({', '.join(hits)}); "
                         f"cannot tell which model to load")
    if not hits or hits[0] == anchor:
        return dict(state)
    prefix = hits[0][:-len(anchor)]
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


class BERTModel(nn.Module):
    """``model(input_ids, token_type_ids=None, attention_mask=None)`` -> dict with
    ``last_hidden_state`` (batch, seq, hidden) and ``pooler_output`` (batch, hidden) (None
    without the pooler).  ``attention_mask`` (batch, seq) is 1 for tokens to attend to, 0 for
    padding; ``token_type_ids`` default to 0."""

    def __init__(self, cfg: BERTConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg) if add_pooling_layer else None

    def mask_bias(self, attention_mask, batch: int, seq: int):
        """(batch, 1, 1, seq): 0 where attended, MASK_BIAS at padding keys."""
        if attention_mask is None:
            return None
        m = attention_mask if isinstance(attention_mask, Tensor) else Tensor(np.asarray(attention_mask))
        if m.shape != (batch, seq):
            raise ValueError(f"BERT: attention_mask has shape {m.shape}, expected (batch, seq) = {(batch, seq)}")
        m = F.cast(m, "float32")
        return ((1.0 - m) * MASK_BIAS).reshape(batch, 1, 1, seq)

    def hidden_states(self, input_ids, token_type_ids=None, attention_mask=None):
        """The encoder's output (batch, seq, hidden)."""
        cfg = self.config
        ids = _as_ids(input_ids, "input_ids")
        b, t = ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(f"BERT: sequence length {t} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        tt = None
        if token_type_ids is not None:
            tt = _as_ids(token_type_ids, "token_type_ids")
            if tt.shape != ids.shape:
                raise ValueError(f"BERT: token_type_ids has shape {tt.shape}, expected {ids.shape}")
        x = self.embeddings(ids, tt)
        return self.encoder(x, self.mask_bias(attention_mask, b, t))

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> dict:
        h = self.hidden_states(input_ids, token_type_ids, attention_mask)
        return {"last_hidden_state": h, "pooler_output": self.pooler(h) if self.pooler is not None else None}

    def encode(self, input_ids, token_type_ids, attention_mask):
        """(last_hidden_state, pooler_output) as a tuple, the form ``compile`` traces, e.g.
        ``compile(model.encode, ids, types, mask)``; only last_hidden_state without the pooler."""
        out = self.forward(input_ids, token_type_ids, attention_mask)
        if out["pooler_output"] is None:
            return out["last_hidden_state"]
        return out["last_hidden_state"], out["pooler_output"]

    def load_state_dict(self, state: dict, strict: bool = True) -> dict:
        """Also accepts names under a prefix (``bert.`` in Hugging Face's task models, whose
        heads are then unexpected keys) and drops the position/token-type id buffers that
        old checkpoints carry."""
        return super().load_state_dict(strip_prefix(_drop_unused(state)), strict)


class _TiedDecoder(nn.Module):
    """cls.predictions.decoder: weight is the word embedding, bias is cls.predictions.bias."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter):
        super().__init__()
        self.weight = weight
        self.bias = bias


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, init_std=cfg.initializer_range)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: BERTConfig, word_embeddings: nn.Parameter):
        super().__init__()
        self.bias = nn.Parameter(np.zeros(cfg.vocab_size, np.float32))
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = _TiedDecoder(word_embeddings, self.bias)

    def forward(self, x):
        return F.linear(self.transform(x), self.decoder.weight, self.decoder.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: BERTConfig, word_embeddings: nn.Parameter):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, word_embeddings)

    def forward(self, x):
        return self.predictions(x)


class BERTForMaskedLM(nn.Module):
    """``model(input_ids, token_type_ids=None, attention_mask=None, labels=None)`` -> dict with
    ``logits`` (batch, seq, vocab) and, given ``labels`` (batch, seq; -100 where no token is
    predicted), the mean cross entropy ``loss`` over the labelled positions."""

    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.config = cfg
        self.bert = BERTModel(cfg, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(cfg, self.bert.embeddings.word_embeddings.weight)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None) -> dict:
        h = self.bert.hidden_states(input_ids, token_type_ids, attention_mask)
        logits = self.cls(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels, ignore_index=-100)
        return out

    def load_state_dict(self, state: dict, strict: bool = True) -> dict:
        """HF checkpoints may omit the tied decoder weight and bias; a ``BertModel``
        checkpoint's pooler is not part of this model and is dropped."""
        state = {k: v for k, v in _drop_unused(state).items() if not k.startswith("bert.pooler.")}
        if "cls.predictions.decoder.weight" not in state and "bert.embeddings.word_embeddings.weight" in state:
            state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
        if "cls.predictions.decoder.bias" not in state and "cls.predictions.bias" in state:
            state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
        return super().load_state_dict(state, strict)


class BERTForSequenceClassification(nn.Module):
    """``model(input_ids, token_type_ids=None, attention_mask=None, labels=None)`` -> dict with
    ``logits`` (batch, num_labels) from the pooled [CLS] state and, given ``labels``, ``loss``:
    cross entropy over int labels, or MSE when ``num_labels == 1`` (regression), as HF."""

    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.config = cfg
        self.bert = BERTModel(cfg)
        p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels, init_std=cfg.initializer_range)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None) -> dict:
        pooled = self.bert(input_ids, token_type_ids, attention_mask)["pooler_output"]
        logits = self.classifier(self.dropout(pooled))
        out = {"logits": logits}
        if labels is not None:
            if self.config.num_labels > 1 and not str(labels.dtype if hasattr(labels, "dtype") else
                                                         np.asarray(labels).dtype).startswith(("int", "uint")):
                raise TypeError(f"BERTForSequenceClassification: labels must be integer classes for "
                                f"{self.config.num_labels} labels (float labels mean multi-label "
                                f"classification, binary cross-entropy in transformers, which is not supported)")
            if self.config.num_labels == 1:
                out["loss"] = F.mse_loss(logits.reshape(-1), F.cast(labels, "float32").reshape(-1))
            else:
                out["loss"] = F.cross_entropy(logits, labels)
        return out

    def load_state_dict(self, state: dict, strict: bool = True) -> dict:
        return super().load_state_dict(_drop_unused(state), strict)

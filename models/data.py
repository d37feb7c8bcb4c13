"""Text data: tokenizers, the default corpus, and (input, target) batches.

* ``CharTokenizer``: one id per character of the training text.
* ``BPETokenizer``: byte-level BPE trained with the ``tokenizers`` library.
* ``stdlib_corpus()``: the running interpreter's own standard-library sources, a text
  corpus every machine with Python has.
* ``TextDataset``: token windows with a seeded train/validation split.
"""
from __future__ import annotations

import json
import math
import os
import sysconfig
from dataclasses import dataclass

import numpy as np


class CharTokenizer:
    """Characters to ids and back; the vocabulary is the sorted set of the text's characters."""

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: the vocabulary has repeated characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        try:
            return np.fromiter((self.stoi[c] for c in text), dtype=np.int64, count=len(text))
        except KeyError as e:
            raise ValueError(f"CharTokenizer: character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"CharTokenizer: ids must lie in [0, {self.vocab_size})")
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars})

    @classmethod
    def from_json(cls, text: str) -> "CharTokenizer":
        d = json.loads(text)
        if d.get("type") != "char":
            raise ValueError("not a CharTokenizer description")
        return cls(d["chars"])


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) trained on a corpus with the ``tokenizers`` library."""

    def __init__(self, tok):
        self._tok = tok

    @classmethod
    def train(cls, texts, vocab_size: int = 512, min_frequency: int = 2) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator([texts] if isinstance(texts, str) else texts, trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str) -> "BPETokenizer":
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_str(text))


def stdlib_corpus(max_chars: int = 2_000_000) -> str:
    """The standard library's Python sources (sorted by path, so the same interpreter always
    gives the same text), up to ``max_chars`` characters."""
    root = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib",
                                                              "__pycache__", "lib2to3", "ensurepip"))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            text = "".join(c for c in text if c.isascii())
            parts.append(text)
            total += len(text)
            if total >= max_chars:
                return "".join(parts)[:max_chars]
    if not parts:
        raise FileNotFoundError(f"no Python sources found under {root}")
    return "".join(parts)[:max_chars]


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Cross entropy (nats/token) of predicting each token by its frequency: the loss a model
    that ignores context reaches.  A language model must get below it."""
    counts = np.bincount(np.asarray(tokens).reshape(-1), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@dataclass
class TextDataset:
    """Token windows: inputs ``x = t[i:i+block]`` and targets ``y = t[i+1:i+block+1]``.  The
    last ``val_fraction`` of the token stream is the validation split (contiguous, so no
    window straddles both)."""

    tokens: np.ndarray
    block_size: int
    val_fraction: float = 0.1

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"TextDataset: val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.block_size < 1:
            raise ValueError(f"TextDataset: block_size must be at least 1, got {self.block_size}")
        self.tokens = np.asarray(self.tokens, dtype=np.int64)
        n_val = int(len(self.tokens) * self.val_fraction)
        self.train_tokens = self.tokens[:len(self.tokens) - n_val]
        self.val_tokens = self.tokens[len(self.tokens) - n_val:]
        for name, part in (("train", self.train_tokens), ("validation", self.val_tokens)):
            if self.val_fraction > 0 or name == "train":
                if len(part) <= self.block_size:
                    raise ValueError(f"TextDataset: the {name} split has {len(part)} tokens, fewer than "
                                     f"block_size + 1 = {self.block_size + 1}")

    def batch(self, split: str, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if split not in ("train", "val"):
            raise ValueError(f"TextDataset.batch: split must be 'train' or 'val', got {split!r}")
        data = {"train": self.train_tokens, "val": self.val_tokens}[split]
        if len(data) <= self.block_size:
            raise ValueError(f"TextDataset.batch: the {split} split is empty (val_fraction {self.val_fraction})")
        starts = rng.integers(0, len(data) - self.block_size - 1 + 1, size=batch_size)
        x = np.stack([data[s:s + self.block_size] for s in starts])
        y = np.stack([data[s + 1:s + 1 + self.block_size] for s in starts])
        return x, y

    def perplexity_floor(self, vocab_size: int) -> float:
        return math.exp(unigram_entropy(self.train_tokens, vocab_size))

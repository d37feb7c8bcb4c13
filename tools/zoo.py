"""The model zoo: named example programs for `narch dump`, `narch difftest` and `narch profile`.

An entry is one small function returning a :class:`ZooModel`: a seeded model, an example
batch (NumPy arrays), the forward function and the loss function.  Everything else (the
forward graph, the loss graph, the training-step graph and the example inputs of each) is
derived here the same way for every entry:

    graph, inputs = example("gpt2-tiny")              # forward: logits
    graph, inputs = example("gpt2-tiny", train=True)  # forward + loss + backward + SGD update

Entries whose model module is missing or broken stay listed, with the reason they are not
available (``available()``), so the registry never hides a model silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from neural_arch.compiler.ir import Graph


@dataclass
class ZooModel:
    model: object                      # a Module (named_parameters())
    batch: tuple                       # example batch: NumPy arrays
    forward: Callable                  # forward(model, *batch) -> output tensor(s)
    loss: Callable                     # loss(model, *batch) -> scalar tensor
    forward_inputs: int | None = None  # how many batch arrays the forward takes (default: all)


@dataclass
class ZooEntry:
    name: str
    doc: str
    make: Callable[[], ZooModel]


ZOO: dict[str, ZooEntry] = {}


def register(name: str, doc: str):
    def deco(make):
        if name in ZOO:
            raise ValueError(f"zoo entry {name!r} registered twice")
        ZOO[name] = ZooEntry(name, doc, make)
        return make
    return deco


def names() -> list[str]:
    return list(ZOO)


def get(name: str) -> ZooEntry:
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r} (available: {', '.join(ZOO)})")
    return ZOO[name]


def available() -> dict[str, str | None]:
    """name -> None when the entry builds, else the one-line reason it does not."""
    out = {}
    for name, entry in ZOO.items():
        try:
            entry.make()
            out[name] = None
        except ImportError as e:
            out[name] = f"its model module is missing ({e})"
    return out


def make(name: str) -> ZooModel:
    return get(name).make()


# ----------------------------------------------------------------------------- derived graphs


@dataclass
class Example:
    graph: Graph
    inputs: list[np.ndarray]
    kind: str = "forward"  # "forward" | "loss" | "train"
    info: dict = field(default_factory=dict)


def forward_example(zm: ZooModel, name: str) -> Example:
    from neural_arch.compiler.trace import as_numpy_inputs, trace_with_info
    batch = zm.batch[:zm.forward_inputs] if zm.forward_inputs is not None else zm.batch

    def fn(*xs):
        return zm.forward(zm.model, *xs)
    fn.__name__ = name.replace("-", "_") + "_forward"
    t = trace_with_info(fn, *batch, params=dict(zm.model.named_parameters()))
    return Example(t.graph, as_numpy_inputs(t.graph, t.bindings), "forward")


def loss_example(zm: ZooModel, name: str) -> Example:
    from neural_arch.compiler.trace import as_numpy_inputs, trace_with_info

    def fn(*xs):
        return zm.loss(zm.model, *xs)
    fn.__name__ = name.replace("-", "_") + "_loss"
    t = trace_with_info(fn, *zm.batch, params=dict(zm.model.named_parameters()))
    return Example(t.graph, as_numpy_inputs(t.graph, t.bindings), "loss")


def backward_graph(loss: Example) -> Graph:
    """The gradient graph of a loss graph with respect to its parameters (its backward)."""
    from neural_arch.compiler.autodiff import autodiff
    wrt = [i.name for i in loss.graph.inputs if i.kind == "param" and i.type.dtype.startswith("float")]
    return autodiff(loss.graph, wrt, with_value=True, name=loss.graph.name + "_backward")


def train_example(zm: ZooModel, name: str, lr: float = 0.01) -> Example:
    """ONE program: forward, loss, backward and an SGD-with-momentum update (linear in the
    gradients, so compiled and interpreted steps agree to rounding; Adam's first step is
    ~lr*sign(g), which amplifies rounding of tiny gradients)."""
    from neural_arch.models import optim
    from neural_arch.models.train import build_train_graph
    opt = optim.SGD(zm.model.parameters(), lr=lr, momentum=0.9)
    prog = build_train_graph(zm.model, zm.loss, opt, zm.batch, name=name.replace("-", "_") + "_train_step")
    return Example(prog.graph, train_step_inputs(prog.graph, zm.model, zm.batch, lr), "train",
                   {"params": prog.param_names, "state": prog.state_names})


def train_step_inputs(g: Graph, model, batch, lr: float) -> list[np.ndarray]:
    """Inputs of a training-step graph (``build_train_graph``) for its first step: ``lr``,
    step 1, seed 1, the batch, the model's parameters and zero optimizer state."""
    params = dict(model.named_parameters())
    values = {"lr": np.asarray(lr, np.float64), "step": np.asarray(1, np.int64), "seed": np.asarray(1, np.int64)}
    for k, b in enumerate(batch):
        values[f"batch{k}"] = np.asarray(b)
    inputs = []
    for i in g.inputs:
        if i.name in values:
            arr = values[i.name]
        elif i.kind == "param":
            arr = np.asarray(params[i.name].data)
        else:  # optimizer state (momentum buffers, moments) starts at zero
            arr = np.zeros(i.type.shape, i.type.dtype)
        inputs.append(np.array(arr, dtype=i.type.dtype, order="C"))
    return inputs


def example(name: str, train: bool = False) -> Example:
    zm = make(name)
    return train_example(zm, name) if train else forward_example(zm, name)


# ----------------------------------------------------------------------------- the entries


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _cross_entropy_loss(model, x, y):
    from neural_arch.compiler import functional as F
    return F.cross_entropy(model(x), y)


@register("mlp", "a 2-layer MLP with GELU and LayerNorm on a batch of 8x16 features, 4 classes")
def _mlp() -> ZooModel:
    from neural_arch.models import nn
    nn.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))
    x = _rng(0).standard_normal((8, 16)).astype(np.float32)
    y = _rng(1).integers(0, 4, 8).astype(np.int64)
    return ZooModel(model, (x, y), lambda m, x: m(x), _cross_entropy_loss, forward_inputs=1)


@register("gpt2-tiny", "GPT-2 (models/gpt2.py): 2 layers, 2 heads, 32 channels, vocab 64, batch 2x16 tokens")
def _gpt2_tiny() -> ZooModel:
    from neural_arch.models import nn
    from neural_arch.models.gpt2 import GPT2, GPT2Config
    nn.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = GPT2(cfg)
    idx = _rng(2).integers(0, 64, (2, 16)).astype(np.int64)
    targets = np.roll(idx, -1, axis=1)
    return ZooModel(model, (idx, targets), lambda m, idx: m(idx), lambda m, idx, t: m(idx, t)[1],
                    forward_inputs=1)


@register("bert-tiny", "BERT masked LM (models/bert.py): 2 post-LN layers, 4 heads, hidden 32, vocab 64, "
                       "batch 2x12 tokens with padding and 3 masked targets per row")
def _bert_tiny() -> ZooModel:
    from neural_arch.models import nn
    from neural_arch.models.bert import BERTConfig, BERTForMaskedLM
    nn.manual_seed(0)
    cfg = BERTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BERTForMaskedLM(cfg)
    ids = _rng(3).integers(1, 64, (2, 12)).astype(np.int64)
    types = np.zeros_like(ids)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    ids[mask == 0] = 0
    labels = np.full_like(ids, -100)
    labels[:, [1, 4, 7]] = ids[:, [1, 4, 7]]
    return ZooModel(model, (ids, types, mask, labels), lambda m, i, t, a: m(i, t, a)["logits"],
                    lambda m, i, t, a, y: m(i, t, a, labels=y)["loss"], forward_inputs=3)


@register("vit-tiny", "ViT image classifier (models/vit.py): 8x8 images in 2 channels, 4x4 patches, "
                      "2 pre-LN layers, 4 heads, hidden 32, 10 classes, batch 4")
def _vit_tiny() -> ZooModel:
    from neural_arch.models import nn
    from neural_arch.models.vit import ViTConfig, ViTForImageClassification
    nn.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=2, num_classes=10, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64)
    model = ViTForImageClassification(cfg)
    x = _rng(4).standard_normal((4, 2, 8, 8)).astype(np.float32)
    y = _rng(5).integers(0, 10, 4).astype(np.int64)
    return ZooModel(model, (x, y), lambda m, x: m(x), lambda m, x, y: m(x, y)[1], forward_inputs=1)


@register("clip-tiny", "CLIP (models/clip.py): ViT tower on 8x8 images (4x4 patches) and causal text tower "
                       "(vocab 24, 6 tokens, eos pooling), 2 layers each, hidden 32, projection 16, batch 4 "
                       "pairs, symmetric contrastive loss")
def _clip_tiny() -> ZooModel:
    from neural_arch.models import nn
    from neural_arch.models.clip import CLIPConfig, CLIPModel
    nn.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=6, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=23),
                     vision_config=dict(image_size=8, patch_size=4, num_channels=1, hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
                     projection_dim=16)
    model = CLIPModel(cfg)
    ids = _rng(6).integers(2, 23, (4, 6)).astype(np.int64)
    ids[:, 0] = 1
    for r, end in enumerate([5, 3, 4, 2]):
        ids[r, end] = 23
        ids[r, end + 1:] = 0
    x = _rng(7).standard_normal((4, 1, 8, 8)).astype(np.float32)

    def forward(m, ids, px):
        out = m(ids, px)
        return out["logits_per_image"], out["image_embeds"], out["text_embeds"]
    return ZooModel(model, (ids, x), forward, lambda m, ids, px: m(ids, px, return_loss=True)["loss"])

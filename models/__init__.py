"""neural_arch.models: nn layers, optimizers and the model zoo.

    from neural_arch.models import nn, optim, GPT2, GPT2Config
"""
from . import nn, optim
from .gpt2 import GPT2, GPT2Config
from .bert import BERTConfig, BERTModel, BERTForMaskedLM, BERTForSequenceClassification
from .train import compile_train_step
from .vit import ViTConfig, ViTModel, ViTForImageClassification
from .clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, CLIPModel, clip_loss

__all__ = ["nn", "optim", "GPT2", "GPT2Config", "compile_train_step", "ViTConfig", "ViTModel",
           "ViTForImageClassification", "CLIPConfig", "CLIPTextConfig", "CLIPVisionConfig", "CLIPModel", "clip_loss"]
__all__ += ["BERTConfig", "BERTModel", "BERTForMaskedLM", "BERTForSequenceClassification"]

"""neural_arch.models: nn layers, optimizers and the model zoo.

    from neural_arch.models import nn, optim
"""
from . import nn, optim

__all__ = ["nn", "optim"]

"""The op library: primitives with all their faces (see registry.py, primitives.py)."""
from .registry import (NONDIFF, PRIMITIVES, Case, DTypeError, NumpySampler, OpError, OpIndexError,
                       Primitive, Sampler, ShapeError, Spec, get)
from . import primitives  # noqa: F401  (declares every primitive)

__all__ = ["NONDIFF", "PRIMITIVES", "Case", "DTypeError", "NumpySampler", "OpError", "OpIndexError",
           "Primitive", "Sampler", "ShapeError", "Spec", "get"]

"""neural_arch.compiler: the public API.

    from neural_arch.compiler import Tensor, tensor, trace, grad, value_and_grad, no_grad, gradcheck
    from neural_arch.compiler import functional as F
"""
from . import ops  # noqa: F401  (declares the primitives)
from .ir import Graph, Node, TensorType, parse
from .tensor import Tensor, no_grad, is_grad_enabled
from . import functional
from .functional import tensor, zeros, ones, full, arange, randn, rand, zeros_like, ones_like
from .trace import trace, grad, value_and_grad
from .gradcheck import gradcheck
from .verify import verify

__all__ = ["Tensor", "tensor", "trace", "grad", "value_and_grad", "no_grad", "gradcheck", "functional",
           "Graph", "Node", "TensorType", "parse", "verify", "zeros", "ones", "full", "arange", "randn",
           "rand", "zeros_like", "ones_like", "is_grad_enabled"]
from .compile import compile, CompiledFunction  # noqa: E402,A001

__all__ += ["compile", "CompiledFunction"]

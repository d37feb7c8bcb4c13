"""Graph-to-graph passes and the pass manager.

    from neural_arch.compiler.passes import run_pipeline, DEFAULT_PIPELINE, PASSES
"""
from .manager import PASSES, Pass, PassError, PipelineResult, register_pass, run_pipeline
from . import simplify, remat  # noqa: F401  (registers cse, dce, fold_constants, algebraic, remat, ...)

# The simplification pipeline every compile runs (fusion and memory planning follow it).
DEFAULT_PIPELINE = (
    "strip_stop_gradient",
    "fold_constants",
    "algebraic",
    "cse",
    "fold_constants",
    "algebraic",
    "dce",
    "remat",
)

__all__ = ["PASSES", "Pass", "PassError", "PipelineResult", "register_pass", "run_pipeline", "DEFAULT_PIPELINE"]

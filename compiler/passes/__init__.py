"""Graph-to-graph passes and the pass manager.

    from neural_arch.compiler.passes import run_pipeline, DEFAULT_PIPELINE, PASSES
"""
import functools
import hashlib
import os

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


@functools.lru_cache(maxsize=None)
def fingerprint() -> str:
    """A hash of the sources that decide what the compiler does to a traced graph before
    code generation: the IR, the ops (shape rules, fusion kinds) and every pass (the
    pipeline, fusion, remat, memory planning).  Cached results derived from a graph (in-place
    decisions, module records) are keyed by it, so editing any of these files misses."""
    here = os.path.dirname(os.path.abspath(__file__))
    compiler = os.path.dirname(here)
    files = [os.path.join(compiler, "ir.py")]
    for d in (os.path.join(compiler, "ops"), here):
        files += sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".py"))
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        h.update(f"{os.path.relpath(path, compiler)}:{len(data)}:".encode())
        h.update(data)
    return h.hexdigest()[:16]


__all__ = ["PASSES", "Pass", "PassError", "PipelineResult", "register_pass", "run_pipeline", "DEFAULT_PIPELINE",
           "fingerprint"]

"""Shared test machinery: the hypothesis profile, a hypothesis-backed Sampler for the op
specs, and small helpers (torch availability, float64 finite differences, comparisons)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from neural_arch.compiler.ops.registry import Sampler

# ----------------------------------------------------------------------------- hypothesis

_COMMON = dict(deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
# "dev" (default) keeps the whole suite well under a few minutes on 2 cores; "thorough" is
# for an occasional long run: NEURAL_ARCH_HYPOTHESIS=thorough pytest tests/
settings.register_profile("dev", max_examples=30, **_COMMON)
settings.register_profile("thorough", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("NEURAL_ARCH_HYPOTHESIS", "dev"))


def _apply_avoid(x: np.ndarray, avoid) -> np.ndarray:
    """The registry's contract for ``avoid``: keep values at least 0.05 from each kink."""
    for a in avoid:
        d = x - a
        x = np.where(np.abs(d) < 0.05, a + np.where(d >= 0, 0.1, -0.1), x)
    return x


class HypothesisSampler(Sampler):
    """A :class:`Sampler` whose every choice is a hypothesis draw, so the op specs' shapes
    (0-d, size-1, empty, broadcast) and values shrink to minimal failing examples."""

    def __init__(self, data):
        self.data = data

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(int(lo), int(hi)))

    def array(self, shape, dtype="float32", lo=-2.0, hi=2.0, avoid=()) -> np.ndarray:
        shape = tuple(int(d) for d in shape)
        if dtype == "bool":
            return self.data.draw(hnp.arrays(np.bool_, shape, elements=st.booleans()))
        if dtype in ("int32", "int64"):
            lo_i, hi_i = int(lo), int(hi) - 1  # [lo, hi) as in the NumPy sampler
            if hi_i < lo_i:
                hi_i = lo_i
            return self.data.draw(hnp.arrays(np.dtype(dtype), shape, elements=st.integers(lo_i, hi_i)))
        x = self.data.draw(hnp.arrays(np.float64, shape,
                                      elements=st.floats(float(lo), float(hi), exclude_max=True,
                                                         allow_nan=False, allow_infinity=False,
                                                         allow_subnormal=False)))
        return _apply_avoid(x, avoid).astype(dtype)


# ----------------------------------------------------------------------------- torch

try:  # torch is the oracle where installed
    import torch  # noqa: F401
    HAVE_TORCH = True
except ImportError:  # pragma: no cover - the test extras install it
    HAVE_TORCH = False

needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (pip install '.[test]')")


# ----------------------------------------------------------------------------- helpers


def assert_close(actual, expected, rtol, atol, what=""):
    """allclose that treats NaN == NaN and reports the worst element."""
    a = np.asarray(actual, dtype=np.float64) if np.asarray(actual).dtype != bool else np.asarray(actual)
    e = np.asarray(expected, dtype=np.float64) if np.asarray(expected).dtype != bool else np.asarray(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if a.dtype == bool or e.dtype == bool:
        np.testing.assert_array_equal(a, e, err_msg=what)
        return
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


def numeric_grad(f, xs, argnums, eps=1e-6):
    """float64 central differences of scalar ``f(*xs)`` for each element of xs[i], i in argnums."""
    xs = [np.array(x, copy=True) for x in xs]
    grads = []
    for i in argnums:
        g = np.zeros(xs[i].shape, dtype=np.float64)
        for idx in np.ndindex(xs[i].shape):
            old = xs[i][idx]
            xs[i][idx] = old + eps
            hi = f(*xs)
            xs[i][idx] = old - eps
            lo = f(*xs)
            xs[i][idx] = old
            g[idx] = (hi - lo) / (2 * eps)
        grads.append(g)
    return grads

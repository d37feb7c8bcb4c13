"""gradcheck: reverse-mode gradients against float64 central finite differences."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tensor import Tensor, no_grad
from .trace import grad


@dataclass(frozen=True)
class GradcheckResult:
    ok: bool
    worst_input: int  # which argument holds the worst element (-1 when there is none)
    worst_index: tuple  # its index
    analytic: float
    numeric: float
    abs_err: float
    rel_err: float

    def __str__(self) -> str:
        if self.worst_input < 0:
            return "gradcheck: no differentiable elements"
        verdict = "ok" if self.ok else "FAILED"
        return (f"gradcheck {verdict}: worst element is input {self.worst_input}{list(self.worst_index)}: "
                f"analytic {self.analytic:.8g}, numeric {self.numeric:.8g} "
                f"(abs err {self.abs_err:.3g}, rel err {self.rel_err:.3g})")


class GradcheckError(AssertionError):
    pass


def gradcheck(fn, *inputs, eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-7,
              raise_on_failure: bool = True, seed: int = 0) -> GradcheckResult:
    """Compare grad(fn) with float64 central differences for every float input element.
    Inputs are converted to float64.  A non-scalar output is reduced with a fixed random
    projection, so every output element's gradient is checked."""
    xs = [np.asarray(x.data if isinstance(x, Tensor) else x) for x in inputs]
    xs = [x.astype(np.float64) if x.dtype.kind == "f" else x for x in xs]
    argnums = tuple(i for i, x in enumerate(xs) if x.dtype.kind == "f")
    with no_grad():
        probe = fn(*[Tensor(x) for x in xs])
    proj = np.random.default_rng(seed).standard_normal(probe.shape) if probe.shape != () else None

    def scalar_fn(*ts):
        out = fn(*ts)
        return out if proj is None else (out * Tensor(proj)).sum()

    analytic = grad(scalar_fn, argnums)(*[Tensor(x) for x in xs])
    analytic = [np.asarray(a.data, dtype=np.float64) for a in analytic]

    def f(vals):
        with no_grad():
            return float(scalar_fn(*[Tensor(v) for v in vals]).data)

    worst = GradcheckResult(True, -1, (), 0.0, 0.0, 0.0, 0.0)
    worst_score = -1.0
    for k, i in enumerate(argnums):
        for idx in np.ndindex(xs[i].shape):
            vals = [x.copy() for x in xs]
            vals[i][idx] += eps
            hi = f(vals)
            vals[i][idx] -= 2 * eps
            lo = f(vals)
            num = (hi - lo) / (2 * eps)
            ana = float(analytic[k][idx])
            err = abs(ana - num)
            score = err / (atol + rtol * abs(num))
            if not np.isfinite(score):
                score = np.inf
            if score > worst_score:
                worst_score = score
                worst = GradcheckResult(score <= 1.0, i, idx, ana, num, err, err / max(abs(num), 1e-30))
    if raise_on_failure and not worst.ok:
        raise GradcheckError(str(worst))
    return worst

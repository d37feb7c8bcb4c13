"""Derives the polynomial coefficients in ``mathlib.py`` (development tool; needs mpmath).

    python -m neural_arch.compiler.codegen._mathfit

Each approximation is Chebyshev interpolation of the target function at high precision in
a scaled variable ``t`` on [-1, 1] (or directly in the natural variable when the interval
starts at 0), converted to monomial coefficients, rounded to the working precision, and
checked on a dense grid (relative error printed).  Chebyshev interpolation is within a
small factor of the minimax error, which is enough headroom here.
"""
from __future__ import annotations

import mpmath as mp

mp.mp.dps = 60


def cheb_fit(f, a, b, n):
    """Monomial coefficients c[0..n] of the degree-n interpolant of f on [a, b] at Chebyshev
    nodes, in the variable x itself (not scaled).  High precision keeps this exact enough."""
    nodes = [mp.mpf(a + b) / 2 + mp.mpf(b - a) / 2 * mp.cos(mp.pi * (k + mp.mpf(1) / 2) / (n + 1))
             for k in range(n + 1)]
    A = mp.matrix(n + 1, n + 1)
    y = mp.matrix(n + 1, 1)
    for i, x in enumerate(nodes):
        for j in range(n + 1):
            A[i, j] = x ** j
        with mp.workdps(300):  # removable singularities (x/x at a node near 0) need digits
            y[i] = +f(mp.mpf(x) if abs(x) > mp.mpf(10) ** -40 else mp.mpf(0))
    c = mp.lu_solve(A, y)
    return [c[j] for j in range(n + 1)]


def horner(c, x):
    r = mp.mpf(0)
    for v in reversed(c):
        r = r * x + v
    return r


def max_rel_err(f, c, a, b, samples=2000, prec_round=None):
    cc = [prec_round(v) for v in c] if prec_round else c
    worst = 0
    for k in range(samples + 1):
        x = mp.mpf(a) + (mp.mpf(b) - a) * k / samples
        fx = f(x)
        if fx == 0:
            continue
        e = abs((horner(cc, x) - fx) / fx)
        worst = max(worst, e)
    return worst


def r64(v):
    return mp.mpf(float(v))


def r32(v):
    import numpy as np
    return mp.mpf(float(np.float32(float(v))))


def show(name, c, rnd):
    print(f"{name} = ({', '.join(repr(float(rnd(v))) for v in c)})")


def main():
    ln2 = mp.log(2)
    # ---- exp: e^r = 1 + r + r^2 P(r) on |r| <= ln2/2 (+ slack)
    R = ln2 / 2 * mp.mpf("1.01")
    g = lambda r: (mp.exp(r) - 1 - r) / r ** 2 if r != 0 else mp.mpf(1) / 2  # noqa: E731
    for n, rnd, nm in ((4, r32, "EXP_F32"), (10, r64, "EXP_F64")):
        c = cheb_fit(g, -R, R, n)
        err = max_rel_err(lambda r: mp.exp(r), [1, 1] + list(c), -R, R, 400,
                          prec_round=rnd)
        print(f"# exp deg {n + 2}: max rel err {float(err):.3g}")
        show(nm, c, rnd)
    # ---- log: log(1+f) = f - hfsq + s*(hfsq + R), s = f/(2+f), R(z) = z*Q(z), z = s^2
    smax = (mp.sqrt(2) - 1) / (mp.sqrt(2) + 1) * mp.mpf("1.001")
    zmax = smax ** 2

    def q(z):  # R(z)/z with 2*atanh(s) = 2s + s*R  =>  R = 2*atanh(s)/s - 2
        if z == 0:
            return mp.mpf(2) / 3
        s = mp.sqrt(z)
        return (2 * mp.atanh(s) / s - 2) / z
    for n, rnd, nm in ((3, r32, "LOG_F32"), (7, r64, "LOG_F64")):
        c = cheb_fit(q, 0, zmax, n)
        err = max_rel_err(q, c, 0, zmax, 400, prec_round=rnd)
        print(f"# log Q deg {n}: max rel err {float(err):.3g}")
        show(nm, c, rnd)
    # ---- tanh: tanh(x) = x + x*z*P(z), z = x^2, |x| < T
    for T, n, rnd, nm in ((mp.mpf("0.625"), 4, r32, "TANH_F32"), (mp.mpf("0.625"), 10, r64, "TANH_F64")):
        p = lambda z: (mp.tanh(mp.sqrt(z)) / mp.sqrt(z) - 1) / z if z != 0 else mp.mpf(-1) / 3  # noqa: E731
        c = cheb_fit(p, 0, T * T, n)
        err = max_rel_err(p, c, 0, T * T, 400, prec_round=rnd)
        print(f"# tanh P deg {n} (|x|<{float(T)}): max rel err {float(err):.3g}")
        show(nm, c, rnd)
    # ---- erf, |x| < 1: erf(x) = x * P(x^2)
    for n, rnd, nm in ((6, r32, "ERF_SMALL_F32"), (11, r64, "ERF_SMALL_F64")):
        p = lambda z: mp.erf(mp.sqrt(z)) / mp.sqrt(z) if z != 0 else 2 / mp.sqrt(mp.pi)  # noqa: E731
        c = cheb_fit(p, 0, 1, n)
        err = max_rel_err(p, c, 0, 1, 400, prec_round=rnd)
        print(f"# erf small deg {n}: max rel err {float(err):.3g}")
        show(nm, c, rnd)
    # ---- erf, |x| >= 1: erfc(x) = exp(L(x) - x^2), L = log(erfcx(x)), t = (x - c)/h
    L = lambda x: mp.log(mp.erfc(x)) + x * x  # noqa: E731
    for (a, b), n, rnd, nm in ((("1", "3.92"), 10, r32, "ERF_LARGE_F32"),
                               (("1", "2.5"), 18, r64, "ERF_MID_F64"),
                               (("2.5", "6"), 18, r64, "ERF_TAIL_F64")):
        a, b = mp.mpf(a), mp.mpf(b)
        cen, h = (a + b) / 2, (b - a) / 2
        Lt = lambda t: L(cen + h * t)  # noqa: E731
        c = cheb_fit(Lt, -1, 1, n)
        cc = [rnd(v) for v in c]
        worst = 0
        for k in range(801):
            t = mp.mpf(-1) + 2 * mp.mpf(k) / 800
            x = cen + h * t
            e = abs(horner(cc, t) - Lt(t)) * mp.erfc(x) / mp.erf(x)  # induced rel error of erf
            worst = max(worst, e)
        print(f"# erf L on [{float(a)}, {float(b)}] deg {n}: induced max rel err of erf {float(worst):.3g}"
              f" (center {float(cen)}, half-width {float(h)})")
        show(nm, c, rnd)
    # ---- sin/cos on |r| <= pi/4 (+ slack), in double (also for float32 inputs)
    Rr = mp.pi / 4 * mp.mpf("1.02")
    S = lambda z: (mp.sin(mp.sqrt(z)) / mp.sqrt(z) - 1) / z if z != 0 else mp.mpf(-1) / 6  # noqa: E731
    C = lambda z: (mp.cos(mp.sqrt(z)) - 1 + z / 2) / z ** 2 if z != 0 else mp.mpf(1) / 24  # noqa: E731
    for n, nm in ((3, "SIN_F32"), (7, "SIN_F64")):
        c = cheb_fit(S, 0, Rr * Rr, n)
        err = max_rel_err(lambda r: mp.sin(r), [], 0, 0, 1) if False else None
        worst = 0
        for k in range(1, 401):
            r = Rr * k / 400
            z = r * r
            v = r + r * z * horner([r64(x) for x in c], z)
            worst = max(worst, abs(v - mp.sin(r)) / abs(mp.sin(r)))
        print(f"# sin deg {2 * n + 3}: max rel err {float(worst):.3g}")
        show(nm, c, r64)
    for n, nm in ((3, "COS_F32"), (7, "COS_F64")):
        c = cheb_fit(C, 0, Rr * Rr, n)
        worst = 0
        for k in range(0, 401):
            r = Rr * k / 400
            z = r * r
            v = 1 - z / 2 + z * z * horner([r64(x) for x in c], z)
            worst = max(worst, abs(v - mp.cos(r)) / abs(mp.cos(r)))
        print(f"# cos deg {2 * n + 4}: max rel err {float(worst):.3g}")
        show(nm, c, r64)
    # ---- constants
    print("# ln2 split for Cody-Waite (float32: 9 bits hi; float64: 32 bits hi)")
    for bits, nm in ((12, "F32"), (32, "F64")):
        hi = mp.nint(ln2 * 2 ** bits) / 2 ** bits
        lo = ln2 - hi
        print(f"LN2_HI_{nm} = {float(hi)!r}\nLN2_LO_{nm} = {float(lo)!r}")
    print("# pi/2 split: 33 + 33 bits + rest (float64 Cody-Waite)")
    pio2 = mp.pi / 2
    p1 = mp.floor(pio2 * 2 ** 32) / 2 ** 32
    p2 = mp.floor((pio2 - p1) * 2 ** 65) / 2 ** 65
    p3 = pio2 - p1 - p2
    print(f"PIO2_1 = {float(p1)!r}\nPIO2_2 = {float(p2)!r}\nPIO2_3 = {float(p3)!r}")
    print(f"TWO_OVER_PI = {float(2 / mp.pi)!r}")
    print(f"PI63 = {float(mp.pi * mp.mpf(2) ** -63)!r}")
    # 2/pi bits for Payne-Hanek: fraction bits b_1 b_2 ... (enough for float64 inputs)
    nbits = 1400
    with mp.workdps(600):
        frac = int(mp.floor((2 / mp.pi) * mp.mpf(2) ** nbits))
    print(f"TWO_OVER_PI_BITS = 0x{frac:x}  # floor(2/pi * 2**{nbits})")


if __name__ == "__main__":
    main()

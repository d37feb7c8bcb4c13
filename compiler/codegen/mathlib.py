"""Placeholder math library (replaced by polynomial code)."""
from __future__ import annotations

import llvmlite.ir as ir

from .kernel import F32, F64, FM, declare, reg_type


def get(module: ir.Module, name: str, dtype: str) -> ir.Function:
    suffix = "f32" if dtype == "float32" else "f64"
    fname = f"narch.{name}.{suffix}"
    try:
        return module.get_global(fname)
    except KeyError:
        pass
    t = reg_type(dtype)
    nargs = 2 if name == "pow" else 1
    fn = ir.Function(module, ir.FunctionType(t, [t] * nargs), name=fname)
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    x = fn.args[0]

    def intr(n, *a):
        return b.call(declare(module, f"llvm.{n}.{suffix}", t, [t] * len(a)), list(a))
    if name in ("exp", "log", "sin", "cos", "sqrt"):
        r = intr(name, x)
    elif name == "rsqrt":
        r = b.fdiv(ir.Constant(t, 1.0), intr("sqrt", x))
    elif name == "pow":
        r = intr("pow", x, fn.args[1])
    elif name == "tanh":
        e = intr("exp", b.fmul(x, ir.Constant(t, 2.0)))
        r = b.fdiv(b.fsub(e, ir.Constant(t, 1.0)), b.fadd(e, ir.Constant(t, 1.0)))
    elif name == "erf":
        r = declare(module, "erf" if dtype == "float64" else "erff", t, [t])
        r = b.call(r, [x])
    b.ret(r)
    return fn

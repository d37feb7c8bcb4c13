"""A persistent native thread pool for compiled kernels (serial stand-in for now).

Compiled code calls ``void narch_parallel_for(ptr fn, ptr ctx, i64 n_tasks)`` where ``fn``
is ``void (ptr ctx, i64 task)``; ``install()`` makes that symbol resolvable by modules
loaded afterwards through runtime.jit (MCJIT).
"""
from __future__ import annotations

import os
import threading

import llvmlite.binding as llvm

from . import jit

SYMBOL = "narch_parallel_for"

_lock = threading.Lock()
_loaded = None  # keeps the engine alive
_address = 0


def num_threads() -> int:
    return 1


_SERIAL_IR = r"""
define void @narch_parallel_for(ptr %fn, ptr %ctx, i64 %n) {
entry:
  %any = icmp sgt i64 %n, 0
  br i1 %any, label %loop, label %done
loop:
  %i = phi i64 [ 0, %entry ], [ %next, %loop ]
  call void %fn(ptr %ctx, i64 %i)
  %next = add nuw nsw i64 %i, 1
  %more = icmp slt i64 %next, %n
  br i1 %more, label %loop, label %done
done:
  ret void
}
"""


def _build_serial_ir() -> str:
    return _SERIAL_IR


def install() -> None:
    """Make ``narch_parallel_for`` resolvable by later MCJIT loads (idempotent, thread-safe)."""
    global _loaded, _address
    with _lock:
        if _loaded is not None:
            return
        loaded = jit.load(jit.optimize(_build_serial_ir(), "narch_pool"))
        addr = loaded.address(SYMBOL)
        llvm.add_symbol(SYMBOL, addr)
        _loaded, _address = loaded, addr


def address() -> int:
    install()
    return _address

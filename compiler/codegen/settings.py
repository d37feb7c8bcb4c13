"""Fingerprints of the code generator's module-level settings (``lowering.ATTENTION_MAX_TASKS``,
``gemm.BLOCKING``, ...): public UPPER_CASE names holding plain values -- numbers, strings,
frozen dataclasses of them, and containers of those.  Caches key compiled code on them, so
a setting changed in a running process (an A/B) never hands out code built under the old
value; the shared GEMM's symbol carries the GEMM module's own fingerprint."""
from __future__ import annotations

import dataclasses
import hashlib


def is_plain(v) -> bool:
    """Whether ``v`` is a value a setting can be keyed on (its repr is deterministic)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (tuple, list, frozenset)):
        return all(is_plain(x) for x in v)
    if isinstance(v, dict):
        return all(is_plain(k) and is_plain(x) for k, x in v.items())
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return all(is_plain(getattr(v, f.name)) for f in dataclasses.fields(v))
    return False


def settings(module) -> list[tuple[str, object]]:
    """The module's settings: (name, value) for public UPPER_CASE names with plain values."""
    return [(name, v) for name, v in sorted(vars(module).items())
            if name.isupper() and not name.startswith("_") and is_plain(v)]


def fingerprint(*modules) -> str:
    """A hash of the modules' settings as they are now (16 hex digits)."""
    h = hashlib.sha256()
    for mod in modules:
        for name, v in settings(mod):
            h.update(f"{mod.__name__}.{name}={v!r};".encode())
    return h.hexdigest()[:16]

"""Content-addressed on-disk cache of compiled object code.

An entry is keyed by the sha256 of a canonical JSON of its *key parts*; callers pass

    {"ir": canonical graph text (no source lines), "version": neural_arch version,
     "toolchain": jit.toolchain_id(), "options": {...}}

(any JSON-able dict works; a top-level string part longer than ``DIGESTED_MIN`` characters,
such as a program's IR, enters the key as its sha256, computed once per text, and the key
names the parts it digested, so no short part can stand for a long one).  Layout:
``<dir>/v2/<key[:2]>/<key>.obj``.  An entry file is

    b"NARCHOBJ" | u32 little-endian header length | header JSON | key parts JSON | payload

where the header holds the key, the payload's sha256 and length and the key parts' length,
and the key parts follow whole (so a miss can be explained); a lookup reads the header
and skips them.  Every read checks magic, header, length and hash; a bad entry is reported once (``CacheCorruptionWarning`` naming the file), deleted,
and treated as a miss so the caller rebuilds it.  Writes go to a temporary file in the same
directory, are fsync'ed, then ``os.replace``'d over the entry: concurrent writers of the same
key each install a complete entry (the last one wins; they are identical anyway) and a
reader sees either no entry or a whole one, never a half-written one.

Location: ``NEURAL_ARCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/neural_arch``, else
``~/.cache/neural_arch``.  ``NEURAL_ARCH_CACHE=0`` disables the cache (every get misses, put
does nothing).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import warnings
from typing import Callable, Iterator

FORMAT = "v2"
OLD_FORMATS = ("v1",)  # (their directories: removed by clear())
DIGESTED_MIN = 4096
MAGIC = b"NARCHOBJ"
_HEADER_LEN = struct.Struct("<I")
_MAX_HEADER = 1 << 30


class CacheCorruptionWarning(RuntimeWarning):
    """A cache entry failed its integrity check; it was deleted and will be rebuilt."""


class CorruptEntry(Exception):
    pass


def default_directory() -> str:
    env = os.environ.get("NEURAL_ARCH_CACHE_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "neural_arch")


def canonical_json(key_parts: dict) -> str:
    """The one text a dict of key parts hashes as: sorted keys, no whitespace, no NaN."""
    if not isinstance(key_parts, dict):
        raise TypeError(f"key_parts must be a dict, not {type(key_parts).__name__}")
    return json.dumps(key_parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


_digests: dict = {}  # long key part text -> its sha256 (a program's lookups share one IR text)
_digests_lock = threading.Lock()


def _digest(text: str) -> str:
    with _digests_lock:
        d = _digests.get(text)
    if d is None:
        d = "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
        with _digests_lock:
            if len(_digests) >= 8:  # (a few programs in flight; each text is ~0.1-0.3 MB)
                _digests.clear()
            _digests[text] = d
    return d


def cache_key(key_parts: dict) -> str:
    if not isinstance(key_parts, dict):
        raise TypeError(f"key_parts must be a dict, not {type(key_parts).__name__}")
    long = sorted(k for k, v in key_parts.items() if isinstance(v, str) and len(v) > DIGESTED_MIN)
    if not long:
        return hashlib.sha256(canonical_json(key_parts).encode("utf-8")).hexdigest()
    keyed = {"digested": long, "parts": {k: _digest(v) if k in long else v for k, v in key_parts.items()}}
    return hashlib.sha256(canonical_json(keyed).encode("utf-8")).hexdigest()


def _dumps(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _frame(key: str, key_parts: dict, payload: bytes) -> bytes:
    parts = _dumps(key_parts)
    header = _dumps({"format": FORMAT, "key": key, "length": len(payload),
                     "sha256": hashlib.sha256(payload).hexdigest(), "parts_length": len(parts),
                     "parts_sha256": hashlib.sha256(parts).hexdigest()})
    return MAGIC + _HEADER_LEN.pack(len(header)) + header + parts + payload


def _read_header(f, with_parts: bool = True) -> tuple[dict, int]:
    """(header, offset of the payload), the key parts in ``header["key_parts"]`` if
    ``with_parts`` (else skipped); raises CorruptEntry."""
    head = f.read(len(MAGIC) + _HEADER_LEN.size)
    if len(head) < len(MAGIC) + _HEADER_LEN.size:
        raise CorruptEntry(f"truncated header ({len(head)} bytes)")
    if head[:len(MAGIC)] != MAGIC:
        raise CorruptEntry("bad magic")
    (n,) = _HEADER_LEN.unpack(head[len(MAGIC):])
    if n > _MAX_HEADER:
        raise CorruptEntry(f"implausible header length {n}")
    raw = f.read(n)
    if len(raw) != n:
        raise CorruptEntry(f"truncated header ({len(raw)} of {n} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptEntry(f"unreadable header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or \
            not isinstance(header.get("length"), int) or not isinstance(header.get("sha256"), str) \
            or not isinstance(header.get("parts_length"), int) or not 0 <= header["parts_length"] <= _MAX_HEADER:
        raise CorruptEntry("malformed header")
    at = len(head) + n + header["parts_length"]
    if not with_parts:
        f.seek(at)
        return header, at
    raw = f.read(header["parts_length"])
    if len(raw) != header["parts_length"]:
        raise CorruptEntry(f"truncated key parts ({len(raw)} of {header['parts_length']} bytes)")
    if hashlib.sha256(raw).hexdigest() != header.get("parts_sha256"):
        raise CorruptEntry("key parts sha256 mismatch")
    try:
        header["key_parts"] = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptEntry(f"unreadable key parts ({e})") from None
    if not isinstance(header["key_parts"], dict):
        raise CorruptEntry("malformed key parts")
    return header, at


class ObjectCache:
    """The on-disk object cache.  Safe to share between threads and processes."""

    def __init__(self, directory: str | os.PathLike | None = None, enabled: bool | None = None):
        self.directory = os.path.abspath(os.fspath(directory)) if directory is not None \
            else default_directory()
        self.enabled = (os.environ.get("NEURAL_ARCH_CACHE", "1") != "0") if enabled is None \
            else enabled
        self.root = os.path.join(self.directory, FORMAT)
        self._lock = threading.Lock()
        self._stats = {"hits": 0, "misses": 0, "puts": 0, "corrupt": 0, "errors": 0}
        self._reported: set[str] = set()   # corrupt entries already reported (once each)
        self._corrupted: dict[str, str] = {}  # key -> why its entry was dropped (explain_miss)
        self._warned_write = False

    # ---------------------------------------------------------------- keys and paths
    @staticmethod
    def key(key_parts: dict) -> str:
        """sha256 (hex) of the canonical JSON of ``key_parts``."""
        return cache_key(key_parts)

    def path_for_key(self, key: str) -> str:
        return os.path.join(self.root, key[:2], key + ".obj")

    def path(self, key_parts: dict) -> str:
        return self.path_for_key(self.key(key_parts))

    # ---------------------------------------------------------------- stats
    @property
    def hits(self) -> int:
        return self._stats["hits"]

    @property
    def misses(self) -> int:
        return self._stats["misses"]

    @property
    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    def _count(self, what: str) -> None:
        with self._lock:
            self._stats[what] += 1

    def reset_stats(self) -> None:
        with self._lock:
            for k in self._stats:
                self._stats[k] = 0

    # ---------------------------------------------------------------- read
    def get(self, key_parts: dict) -> bytes | None:
        """The cached object for ``key_parts``, or None (a miss, counting a corrupt entry).
        With ``NEURAL_ARCH_EXPLAIN_CACHE=1`` every miss prints why on stderr
        (``explain_miss``: the nearest entry and what differs from it)."""
        payload = self._get(key_parts)
        if payload is None and os.environ.get("NEURAL_ARCH_EXPLAIN_CACHE") == "1":
            what = key_parts.get("kind") or key_parts.get("what") or "machine code"
            if "part" in key_parts:
                what += f", part {key_parts['part'] + 1} of {key_parts.get('of')}"
            sys.stderr.write(f"neural_arch: cache miss ({what}): {self.explain_miss(key_parts)}\n")
        return payload

    def _get(self, key_parts: dict) -> bytes | None:
        if not self.enabled:
            self._count("misses")
            return None
        key = self.key(key_parts)
        path = self.path_for_key(key)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            self._count("misses")
            return None
        except OSError as e:
            self._error(f"cannot read cache entry {path}: {e}")
            self._count("misses")
            return None
        with f:
            try:
                header, _ = _read_header(f, with_parts=False)
                if header.get("key") != key:
                    raise CorruptEntry(f"entry holds key {str(header.get('key'))[:16]}..., "
                                       f"expected {key[:16]}...")
                payload = f.read(header["length"] + 1)
                if len(payload) != header["length"]:
                    raise CorruptEntry(f"payload is {len(payload)} bytes, header says "
                                       f"{header['length']}")
                if hashlib.sha256(payload).hexdigest() != header["sha256"]:
                    raise CorruptEntry("payload sha256 mismatch")
            except CorruptEntry as e:
                self._drop_corrupt(key, path, f, str(e))
                self._count("misses")
                return None
        self._count("hits")
        return payload

    def _drop_corrupt(self, key: str, path: str, f, why: str) -> None:
        self._count("corrupt")
        with self._lock:
            self._corrupted[key] = why
            first = path not in self._reported
            self._reported.add(path)
        if first:
            warnings.warn(CacheCorruptionWarning(
                f"neural_arch: corrupt cache entry {path} ({why}); deleted, will rebuild"),
                stacklevel=3)
        # delete it unless another process has meanwhile replaced it with a fresh entry
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                os.unlink(path)
        except OSError:
            pass

    # ---------------------------------------------------------------- write
    def put(self, key_parts: dict, obj: bytes) -> bool:
        """Store ``obj`` atomically; returns False (after one warning) if the disk refused."""
        if not self.enabled:
            return False
        if not isinstance(obj, (bytes, bytearray, memoryview)):
            raise TypeError(f"object code must be bytes, not {type(obj).__name__}")
        key = self.key(key_parts)
        data = _frame(key, key_parts, bytes(obj))
        path = self.path_for_key(key)
        tmp = None
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-" + key[:16] + "-", dir=os.path.dirname(path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            self._error(f"cannot write cache entry {path}: {e}")
            return False
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        with self._lock:
            self._stats["puts"] += 1
            self._corrupted.pop(key, None)
        return True

    def get_or_build(self, key_parts: dict, build: Callable[[], bytes]) -> tuple[bytes, bool]:
        """(object, hit): the cached object, or ``build()``'s result after storing it."""
        obj = self.get(key_parts)
        if obj is not None:
            return obj, True
        obj = build()
        self.put(key_parts, obj)
        return obj, False

    def _error(self, msg: str) -> None:
        self._count("errors")
        with self._lock:
            first, self._warned_write = not self._warned_write, True
        if first:
            warnings.warn(f"neural_arch: {msg} (the cache is skipped; compiling still works)",
                          RuntimeWarning, stacklevel=3)

    # ---------------------------------------------------------------- maintenance
    def entries(self) -> Iterator[tuple[str, dict]]:
        """(path, header) of every readable entry (headers only; payloads are not checked)."""
        if not os.path.isdir(self.root):
            return
        for shard in sorted(os.listdir(self.root)):
            d = os.path.join(self.root, shard)
            if not os.path.isdir(d):
                continue
            for name in sorted(os.listdir(d)):
                if not name.endswith(".obj"):
                    continue
                p = os.path.join(d, name)
                try:
                    with open(p, "rb") as f:
                        header, _ = _read_header(f)
                except (OSError, CorruptEntry):
                    continue
                yield p, header

    def clear(self) -> int:
        """Delete every entry (and stray temporary files, and the entries of older formats,
        which this version never reads) and zero the counters; returns the number of
        entries of this format deleted."""
        n = sum(1 for _ in self.entries())
        shutil.rmtree(self.root, ignore_errors=True)
        for old in OLD_FORMATS:
            shutil.rmtree(os.path.join(self.directory, old), ignore_errors=True)
        self.reset_stats()
        with self._lock:
            self._corrupted.clear()
            self._reported.clear()
        return n

    # ---------------------------------------------------------------- explaining misses
    def explain_miss(self, key_parts: dict) -> str:
        """Why ``key_parts`` misses: the nearest stored entry and which parts differ."""
        key = self.key(key_parts)
        if not self.enabled:
            return "cache disabled (NEURAL_ARCH_CACHE=0)"
        with self._lock:
            why = self._corrupted.get(key)
        if why is not None:
            return f"entry was corrupt ({why}); it was deleted and is rebuilt on the next put"
        if os.path.exists(self.path_for_key(key)):
            return "not a miss: an entry with this key exists"
        best = None  # (score, path, parts)
        n_entries = 0
        for p, header in self.entries():
            n_entries += 1
            parts = header["key_parts"]
            same = sum(1 for k in set(parts) | set(key_parts) if parts.get(k, _MISSING) ==
                       key_parts.get(k, _MISSING))
            same_ir = parts.get("ir", _MISSING) == key_parts.get("ir", _MISSING)
            score = (same_ir, same)
            if best is None or score > best[0]:
                best = (score, p, parts)
        if best is None:
            return f"no entry with this IR (the cache at {self.root} is empty)"
        (same_ir, _), _, parts = best
        changed = [k for k in sorted(set(parts) | set(key_parts))
                   if parts.get(k, _MISSING) != key_parts.get(k, _MISSING)]
        if same_ir:
            return "; ".join(describe_change(k, parts.get(k, _MISSING), key_parts.get(k, _MISSING))
                             for k in changed)
        msg = f"no entry with this IR ({n_entries} entries in the cache)"
        if changed == ["ir"]:
            msg += "; the nearest entry differs only in its IR: " + \
                describe_change("ir", parts.get("ir", _MISSING), key_parts.get("ir", _MISSING))
        return msg


class _Missing:
    def __repr__(self) -> str:
        return "<absent>"


_MISSING = _Missing()


def _short(v, limit: int = 80) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True) if v is not _MISSING else repr(v)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _fields(s: str) -> dict | None:
    """'a=1;b=2' -> {'a': '1', 'b': '2'} (the toolchain id's shape), else None."""
    if "=" not in s or "\n" in s:
        return None
    out = {}
    for item in s.split(";"):
        k, eq, v = item.partition("=")
        if not eq or not re.fullmatch(r"[\w.\-]+", k):
            return None
        out[k] = v
    return out


def _feature_diff(old: str, new: str) -> str | None:
    """'+avx2,-avx512f,...' strings: name only the flags that changed."""
    def flags(s):
        out = {}
        for f in s.split(","):
            if f[:1] in "+-" and len(f) > 1:
                out[f[1:]] = f[0]
            elif f:
                return None
        return out
    a, b = flags(old), flags(new)
    if a is None or b is None:
        return None
    diff = [f"{a[k] + k if k in a else '(no ' + k + ')'} -> {b[k] + k if k in b else '(no ' + k + ')'}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(diff[:8]) + (f", ... ({len(diff)} flags)" if len(diff) > 8 else "")


def describe_change(part: str, old, new) -> str:
    if old is _MISSING:
        return f"{part} added: {_short(new)}"
    if new is _MISSING:
        return f"{part} removed (was {_short(old)})"
    if isinstance(old, str) and isinstance(new, str):
        fo, fn = _fields(old), _fields(new)
        if fo is not None and fn is not None:
            items = []
            for k in list(fo) + [k for k in fn if k not in fo]:
                a, b = fo.get(k, _MISSING), fn.get(k, _MISSING)
                if a == b:
                    continue
                feat = _feature_diff(a, b) if isinstance(a, str) and isinstance(b, str) else None
                items.append(f"{k}: {feat}" if feat else f"{k}={_short(a, 40)} -> {_short(b, 40)}")
            return f"{part} changed: " + "; ".join(items)
        if "\n" in old or "\n" in new:
            lo, ln = old.splitlines(), new.splitlines()
            for i, (a, b) in enumerate(zip(lo, ln)):
                if a != b:
                    return f"{part} changed at line {i + 1}: {_short(a.strip())!r} -> {_short(b.strip())!r}"
            return f"{part} changed: {len(lo)} -> {len(ln)} lines"
    if isinstance(old, dict) and isinstance(new, dict):
        items = [describe_change(f"{part}.{k}", old.get(k, _MISSING), new.get(k, _MISSING))
                 for k in sorted(set(old) | set(new)) if old.get(k, _MISSING) != new.get(k, _MISSING)]
        return "; ".join(items)
    return f"{part} changed: {_short(old)} -> {_short(new)}"


_default: ObjectCache | None = None
_default_lock = threading.Lock()


def default_cache() -> ObjectCache:
    """The process-wide cache at the configured location (created on first use)."""
    global _default
    with _default_lock:
        if _default is None or _default.directory != default_directory():
            _default = ObjectCache()
        return _default


def disk_cache() -> ObjectCache | None:
    """The process-wide cache, or None where caching is off (``NEURAL_ARCH_CACHE=0``)."""
    if os.environ.get("NEURAL_ARCH_CACHE", "1") == "0":
        return None
    return default_cache()

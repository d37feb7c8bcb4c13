"""The content-addressed object cache (runtime/cache.py)."""
import hashlib
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from neural_arch.runtime import cache as cache_mod
from neural_arch.runtime import jit
from neural_arch.runtime.cache import CacheCorruptionWarning, ObjectCache

_IR = r"""
define i64 @narch_cache_test(i64 %x) {
  %y = mul i64 %x, 3
  %z = add i64 %y, 7
  ret i64 %z
}
"""

PARTS = {"ir": "graph g(x: f32[4]):\n  y = add x x\n  return y", "version": "0.1.0",
         "toolchain": "llvmlite=0.50.0;llvm=22.1.0;cpu=znver4;features=+avx2,+fma,-avx512f",
         "options": {"opt_level": 3, "fastmath": ["contract", "nsz"]}}


@pytest.fixture
def cache(tmp_path):
    return ObjectCache(tmp_path / "cache")


def test_key_is_canonical():
    a = {"ir": "x", "options": {"b": 1, "a": 2}, "version": "1"}
    b = {"version": "1", "options": {"a": 2, "b": 1}, "ir": "x"}
    assert ObjectCache.key(a) == ObjectCache.key(b)
    assert len(ObjectCache.key(a)) == 64
    assert ObjectCache.key(a) != ObjectCache.key(dict(a, version="2"))
    with pytest.raises(TypeError):
        ObjectCache.key("not a dict")
    with pytest.raises(ValueError):
        ObjectCache.key({"x": float("nan")})


def test_a_long_part_enters_the_key_as_its_digest_and_is_stored_whole(cache):
    """A program's IR (longer than DIGESTED_MIN) is hashed once into the key; the entry
    still holds it whole for explain_miss, and a lookup never parses it."""
    long_ir = "graph g(x: f32[4]):\n" + "  y = add x x\n" * 1000
    parts = dict(PARTS, ir=long_ir)
    digest = "sha256:" + hashlib.sha256(long_ir.encode()).hexdigest()
    keyed = {"digested": ["ir"], "parts": dict(PARTS, ir=digest)}
    assert ObjectCache.key(parts) == hashlib.sha256(cache_mod.canonical_json(keyed).encode()).hexdigest()
    assert ObjectCache.key(parts) != ObjectCache.key(dict(parts, ir=long_ir.replace("add", "mul", 1)))
    assert ObjectCache.key(parts) != ObjectCache.key(dict(PARTS, ir=digest))  # (a short part never stands for a long one)
    assert ObjectCache.key(PARTS) == hashlib.sha256(cache_mod.canonical_json(PARTS).encode()).hexdigest()
    assert cache.put(parts, b"payload")
    assert cache.get(parts) == b"payload"
    assert [h["key_parts"] for _, h in cache.entries()] == [parts]
    changed = dict(parts, ir=long_ir.replace("add", "mul", 1))
    assert cache.explain_miss(changed) == "no entry with this IR (1 entries in the cache); the nearest entry " \
        "differs only in its IR: ir changed at line 2: 'y = add x x' -> 'y = mul x x'"


def test_default_location(monkeypatch, tmp_path):
    monkeypatch.setenv("NEURAL_ARCH_CACHE_DIR", str(tmp_path / "explicit"))
    assert ObjectCache().directory == str(tmp_path / "explicit")
    monkeypatch.delenv("NEURAL_ARCH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ObjectCache().directory == str(tmp_path / "xdg" / "neural_arch")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ObjectCache().directory == str(tmp_path / "home" / ".cache" / "neural_arch")


def test_put_get_stats_clear(cache):
    assert cache.get(PARTS) is None
    assert cache.put(PARTS, b"\x7fELF" + bytes(range(256)) * 10)
    assert cache.get(PARTS) == b"\x7fELF" + bytes(range(256)) * 10
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.stats["puts"] == 1
    assert cache.put(PARTS, b"")  # empty payloads are valid entries
    assert cache.get(PARTS) == b""
    assert [h["key_parts"] for _, h in cache.entries()] == [PARTS]
    assert cache.clear() == 1
    assert cache.get(PARTS) is None and cache.stats == {"hits": 0, "misses": 1, "puts": 0,
                                                        "corrupt": 0, "errors": 0}


def test_hit_in_a_fresh_process_loads_and_runs(cache):
    parts = dict(PARTS, toolchain=jit.toolchain_id(), ir=_IR)
    obj, hit = cache.get_or_build(parts, lambda: jit.emit_object(jit.optimize(_IR, "cache_test")))
    assert not hit and obj
    code = textwrap.dedent(f"""
        import ctypes, json, sys
        from neural_arch.runtime import jit
        from neural_arch.runtime.cache import ObjectCache
        c = ObjectCache({cache.directory!r})
        parts = dict(json.loads(sys.argv[1]), toolchain=jit.toolchain_id())
        obj = c.get(parts)
        if obj is None:
            print("MISS", c.explain_miss(parts)); sys.exit(1)
        loaded = jit.load(None, obj)  # keep the engine alive while its code runs
        f = loaded.function("narch_cache_test", ctypes.c_int64, ctypes.c_int64)
        print("HIT", f(5), c.stats["hits"])
    """)
    import json
    pj = json.dumps({k: v for k, v in parts.items() if k != "toolchain"})
    p = subprocess.run([sys.executable, "-c", code, pj], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.split() == ["HIT", "22", "1"]


def _corruptions(data: bytes):
    header_end = data.index(b'"version"') if b'"version"' in data else 20
    yield "empty", b""
    yield "magic only", data[:8]
    yield "mid header", data[:header_end]
    yield "mid payload", data[:len(data) - 50]
    yield "one byte short", data[:-1]
    yield "one byte long", data + b"\0"
    yield "payload bit flip", data[:-10] + bytes([data[-10] ^ 1]) + data[-9:]
    hdr = bytearray(data)
    hdr[20] ^= 0x20  # inside the header JSON
    yield "header byte flip", bytes(hdr)
    yield "garbage", os.urandom(len(data))


@pytest.mark.parametrize("name", [n for n, _ in _corruptions(b"x" * 400)])
def test_corrupt_entry_reported_once_deleted_and_rebuilt(cache, name):
    payload = os.urandom(300)
    cache.put(PARTS, payload)
    path = cache.path(PARTS)
    data = open(path, "rb").read()
    bad = dict(_corruptions(data))[name]
    with open(path, "wb") as f:
        f.write(bad)
    with pytest.warns(CacheCorruptionWarning) as rec:
        assert cache.get(PARTS) is None
    assert len(rec) == 1 and path in str(rec[0].message)
    assert not os.path.exists(path)
    assert "corrupt" in cache.explain_miss(PARTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: a second read is a plain miss
        assert cache.get(PARTS) is None
        rebuilt, hit = cache.get_or_build(PARTS, lambda: payload)
    assert not hit and rebuilt == payload
    assert cache.get(PARTS) == payload
    assert cache.stats["corrupt"] == 1


def test_entry_of_another_key_is_corrupt(cache):
    other = dict(PARTS, version="9.9")
    cache.put(other, b"other object")
    os.makedirs(os.path.dirname(cache.path(PARTS)), exist_ok=True)
    os.replace(cache.path(other), cache.path(PARTS))
    with pytest.warns(CacheCorruptionWarning, match="holds key"):
        assert cache.get(PARTS) is None


_WRITER = textwrap.dedent("""
    import hashlib, sys, warnings
    from neural_arch.runtime.cache import ObjectCache, CacheCorruptionWarning
    warnings.simplefilter("error", CacheCorruptionWarning)   # any torn read fails the test
    directory, who, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    parts = {"ir": "g", "version": "0", "toolchain": "t", "options": {}}
    payloads = {w: hashlib.sha256(w.encode()).digest() * (1 << 16) for w in ("a", "b")}  # 2 MiB
    c = ObjectCache(directory)
    seen = set()
    for i in range(rounds):
        if who != "reader":
            assert c.put(parts, payloads[who])
        got = c.get(parts)
        if got is not None:
            match = [w for w, p in payloads.items() if p == got]
            assert match, "read a payload no writer wrote"
            seen.add(match[0])
    print("ok", who, sorted(seen), c.stats["corrupt"])
""")


def test_concurrent_writers_from_two_processes(cache):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, cache.directory, who, rounds],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for who, rounds in (("a", "60"), ("b", "60"), ("reader", "200"))]
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.startswith("ok") and out.split()[-1] == "0"
    parts = {"ir": "g", "version": "0", "toolchain": "t", "options": {}}
    got = cache.get(parts)
    assert got in [hashlib.sha256(w.encode()).digest() * (1 << 16) for w in ("a", "b")]
    leftovers = [f for _, _, fs in os.walk(cache.directory) for f in fs if f.startswith(".tmp")]
    assert leftovers == []


def test_explain_miss_names_the_changed_part(cache):
    assert "no entry with this IR" in cache.explain_miss(PARTS)
    cache.put(PARTS, b"obj")
    assert "not a miss" in cache.explain_miss(PARTS)

    newer = dict(PARTS, toolchain=PARTS["toolchain"].replace("llvm=22.1.0", "llvm=22.1.4"))
    assert cache.explain_miss(newer) == "toolchain changed: llvm=22.1.0 -> 22.1.4"

    cpu = dict(PARTS, toolchain=PARTS["toolchain"].replace("-avx512f", "+avx512f"))
    assert cache.explain_miss(cpu) == "toolchain changed: features: -avx512f -> +avx512f"

    opts = dict(PARTS, options={"opt_level": 2, "fastmath": ["contract", "nsz"]})
    assert cache.explain_miss(opts) == "options.opt_level changed: 3 -> 2"

    ver = dict(PARTS, version="0.2.0")
    assert cache.explain_miss(ver) == "version changed: 0.1.0 -> 0.2.0"

    other_ir = dict(PARTS, ir=PARTS["ir"].replace("add", "mul"))
    msg = cache.explain_miss(other_ir)
    assert msg.startswith("no entry with this IR") and "line 2" in msg and "mul" in msg

    assert cache.explain_miss(dict(PARTS, ir="graph h()", version="7")).startswith(
        "no entry with this IR (1 entries")


def test_misses_say_why_when_asked(cache, monkeypatch, capsys):
    cache.put(PARTS, b"obj")
    newer = dict(PARTS, toolchain=PARTS["toolchain"].replace("llvm=22.1.0", "llvm=22.1.4"))
    assert cache.get(newer) is None
    assert capsys.readouterr().err == ""  # silent unless asked
    monkeypatch.setenv("NEURAL_ARCH_EXPLAIN_CACHE", "1")
    assert cache.get(PARTS) == b"obj"
    assert cache.get(newer) is None
    assert cache.get(dict(newer, what="part count")) is None
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "neural_arch: cache miss (machine code): toolchain changed: llvm=22.1.0 -> 22.1.4"
    assert err[1].startswith("neural_arch: cache miss (part count): ") and len(err) == 2


def test_unusable_directory_degrades_to_no_cache(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    c = ObjectCache(blocker / "cache")
    with pytest.warns(RuntimeWarning, match="cannot write"):
        assert c.put(PARTS, b"obj") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert c.put(PARTS, b"obj") is False  # warned once
        assert c.get(PARTS) is None


def test_disabled_by_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NEURAL_ARCH_CACHE", "0")
    c = ObjectCache(tmp_path)
    assert c.put(PARTS, b"obj") is False and c.get(PARTS) is None
    assert "disabled" in c.explain_miss(PARTS)


def test_default_cache_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NEURAL_ARCH_CACHE_DIR", str(tmp_path / "a"))
    assert cache_mod.default_cache().directory == str(tmp_path / "a")
    assert cache_mod.default_cache() is cache_mod.default_cache()
    monkeypatch.setenv("NEURAL_ARCH_CACHE_DIR", str(tmp_path / "b"))
    assert cache_mod.default_cache().directory == str(tmp_path / "b")


def _gemm_cases():
    import numpy as np
    from neural_arch.compiler import functional as F
    from neural_arch.compiler import tensor, trace
    from neural_arch.tools.bench.train import bench_step_graph
    g, _, opts = bench_step_graph("tiny")
    yield "gpt2 tiny step", g, opts
    a, b = tensor(np.ones((8, 16, 32), np.float32)), tensor(np.ones((32, 24), np.float32))
    yield "batched", trace(lambda a, b: F.tanh(a @ b), a, b), {}
    v, w = tensor(np.ones((1, 64), np.float64)), tensor(np.ones((64, 64), np.float64))
    yield "row vector", trace(lambda v, w: v @ w, v, w), {}
    x, y = tensor(np.ones((256, 128), np.float64)), tensor(np.ones((128, 64), np.float64))
    yield "one big product", trace(lambda x, y: (x @ y).sum(), x, y), {}
    yield "serial", trace(lambda x, y: (x @ y).sum(), x, y), {"serial": True}


def test_the_gemms_compiled_in_the_background_are_those_the_program_calls():
    """``predicted_gemms`` (the shared GEMMs a Program starts compiling on a helper thread
    while it emits its IR) names exactly the ones the built kernels call: a wrong guess would
    compile a GEMM for nothing, or leave the needed one to the critical path."""
    from neural_arch.runtime.program import Program, predicted_gemms
    for what, g, opts in _gemm_cases():
        prog = Program(g, options=opts)
        called = sorted({(dt, threads > 1) for k in prog.module.kernels for _, dt, threads in k.externals})
        assert predicted_gemms(g, opts) == called, what
        assert predicted_gemms(prog.graph, opts) == called, what


def test_a_gemm_that_fails_on_the_helper_thread_fails_the_program(monkeypatch, tmp_path):
    """The shared GEMM compiled in the background: its error is raised by the Program that
    needs it (in the caller's thread), not lost with the helper thread."""
    import numpy as np
    from neural_arch.compiler import functional as F
    from neural_arch.compiler import tensor, trace
    from neural_arch.compiler.codegen import gemm
    from neural_arch.runtime import program
    monkeypatch.setenv("NEURAL_ARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(program, "_shared", {})  # no GEMM installed yet in this process
    monkeypatch.setattr(program, "_gemm_failures", {})
    calls = []

    def broken(*args, **kwargs):
        calls.append(args[1])
        raise RuntimeError("the GEMM's IR could not be made")
    monkeypatch.setattr(gemm, "emit_gemm", broken)
    program.clear_memory_cache()
    x, w = tensor(np.ones((64, 48), np.float32)), tensor(np.ones((48, 40), np.float32))
    g = trace(lambda x, w: F.tanh(x @ w), x, w)
    with pytest.raises(RuntimeError, match="the GEMM's IR could not be made"):
        program.Program(g, options={"module_cache": False})
    program._join_gemm_helpers()
    assert calls, "no GEMM was compiled"
    program.clear_memory_cache()


def test_corrupt_key_parts_are_caught_and_clear_removes_older_formats(cache):
    """The key parts stored in an entry carry their own sha256: an entry whose parts were
    damaged is not listed (explain_miss and entries read them); the payload still loads
    (it has its own check).  clear() also removes the directories of older formats."""
    assert cache.put(PARTS, b"payload")
    (path, _), = list(cache.entries())
    data = bytearray(open(path, "rb").read())
    at = data.index(b'"toolchain"')
    data[at + 1] ^= 0x01
    open(path, "wb").write(bytes(data))
    assert list(cache.entries()) == [] and cache.get(PARTS) == b"payload"
    old = os.path.join(cache.directory, "v1", "ab")
    os.makedirs(old)
    open(os.path.join(old, "x.obj"), "wb").write(b"old")
    cache.clear()
    assert not os.path.exists(os.path.join(cache.directory, "v1")) and not os.path.exists(cache.root)

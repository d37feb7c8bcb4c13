"""The thinnest practical llvmlite driver: host target machine, O3 through the new pass
builder, MCJIT loading, and text views of the IR and assembly.

CPU features: the host's, minus AVX-512 unless NEURAL_ARCH_ALLOW_AVX512=1.  Our machines
are AVX2+FMA; some report AVX-512, and code tuned and benchmarked on one must run the same
on the other.  The features string is part of every cache key.
"""
from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from functools import lru_cache

import llvmlite
import llvmlite.binding as llvm

_lock = threading.Lock()


@lru_cache(maxsize=None)
def _init() -> None:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.initialize_native_asmparser()


def cpu_name() -> str:
    _init()
    return os.environ.get("NEURAL_ARCH_CPU", llvm.get_host_cpu_name())


@lru_cache(maxsize=None)
def cpu_features() -> str:
    _init()
    override = os.environ.get("NEURAL_ARCH_CPU_FEATURES")
    if override is not None:
        return override
    feats = llvm.get_host_cpu_features()
    if os.environ.get("NEURAL_ARCH_ALLOW_AVX512") != "1":
        for k in list(feats.keys()):
            if k.startswith("avx512") or k.startswith("avx10") or k.startswith("amx"):
                feats[k] = False
    return feats.flatten()


def _new_target_machine() -> "llvm.TargetMachine":
    _init()
    target = llvm.Target.from_triple(llvm.get_process_triple())
    return target.create_target_machine(cpu=cpu_name(), features=cpu_features(), opt=3,
                                        reloc="default", codemodel="jitdefault")


@lru_cache(maxsize=None)
def target_machine() -> "llvm.TargetMachine":
    """The shared target machine for optimising and emitting code (never given to an engine)."""
    return _new_target_machine()


def is_x86() -> bool:
    """Whether we generate x86 code (x86 intrinsics such as the MXCSR's and ``pause``)."""
    return target_machine().triple.startswith(("x86_64", "i386", "i686"))


def toolchain_id() -> str:
    """Identifies everything outside our IR that changes the machine code (for cache keys)."""
    v = ".".join(map(str, llvm.llvm_version_info))
    return f"llvmlite={llvmlite.__version__};llvm={v};cpu={cpu_name()};features={cpu_features()}"


def optimize(llvm_ir: str, name: str = "module") -> "llvm.ModuleRef":
    """Parse, verify and optimise (O3, loop + SLP vectorisation) a module of LLVM IR text."""
    _init()
    mod = llvm.parse_assembly(llvm_ir)
    mod.name = name
    mod.verify()
    tm = target_machine()
    mod.triple = tm.triple
    mod.data_layout = str(tm.target_data)
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pto.loop_unrolling = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return mod


def emit_object(mod: "llvm.ModuleRef") -> bytes:
    return target_machine().emit_object(mod)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def compile_objects(texts: list[str], name: str = "module", workers: int | None = None) -> list[bytes]:
    """Object code of several modules of LLVM IR text, optimised and compiled in parallel
    by ``workers`` processes (default: one per available core): this one and forked
    children (llvmlite serialises every call into LLVM behind one lock, so threads would
    take turns).  The workers take parts from one queue in the order given, each the next
    part when it is free, so a part that takes longer than its size suggested, or a worker
    slowed by something else (this process's other threads compiling a GEMM), does not
    leave the other idle.  A part whose worker cannot be forked, or dies without
    answering, is compiled here; an LLVM error in a child is raised here with its message."""
    def one(k: int) -> bytes:
        return emit_object(optimize(texts[k], f"{name}.{k}"))
    workers = min(len(texts), workers or available_cores())
    if workers <= 1 or not hasattr(os, "fork"):
        return [one(k) for k in range(len(texts))]
    _init()
    target_machine()
    # the queue: every part's index, 4 bytes each, in a pipe whose write end is closed
    # before any worker starts; a read of 4 bytes takes one index whole (pipe reads are
    # atomic), and reads find the end of the queue once it is empty
    queue = b"".join(k.to_bytes(4, "little") for k in range(len(texts)))
    queue_r, queue_w = os.pipe()
    try:
        os.set_blocking(queue_w, False)
        written = os.write(queue_w, queue)
    except OSError:
        written = 0
    os.close(queue_w)
    if written != len(queue):  # more parts than the pipe holds: every part here
        os.close(queue_r)
        return [one(k) for k in range(len(texts))]

    def claim():
        data = os.read(queue_r, 4)
        return int.from_bytes(data, "little") if len(data) == 4 else None
    children = []
    # hold LLVM's lock across fork: no other thread is inside LLVM when the child starts
    with getattr(llvm.ffi.lib, "_lock", _lock):
        for _ in range(workers - 1):
            try:
                r, w = os.pipe()
            except OSError:
                break
            try:
                pid = os.fork()
            except OSError:  # no processes to spare: the rest compile here
                os.close(r)
                os.close(w)
                break
            if pid == 0:  # a child: compile parts until the queue is empty, answer each, leave without cleanup
                os._exit(_serve(claim, one, r, w))
            os.close(w)
            children.append((pid, r))
    answers: dict = {}
    readers = [threading.Thread(target=lambda r=r: answers.__setitem__(r, _read_all(r)), daemon=True)
               for _, r in children]
    for t in readers:  # children's answers are read while this process compiles (a child
        t.start()       # blocked writing a full pipe would take no more parts)
    objs: dict = {}
    errors: list = []
    try:
        while (k := claim()) is not None:
            try:
                objs[k] = one(k)
            except Exception as e:  # raised below with the children's errors
                errors.append(f"{type(e).__name__}: {e}")
                break
    finally:
        while claim() is not None:  # after an error: the children stop after their part
            pass
        os.close(queue_r)
        for t in readers:
            t.join()
        for pid, _ in children:
            os.waitpid(pid, 0)
    for _, r in children:
        for k, ok, payload in _messages(answers.get(r, b"")):
            if ok:
                objs[k] = payload
            else:
                errors.append(payload.decode(errors="replace"))
    if errors:
        raise RuntimeError(f"LLVM failed to compile {name}: " + "; ".join(errors))
    return [objs[k] if k in objs else one(k) for k in range(len(texts))]


def _serve(claim, one, r: int, w: int) -> int:
    """A compiling child's work: each part it claims answered as (8-byte length, 4-byte
    index, status byte, object or error message); returns its exit status."""
    try:
        os.close(r)
        while (k := claim()) is not None:
            try:
                data = b"\0" + one(k)
            except BaseException as e:  # reported to the parent, raised there
                data = b"\1" + f"{type(e).__name__}: {e}".encode()
            data = k.to_bytes(4, "little") + data
            view = memoryview(len(data).to_bytes(8, "little") + data)
            while view:
                view = view[os.write(w, view):]
        return 0
    except BaseException:
        return 1


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _messages(data: bytes):
    """(index, compiled?, payload) of each whole answer in a child's output (a cut-off last
    one, from a child that died writing it, is no answer)."""
    at = 0
    while at + 13 <= len(data):
        size = int.from_bytes(data[at:at + 8], "little")
        if size < 5 or at + 8 + size > len(data):
            return
        k = int.from_bytes(data[at + 8:at + 12], "little")
        yield k, data[at + 12:at + 13] == b"\0", data[at + 13:at + 8 + size]
        at += 8 + size


def emit_assembly(mod: "llvm.ModuleRef") -> str:
    return target_machine().emit_assembly(mod)


@dataclass
class Loaded:
    """A module loaded into its own MCJIT engine; keep it alive while its functions are used."""

    engine: object
    module: object

    def address(self, symbol: str) -> int:
        addr = self.engine.get_function_address(symbol)
        if not addr:
            raise KeyError(f"symbol {symbol!r} not found in the compiled module")
        return addr

    def function(self, symbol: str, restype, *argtypes):
        return ctypes.CFUNCTYPE(restype, *argtypes)(self.address(symbol))


def load(mod: "llvm.ModuleRef", obj: bytes | list | None = None) -> Loaded:
    """JIT-load an optimised module; with ``obj`` (cached object code, or a list of objects
    whose symbols resolve against each other) skip code generation."""
    _init()
    with _lock:
        holder = llvm.parse_assembly("")  # an empty module owns the engine
        holder.triple = target_machine().triple
        # an MCJIT engine takes ownership of its target machine (and frees it with the
        # engine), so each engine gets its own, never the shared cached one
        engine = llvm.create_mcjit_compiler(holder, _new_target_machine())
        if obj is not None:
            for o in ([obj] if isinstance(obj, bytes) else obj):
                engine.add_object_file(llvm.ObjectFileRef.from_data(o))
        else:
            engine.add_module(mod)
        engine.finalize_object()
        engine.run_static_constructors()
    return Loaded(engine, mod)

"""The pass manager: a named pipeline of graph -> graph passes with instruments.

Instruments (from the API or environment variables):
  * verify after each pass           verify=True            NEURAL_ARCH_VERIFY=1
  * print the IR after each pass     print_ir="all"|"changed" NEURAL_ARCH_PRINT_IR=all|changed
  * time each pass                   time_passes=True       NEURAL_ARCH_TIME_PASSES=1
    (a Program also prints its fusion + LLVM IR emission time and LLVM's own compile time)
  * dump every stage to a directory  dump_dir="dir"         NEURAL_ARCH_DUMP=dir
    (000_trace.txt, 001_<pass>.txt, ...)
On any failure inside a pass, a reproducer (the pass's input IR and the pipeline) is written
to a file whose path the raised PassError gives.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, TextIO

from ..ir import Graph
from ..verify import VerifyError, verify


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph], Graph]
    doc: str = ""
    optional: bool = True  # optional passes may be dropped or reordered without changing results


PASSES: dict[str, Pass] = {}


def register_pass(name: str, doc: str = "", optional: bool = True):
    def deco(fn):
        if name in PASSES:
            raise ValueError(f"pass {name!r} registered twice")
        lines = (fn.__doc__ or "").strip().splitlines()
        PASSES[name] = Pass(name, fn, doc or (lines[0] if lines else name), optional)
        return fn
    return deco


class PassError(RuntimeError):
    def __init__(self, message: str, reproducer: str | None):
        super().__init__(message)
        self.reproducer = reproducer


@dataclass
class PassRecord:
    name: str
    seconds: float
    changed: bool
    nodes_before: int
    nodes_after: int


@dataclass
class PipelineResult:
    graph: Graph
    records: list[PassRecord] = field(default_factory=list)
    stages: list[tuple[str, Graph]] = field(default_factory=list)  # (stage name, graph after it)

    def timing_table(self) -> str:
        lines = [f"{'pass':<24}{'ms':>9}{'nodes':>12}  changed"]
        for r in self.records:
            lines.append(f"{r.name:<24}{r.seconds * 1e3:9.2f}{r.nodes_before:>6}->{r.nodes_after:<5}  "
                         f"{'yes' if r.changed else 'no'}")
        return "\n".join(lines)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


def instruments_requested() -> bool:
    """Whether the environment asks for any instrument (verify, print, time, dump): then a
    compile runs its passes to show them, never takes their result from a cache."""
    return any(_env_flag(v) for v in ("NEURAL_ARCH_VERIFY", "NEURAL_ARCH_TIME_PASSES")) or \
        bool(os.environ.get("NEURAL_ARCH_PRINT_IR") or os.environ.get("NEURAL_ARCH_DUMP"))


def resolve_pipeline(pipeline: Sequence[str | Pass] | None, disable: Iterable[str] = ()) -> list[Pass]:
    from . import DEFAULT_PIPELINE  # noqa: F401  (registers the passes)
    names = DEFAULT_PIPELINE if pipeline is None else pipeline
    disable = set(disable)
    unknown = [d for d in disable if d not in PASSES]
    if unknown:
        raise KeyError(f"unknown pass(es) to disable: {', '.join(unknown)}; known: {', '.join(sorted(PASSES))}")
    out = []
    for p in names:
        if isinstance(p, Pass):
            out.append(p)
            continue
        if p not in PASSES:
            raise KeyError(f"unknown pass {p!r}; known passes: {', '.join(sorted(PASSES))}")
        if p not in disable:
            out.append(PASSES[p])
    return out


def _write_reproducer(graph: Graph, passes: list[Pass], failed: str, error: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f"narch_repro_{failed}_", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"# neural_arch pass reproducer: pass {failed!r} failed\n")
        f.write(f"# pipeline: {' '.join(p.name for p in passes)}\n")
        for line in error.rstrip().splitlines():
            f.write(f"# {line}\n")
        f.write(graph.to_text())
    return path


def run_pipeline(graph: Graph, pipeline: Sequence[str | Pass] | None = None, *, disable: Iterable[str] = (),
                 verify_each: bool | None = None, print_ir: str | None = None, time_passes: bool | None = None,
                 dump_dir: str | None = None, stream: TextIO | None = None) -> PipelineResult:
    passes = resolve_pipeline(pipeline, disable)
    verify_each = _env_flag("NEURAL_ARCH_VERIFY") if verify_each is None else verify_each
    print_ir = print_ir or os.environ.get("NEURAL_ARCH_PRINT_IR") or None
    time_passes = _env_flag("NEURAL_ARCH_TIME_PASSES") if time_passes is None else time_passes
    dump_dir = dump_dir or os.environ.get("NEURAL_ARCH_DUMP") or None
    stream = stream or sys.stderr
    if print_ir not in (None, "all", "changed"):
        raise ValueError(f"print_ir must be 'all' or 'changed', got {print_ir!r}")
    result = PipelineResult(graph, stages=[("trace", graph)])
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, "000_trace.txt"), "w") as f:
            f.write(graph.to_text())
    if verify_each:
        verify(graph)
    for k, p in enumerate(passes, 1):
        start = time.perf_counter()
        try:
            new = p.run(graph)
            if verify_each:
                verify(new)
        except Exception as e:  # any failure: write a reproducer and say where it is
            detail = "".join(traceback.format_exception_only(type(e), e))
            path = _write_reproducer(graph, passes, p.name, detail)
            kind = "produced an invalid graph" if isinstance(e, VerifyError) else "failed"
            raise PassError(f"pass {p.name!r} {kind}: {detail.strip()}\nreproducer: {path}", path) from e
        seconds = time.perf_counter() - start
        changed = new is not graph and new != graph
        result.records.append(PassRecord(p.name, seconds, changed, len(graph.nodes), len(new.nodes)))
        result.stages.append((p.name, new))
        if print_ir == "all" or (print_ir == "changed" and changed):
            stream.write(f"// ----- IR after {p.name}{'' if changed else ' (unchanged)'} -----\n{new.to_text()}")
        if dump_dir:
            with open(os.path.join(dump_dir, f"{k:03d}_{p.name}.txt"), "w") as f:
                f.write(new.to_text())
        graph = new
    result.graph = graph
    if time_passes:
        stream.write(result.timing_table() + "\n")
    return result

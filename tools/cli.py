"""The `narch` command: demo, train, bench, dump, difftest, profile."""
from __future__ import annotations

import argparse
import sys



class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help unless its text already names its default (or
    it has none to name): ``narch train gpt2 --help`` said "(default 16) (default: 16)"."""

    def _get_help_string(self, action):
        if "default" in action.help or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            # (by identity: a default of 0 equals False, and is shown)
            return action.help
        return super()._get_help_string(action)

def cmd_demo(args) -> int:
    from neural_arch.tools.demo import main
    if args.steps < 0:
        print(f"narch demo: --steps must be 0 or more, got {args.steps}", file=sys.stderr)
        return 2
    main(steps=args.steps, backend=args.backend)
    return 0


# `narch train MODEL`: each trainer module has add_arguments(parser) and run(args) -> dict; the
# exit status is 0 when the run reached its goal (res["passed"], or for gpt2 val < baseline)
TRAINERS = {
    "gpt2": ("neural_arch.tools.train", "a character-level GPT-2 on the stdlib sources",
             "narch train gpt2 --steps 600 --out runs/gpt2-char"),
    "vit": ("neural_arch.tools.train_vit", "a small ViT on scikit-learn's 8x8 handwritten digits",
            "narch train vit --steps 1500 --out runs/vit-digits"),
    "clip": ("neural_arch.tools.train_clip", "a tiny CLIP on the digits and captions; zero-shot accuracy",
             "narch train clip --steps 1500 --out runs/clip-digits"),
    "bert": ("neural_arch.tools.train_bert", "masked-LM pretraining of a small character-level BERT on the stdlib",
             "narch train bert --steps 1200 --out runs/bert-mlm"),
}


def cmd_train(args) -> int:
    import importlib
    if args.model is None:  # bare `narch train` trains the GPT-2 demo with its defaults
        args = build_parser().parse_args(["train", "gpt2"])
    res = importlib.import_module(TRAINERS[args.model][0]).run(args)
    ok = res["passed"] if "passed" in res else res["val"] < res["baseline"]
    return 0 if ok else 1


def cmd_embed(args) -> int:
    from neural_arch.tools.embed import run
    if args.values < 0:
        print(f"narch embed: --values must be 0 or more, got {args.values}", file=sys.stderr)
        return 2
    run(args.sentences, values=args.values, model_dir=args.model_dir, backend=args.backend)
    return 0


def cmd_bench(args) -> int:
    suites = {"kernels": "neural_arch.tools.bench.kernels", "ops": "neural_arch.tools.bench.ops",
              "train": "neural_arch.tools.bench.train", "models": "neural_arch.tools.bench.models"}
    if args.suite not in suites:
        raise SystemExit(f"narch bench: unknown suite {args.suite!r} (available: {', '.join(suites)})")
    import importlib
    return importlib.import_module(suites[args.suite]).main(args.rest)


def cmd_dump(args) -> int:
    from neural_arch.tools import dump
    try:
        # DOT and SVG draw the final graph with its kernels as clusters unless a stage is named
        stages = args.stage or (["final"] if args.format in ("dot", "svg") else ["trace"])
        dump.expand_stages(stages)  # an unknown stage is reported before compiling anything
        if args.format == "svg" and not dump.have_dot():
            raise dump.DumpError(dump.DOT_MISSING)
        d = dump.collect(args.target, train=args.train, shapes=args.shape, grad=args.grad)
        kernel = d.select_kernel(args.kernel) if args.kernel is not None else None
        text = dump.render(d, stages, args.format, kernel=kernel, layout=args.layout)
    except dump.DumpError as e:
        if args.debug:
            raise
        print(f"narch dump: {e}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output} ({len(text):,} bytes)")
    else:
        sys.stdout.write(text)
    return 0


def cmd_difftest(args) -> int:
    from neural_arch.tools import difftest
    if args.replay:
        return difftest.replay(args.replay)
    for flag, value, least in (("--count", args.count, 1), ("--batch", args.batch, 0)):
        if value is not None and value < least:
            print(f"narch difftest: {flag} must be at least {least}, got {value}", file=sys.stderr)
            return 2
    suites = difftest.SUITES if args.suite == "all" else (args.suite,)
    only = [p for o in args.only for p in o.split(",") if p] if args.only else None
    rc, _ = difftest.run(suites, seed=args.seed, count=args.count, only=only, tolerance=args.tolerance,
                         out_dir=args.out, minimize_failures=not args.no_minimize, quiet=args.quiet,
                         use_torch=not args.no_torch, batch=args.batch)
    return rc


def cmd_profile(args) -> int:
    from neural_arch.tools import dump, profile
    try:
        t = dump.resolve_target(args.target, train=args.train, shapes=args.shape)
    except dump.DumpError as e:
        if args.debug:
            raise
        print(f"narch profile: {e}", file=sys.stderr)
        return 2
    for flag, value, least in (("--iters", args.iters, 1), ("--warmup", args.warmup, 0), ("--top", args.top, 1)):
        if value is not None and value < least:
            print(f"narch profile: {flag} must be at least {least}", file=sys.stderr)
            return 2
    prof = profile.profile_program(t.graph, t.inputs, t.label, iters=args.iters, warmup=args.warmup,
                                   options=t.options)
    print(prof.table(top=args.top))
    if args.trace:
        profile.write_trace(prof, args.trace)
        print(f"wrote {args.trace}: a Chrome trace ({len(prof.events)} events); open it in https://ui.perfetto.dev "
              f"or chrome://tracing")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="narch", description="neural_arch: a small deep-learning compiler.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  narch demo\n  narch dump gpt2-tiny --format html -o gpt2.html\n"
                                       "  narch difftest all\n  narch profile gpt2-tiny --train --trace t.json\n"
                                       "  narch dump model.py:loss --shape 4x8 --shape 8x3\n"
                                       "(narch COMMAND --help lists every option with examples)\n")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="trace, differentiate and train a small MLP, printing its IR",
                       description="example: narch demo --steps 400")
    d.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    d.add_argument("--backend", choices=["auto", "llvm", "interpreter"], default="auto",
                   help="how the training step runs (default: LLVM when available)")
    d.set_defaults(func=cmd_demo)
    t = sub.add_parser("train", help=f"train a model ({', '.join(TRAINERS)}), compiled",
                       description="examples:\n" + "\n".join(f"  {ex}" for _, _, ex in TRAINERS.values()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    models = t.add_subparsers(dest="model", metavar="MODEL", title="models (default: gpt2)")
    import importlib
    for name, (module, doc, example) in TRAINERS.items():
        m = models.add_parser(name, help=doc, description=f"{doc}; example: {example}",
                              formatter_class=DefaultsHelpFormatter)
        importlib.import_module(module).add_arguments(m)
    t.set_defaults(func=cmd_train, model=None)
    e = sub.add_parser("embed", help="sentence embeddings and cosine similarities with the pretrained all-MiniLM-L6-v2",
                       description='example: narch embed "A man is eating food." "A man eats bread."')
    from neural_arch.tools.embed import add_arguments as embed_arguments
    embed_arguments(e)
    e.set_defaults(func=cmd_embed)
    b = sub.add_parser("bench", help="benchmarks printed as ratios against peers measured in the same run",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="suites:\n"
                                   "  kernels  matmul and fused-epilogue GEMM vs NumPy and the FMA peak\n"
                                   "  ops      gelu(x*w+b), softmax, layer_norm, reductions vs NumPy and a copy;\n"
                                   "           compile times cold and cached\n"
                                   "  train    GPT-2 training steps vs PyTorch and our interpreter, an MLP,\n"
                                   "           and KV-cache generation\n"
                                   "  models   BERT (MiniLM size) inference, ViT and CLIP training steps vs transformers\n"
                                   "examples:\n"
                                   "  narch bench kernels --sizes 512 1024 --threads 2\n"
                                   "  narch bench ops --quick\n"
                                   "  narch bench train --only tiny,mlp --steps 20\n"
                                   "  narch bench train --no-interpreter --interleave 12   # ours and PyTorch take turns\n"
                                   "(run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE` for a fair NumPy)")
    b.add_argument("suite", help="kernels, ops, train or models")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of the suite (see narch bench SUITE --help)")
    b.set_defaults(func=cmd_bench)
    u = sub.add_parser("dump", help="every stage of compiling a program: IR, passes, kernels, memory, LLVM",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Dump a zoo model or your own function at any compilation stage.",
                       epilog="stages: trace, passes, pass:NAME, final, backward, fusion, kernels, memory, llvm,\n"
                              "        llvm-opt, asm, all (repeat --stage or separate with commas)\n"
                              "examples:\n"
                              "  narch dump gpt2-tiny                              # the traced IR (parses back)\n"
                              "  narch dump mlp --train --stage passes            # the IR after each pass, timed\n"
                              "  narch dump gpt2-tiny --stage fusion,memory       # kernels, decisions, buffers\n"
                              "  narch dump mlp --stage asm --kernel 1            # one kernel's assembly\n"
                              "  narch dump gpt2-tiny --format html -o gpt2.html  # the whole report, offline\n"
                              "  narch dump mlp --format svg -o mlp.svg           # needs graphviz\n"
                              "  narch dump model.py:loss --shape 4x8 --shape 8x3:float32 --grad")
    from neural_arch.tools.zoo import ZOO
    u.add_argument("target", help=f"a zoo model ({', '.join(ZOO)}), "
                                  "path/to/file.py:function, or bench:tiny|small|mlp (the training step "
                                  "`narch bench train` times, with AdamW)")
    u.add_argument("--train", action="store_true",
                   help="a zoo model's whole training step (forward, loss, backward, SGD update)")
    u.add_argument("--stage", action="append", default=None,
                   help="what to dump (default: trace; for dot/svg the final graph with its kernels as "
                        "clusters); repeatable, comma separated; see the list below")
    u.add_argument("--format", choices=["text", "json", "dot", "svg", "html"], default="text",
                   help="text: the IR's own parseable form (default); json: complete and machine-readable; "
                        "dot/svg: the graph with fused kernels as clusters; html: one self-contained report")
    u.add_argument("--kernel", help="for llvm/llvm-opt/asm (and the HTML report's initial choice): "
                                    "a kernel index or name, e.g. 3 or k3.add")
    u.add_argument("--layout", choices=["auto", "dot", "builtin"], default="auto",
                   help="how the HTML report lays out the graph (auto: Graphviz when installed)")
    u.add_argument("--shape", action="append", default=[],
                   help="for file.py:function: an example argument's shape, e.g. 4x8, 4x8:int64 or scalar "
                        "(repeat per argument)")
    u.add_argument("--grad", action="store_true",
                   help="for file.py:function: dump its gradient graph (w.r.t. every argument)")
    u.add_argument("-o", "--output", help="write to this file instead of stdout")
    u.set_defaults(func=cmd_dump)
    f = sub.add_parser("difftest", help="differential tests: compiled vs interpreter (and torch), as a table",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Compare compiled results against the NumPy interpreter (and torch) and print a "
                                   "table: max abs/rel error, tolerance, pass/fail. Exit status 1 on any failure; "
                                   "each failure writes a reproducer directory and a replay command.",
                       epilog="suites:\n"
                              "  ops     every op in the registry, forward and backward (+ torch where installed)\n"
                              "  models  each zoo model, forward and training step\n"
                              "  random  random valid graphs, forward and gradients (failures are minimized)\n"
                              "  passes  random subsets and orders of the optional passes vs the unoptimized graph\n"
                              "examples:\n"
                              "  narch difftest all\n"
                              "  narch difftest ops --only 'exp*,matmul*' --count 5\n"
                              "  narch difftest random --seed 7 --count 10000 --quiet --batch 500\n"
                              "  narch difftest random --seed 3 --count 1 --tolerance 0   # fails (FMA rounding): reproducer + minimizer\n"
                              "  narch difftest --replay narch_difftest/random-graph0-compiled")
    f.add_argument("suite", nargs="?", default="all", choices=["ops", "models", "random", "passes", "all"],
                   help="which suite (default: all)")
    f.add_argument("--seed", type=int, default=0, help="seed of the generated cases (default 0)")
    f.add_argument("--count", type=int, default=None,
                   help="cases per op (ops, default 3) or graphs (random/passes, default 20); models: ignored")
    f.add_argument("--only", action="append", default=None,
                   help="only cases whose name matches one of these globs/substrings, e.g. 'tanh*' or gpt2 "
                        "(repeatable, comma separated)")
    f.add_argument("--tolerance", type=float, default=None,
                   help="use this rtol and atol for every case instead of the per-op/suite tolerances, and "
                        "compare strictly (no settling a miss against the float64 interpreter)")
    f.add_argument("--out", default="narch_difftest", help="where reproducers go (default ./narch_difftest)")
    f.add_argument("--replay", metavar="DIR", help="re-run one reproducer directory; exit 1 if it still fails")
    f.add_argument("--no-minimize", action="store_true", help="do not shrink failing random graphs")
    f.add_argument("--no-torch", action="store_true", help="skip the comparisons against torch")
    f.add_argument("--quiet", action="store_true", help="print only failures and the summary (long runs)")
    f.add_argument("--batch", type=int, default=0, metavar="N",
                   help="run the cases in worker processes of N cases each: a case that crashes the process is "
                        "reported (CRASH, with its reproducer) and the run goes on (long runs: --batch 500)")
    f.set_defaults(func=cmd_difftest)
    r = sub.add_parser("profile", help="run a compiled program: per-kernel time, share, GFLOP/s or GB/s, overhead",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run a zoo model (or your function) compiled with per-kernel timers and print "
                                   "where the time goes; optionally write a Chrome trace Perfetto opens.",
                       epilog="examples:\n"
                              "  narch profile gpt2-tiny\n"
                              "  narch profile gpt2-tiny --train --iters 100 --trace gpt2-train.json\n"
                              "  narch profile model.py:loss --shape 64x256 --shape 256x256 --top 5\n"
                              "  narch profile bench:mlp --iters 2000 --warmup 200   # the benchmark's own step")
    r.add_argument("target", help=f"a zoo model ({', '.join(ZOO)}), path/to/file.py:function, or "
                                  "bench:tiny|small|mlp (the training step `narch bench train` times)")
    r.add_argument("--train", action="store_true", help="a zoo model's whole training step")
    r.add_argument("--iters", type=int, default=50, help="timed calls (default 50)")
    r.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    r.add_argument("--top", type=int, default=None, help="show only the N slowest kernels")
    r.add_argument("--trace", metavar="OUT.json", help="write a Chrome trace (traceEvents, ph X) of every call")
    r.add_argument("--shape", action="append", default=[],
                   help="for file.py:function: an example argument's shape, e.g. 4x8 or 4x8:int64")
    r.set_defaults(func=cmd_profile)
    # `--debug` after the command too (`narch dump x --debug`), as the one-line errors suggest
    for cmd in list(sub.choices.values()) + list(models.choices.values()):
        if cmd is not b:  # bench passes everything after its suite to the suite
            cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show full tracebacks on errors")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SystemExit:
        raise
    except Exception as e:  # one clear line unless --debug
        if args.debug:
            raise
        print(f"narch {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

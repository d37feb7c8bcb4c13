"""The `narch` command: demo, dump (and, as they land, difftest, bench, profile)."""
from __future__ import annotations

import argparse
import sys


def cmd_demo(args) -> int:
    from neural_arch.tools.demo import main
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
}


def cmd_train(args) -> int:
    import importlib
    if args.model is None:  # bare `narch train` trains the GPT-2 demo with its defaults
        args = build_parser().parse_args(["train", "gpt2"])
    res = importlib.import_module(TRAINERS[args.model][0]).run(args)
    ok = res["passed"] if "passed" in res else res["val"] < res["baseline"]
    return 0 if ok else 1


def cmd_bench(args) -> int:
    suites = {"kernels": "neural_arch.tools.bench.kernels"}
    if args.suite not in suites:
        raise SystemExit(f"narch bench: unknown suite {args.suite!r} (available: {', '.join(suites)})")
    import importlib
    return importlib.import_module(suites[args.suite]).main(args.rest)


def cmd_dump(args) -> int:
    from neural_arch.tools import dump
    try:
        stages = dump.expand_stages(args.stage)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="narch", description="neural_arch: a small deep-learning compiler.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  narch demo\n  narch dump model.py:loss --shape 4x8 --shape 8x3\n")
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
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        importlib.import_module(module).add_arguments(m)
    t.set_defaults(func=cmd_train, model=None)
    b = sub.add_parser("bench", help="benchmarks printed as ratios against peers measured in the same run",
                       description="example: narch bench kernels --sizes 512 1024 --threads 2\n"
                                   "(run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE` for a fair NumPy)")
    b.add_argument("suite", help="kernels")
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
    u.add_argument("target", help="a zoo model (mlp, gpt2-tiny, ...; see `narch difftest models --help`) "
                                  "or path/to/file.py:function")
    u.add_argument("--train", action="store_true",
                   help="a zoo model's whole training step (forward, loss, backward, SGD update)")
    u.add_argument("--stage", action="append", default=None,
                   help="what to dump (default: trace); repeatable, comma separated; see the list below")
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

"""The `hf-kvplug` command (also `python -m hf_kvplug`): demo, plan, bench and quality subcommands."""

from __future__ import annotations

import argparse
import sys

from .tools import bench, cases, demo, models, plan, quality, shapes
from .tools.plan import plan_numbers  # noqa: F401  (the plan's arithmetic, for callers of the CLI module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-kvplug",
        description="A paged (optionally INT8) KV cache with fused decode attention for HF generate().")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,plan,bench,quality}")
    demo.add_arguments(sub.add_parser(
        "demo", help="stock vs plugged generate on pylm, a small Llama trained on the Python stdlib (or a local "
                     "checkpoint): completions and timings",
        description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    plan.add_arguments(sub.add_parser(
        "plan", help="KV bytes per token and in total (model dtype, INT8, INT4), weights, and how many tokens fit",
        description=plan.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    bench.add_arguments(sub.add_parser(
        "bench", help="sweep providers x batch x context and write CSV / JSON / markdown / PNG",
        description="Sweep providers x batch x context with generate() and write CSV / JSON / markdown / PNG.\n"
                    + (cases.__doc__ or "").split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter))
    quality.add_arguments(sub.add_parser(
        "quality", help="accuracy of each KV format against the model-dtype cache on held-out text: NLL, top-1, "
                        "logit error, greedy agreement; CSV / markdown / PNG",
        description=quality.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    try:
        if args.command == "demo":
            return demo.run(args)
        if args.command == "plan":
            return plan.run(args)
        if args.command == "quality":
            quality.run(args)
            return 0
        bench.run(args)
    except (shapes.UnknownModelError, models.ModelFileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

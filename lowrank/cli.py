"""The `lowrank` command line (`python -m lowrank` too). Thin: every command calls the library."""

import argparse


def _numpy_demo(args: argparse.Namespace) -> int:
    from lowrank.numpy.demo import format_report, run_demo

    print(format_report(run_demo(seed=args.seed)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    numpy_demo = commands.add_parser(
        "numpy-demo",
        help="NumPy only: adapt a tiny pre-trained MLP to a shifted task, full fine-tuning vs LoRA",
    )
    numpy_demo.add_argument("--seed", type=int, default=0)
    numpy_demo.set_defaults(run=_numpy_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)

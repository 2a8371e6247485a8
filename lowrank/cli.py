"""The `lowrank` command line (`python -m lowrank` too). Thin: every command calls the library."""

# argparse only: each command's job lives in lowrank.commands and is imported when the command
# runs, so `lowrank numpy-demo` never imports torch.

import argparse
import importlib
from collections.abc import Callable


def _job(module: str) -> Callable[[argparse.Namespace], int]:
    """`main(args)` of `lowrank.commands.<module>`, imported only when the command runs."""

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"lowrank.commands.{module}").main(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    numpy_demo = commands.add_parser(
        "numpy-demo",
        help="NumPy only: adapt a tiny pre-trained MLP to a shifted task, full fine-tuning vs LoRA",
    )
    numpy_demo.add_argument("--seed", type=int, default=0)
    numpy_demo.set_defaults(run=_job("numpy_demo"))

    demo = commands.add_parser(
        "demo",
        help="fine-tune all-MiniLM-L6-v2 on VADER words: head only, full, LoRA, QLoRA; verify",
    )
    demo.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (for tests)")
    demo.add_argument("--out", default="lowrank-report", help="report folder")
    demo.set_defaults(run=_job("demo"))

    finetune = commands.add_parser(
        "finetune", help="fine-tune a Hugging Face model on your JSONL data (full, LoRA, QLoRA)"
    )
    finetune.add_argument("model", help="Hugging Face model name (cached) or local folder")
    finetune.add_argument(
        "data", help='JSONL: {"text"}, {"prompt", "completion"} or {"text", "label"} per line'
    )
    finetune.add_argument("--method", choices=["full", "lora", "qlora"], default="lora")
    finetune.add_argument("--r", type=int, default=8)
    finetune.add_argument("--alpha", type=float, default=16)
    finetune.add_argument("--targets", help="comma-separated layer names, or all-linear")
    finetune.add_argument("--epochs", type=int, default=1)
    finetune.add_argument("--batch-size", type=int, default=8)
    finetune.add_argument("--lr", type=float, help="default 2e-5 (full) or 2e-4 (adapters)")
    finetune.add_argument("--out", default="runs/finetune", help="output folder")
    finetune.set_defaults(run=_job("finetune"))

    estimate = commands.add_parser(
        "estimate", help="training memory from a Hugging Face config.json alone (no weights)"
    )
    estimate.add_argument("config", help="config.json or a model folder")
    estimate.add_argument("--method", choices=["full", "lora", "qlora"], default="qlora")
    estimate.add_argument("--batch-size", type=int, default=1)
    estimate.add_argument("--seq-len", type=int, default=512)
    estimate.add_argument("--r", type=int, default=8)
    estimate.add_argument("--targets", help="comma-separated layer names, or all-linear")
    estimate.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    estimate.add_argument("--gradient-checkpointing", action="store_true")
    estimate.set_defaults(run=_job("estimate"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)

"""The `lowrank` command line (`python -m lowrank` too). Thin: every command calls the library."""

# argparse only: each command's job lives in lowrank.commands and is imported when the command
# runs, so `lowrank numpy-demo` never imports torch.
#
# Errors: every user error is one line on stderr, `lowrank: error: ...`, and exit status 2.
# Arguments are checked here as they are parsed (the type functions below, with the words of
# `lowrank._validate`); what only the job can find out (a bad data file, a model folder that
# is not one) arrives as the library's expected errors, which `main` prints as one line. Any
# other exception is a bug and keeps its traceback.

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lowrank import __version__
from lowrank._validate import FLOAT_DTYPES, METHODS, check_int, check_positive_number

__all__ = ["build_parser", "main"]

PROG = "lowrank"

# What a job raises for a bad input: ValueError (also `_validate.ArgumentTypeError`,
# json.JSONDecodeError, UnicodeDecodeError), OSError (FileNotFoundError, PermissionError,
# IsADirectoryError, NotADirectoryError, a model that will not load) and ImportError (an
# optional package that is not installed). Not Exception: a bug must show its traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def _error_line(message: str) -> str:
    """The CLI's one error format: `lowrank: error: <message>` on one line."""
    return f"{PROG}: error: {' '.join(str(message).split())}"


def _describe(error: BaseException) -> str:
    """A user error in words: the message, or for an operating-system error its file and reason."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        return f"this command needs the {error.name!r} package: pip install 'lowrank[hf]'"
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        names = [error.filename] + ([error.filename2] if error.filename2 is not None else [])
        return f"{' -> '.join(map(str, names))}: {error.strerror}"
    return str(error) or type(error).__name__


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format (one line, no usage block) and defaults in --help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{_error_line(message)} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" after every option's help, except where the help text already
    says what the default means (a default of None: "decided by ..." reads better)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------- argument types


def _int_type(low: int, wanted: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            return check_int("value", int(text), low=low)
        except ValueError:  # not an integer, or out of range (ArgumentTypeError is one too)
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None

    parse.__name__ = wanted
    return parse


_positive_int = _int_type(1, "a positive integer")
_non_negative_int = _int_type(0, "a non-negative integer")


def _positive_number(text: str) -> float:
    """A finite number > 0: inf and nan are refused (alpha=inf trains to a loss of nan)."""
    try:
        return check_positive_number("value", float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}") from None


def _layer_names(text: str) -> list[str]:
    """Comma-separated layer names ("q_proj,v_proj"), or "all-linear"; no empty names."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer names or all-linear, got {text!r}"
        )
    return names


def _output_folder(text: str) -> str:
    """A folder that exists or can be made, and can be written to (checked before any work)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, got an empty path")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    existing = path
    while not existing.exists():  # the nearest ancestor that exists (".", "/" always do)
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot make {text}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write to {existing}: permission denied")
    return text


# ----------------------------------------------------------------------------- the parser


def _job(module: str) -> Callable[[argparse.Namespace], int]:
    """`main(args)` of `lowrank.commands.<module>`, imported only when the command runs."""

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"lowrank.commands.{module}").main(args)

    return run


_METHODS_HELP = "full: every weight; lora: adapters; qlora: adapters on a 4-bit (NF4) base"
_TARGETS_HELP = "comma-separated Hugging Face layer names, or all-linear (default: "


def _add_numpy_demo(commands) -> None:
    numpy_demo = commands.add_parser(
        "numpy-demo",
        help="NumPy only: adapt a tiny pre-trained MLP to a shifted task, full fine-tuning vs LoRA",
    )
    numpy_demo.add_argument("--seed", type=_non_negative_int, default=0, help="random seed")
    numpy_demo.set_defaults(run=_job("numpy_demo"))


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="fine-tune all-MiniLM-L6-v2 on VADER words: head only, full, LoRA, QLoRA; verify",
    )
    demo.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (for tests)")
    demo.add_argument("--out", type=_output_folder, default="lowrank-report", help="report folder")
    demo.set_defaults(run=_job("demo"))


def _add_finetune(commands) -> None:
    def fraction(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0  # refused below, with the text as given
        if not 0 <= value < 1:
            raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text!r}")
        return value

    finetune = commands.add_parser(
        "finetune", help="fine-tune a Hugging Face model on your JSONL data (full, LoRA, QLoRA)"
    )
    add = finetune.add_argument
    add("model", help="Hugging Face model name (cached) or local folder")
    add("data", help='JSONL: {"text"}, {"prompt", "completion"} or {"text", "label"} per line')
    add("--method", choices=METHODS, default="lora", help=_METHODS_HELP)
    add(
        "--r",
        "--lora-r",
        type=_positive_int,
        default=8,
        help="LoRA rank (under torchrun write --lora-r: torchrun takes --r for its --rdzv-*)",
    )
    add("--alpha", type=_positive_number, default=16.0, help="LoRA alpha (scale = alpha / r)")
    add("--dropout", type=fraction, default=0.0, help="dropout on the adapters' input")
    add(
        "--targets",
        type=_layer_names,
        help=_TARGETS_HELP + "the query and value projections for lora, all-linear for qlora)",
    )
    add("--epochs", type=_positive_int, default=1, help="passes over the data")
    add("--batch-size", type=_positive_int, default=8, help="examples per micro-batch")
    add(
        "--grad-accum-steps",
        type=_positive_int,
        default=1,
        help="micro-batches per optimizer step (a step sees batch-size x this many rows)",
    )
    add(
        "--lr",
        type=_positive_number,
        help="peak learning rate (default: 2e-5 for full, 2e-4 for lora and qlora)",
    )
    add(
        "--schedule",
        choices=("cosine", "linear", "constant"),
        default="cosine",
        help="learning rate after warmup: cosine or linear decay to 0, or constant",
    )
    add("--warmup-ratio", type=fraction, default=0.06, help="share of the steps spent warming up")
    add(
        "--warmup-steps",
        type=_non_negative_int,
        help="optimizer steps of warmup, instead of --warmup-ratio (default: the ratio)",
    )
    add(
        "--loraplus-ratio",
        type=_positive_number,
        help="LoRA+ (Hayou et al. 2024): train the B factors at this many times --lr, e.g. 16 "
        "(lora and qlora only; default: plain LoRA, one learning rate)",
    )
    add("--max-length", type=_positive_int, default=256, help="tokens kept per row")
    evaluation = finetune.add_mutually_exclusive_group()
    evaluation.add_argument(
        "--eval-split",
        type=fraction,
        default=0.0,
        help="share of the rows held out (seeded) and scored after each epoch: accuracy for "
        "labels, loss and perplexity for text; 0: no evaluation",
    )
    evaluation.add_argument(
        "--eval-file", help="a JSONL file of the same format to score instead (default: none)"
    )
    add(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="seeds the head and adapter initialisation, dropout, data order and split",
    )
    add(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="bfloat16 autocast (default: on with a CUDA GPU, off on a CPU; --bf16 without "
        "CUDA is refused: CPU bfloat16 autocast is slower than float32 on most CPUs)",
    )
    add(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each block's activations in the backward pass: less memory, about "
        "one more forward pass per step",
    )
    add(
        "--save-steps",
        type=_positive_int,
        help="write a resumable checkpoint to OUT/checkpoint-<step> every this many steps "
        "(default: none)",
    )
    add(
        "--resume",
        metavar="FOLDER",
        help="continue the run that wrote this checkpoint folder, with the same options "
        "(default: start afresh)",
    )
    add(
        "--strategy",
        dest="parallel",
        choices=("ddp", "fsdp"),
        help="under torchrun (several processes): ddp replicates the model and averages the "
        "adapters' gradients, fsdp shards every weight (no checkpoints); default: ddp",
    )
    add("--out", type=_output_folder, default="runs/finetune", help="output folder")
    finetune.set_defaults(run=_job("finetune"))


def _add_estimate(commands) -> None:
    from lowrank.memory import parse_gpu_memory  # framework-free: no torch at parse time

    def gpu_size(text: str) -> int:
        try:
            return parse_gpu_memory(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix("GPU memory ")) from None

    estimate = commands.add_parser(
        "estimate", help="training memory from a Hugging Face config.json alone (no weights)"
    )
    add = estimate.add_argument
    add("config", help="config.json or a model folder")
    add("--method", choices=METHODS, default="qlora", help=_METHODS_HELP)
    add("--batch-size", type=_positive_int, default=1, help="sequences per step")
    add("--seq-len", type=_positive_int, default=512, help="tokens per sequence")
    add("--r", type=_positive_int, default=8, help="LoRA rank")
    add(
        "--targets",
        type=_layer_names,
        help=_TARGETS_HELP + "the method's, as lowrank finetune uses: every linear layer for "
        "qlora, the query and value projections for lora)",
    )
    add(
        "--dtype",
        choices=FLOAT_DTYPES,
        default="bf16",
        help="storage of the activations and of the weights that are not 4-bit (with "
        "--measure, the model is built in it)",
    )
    add(
        "--gradient-checkpointing",
        action="store_true",
        help="keep one activation per layer, recompute the rest in the backward pass (the "
        "other setting's total is printed too)",
    )
    add(
        "--dora",
        action="store_true",
        help="DoRA adapters: a trained magnitude per output feature, two more fp32 tensors "
        "of each adapted layer's output width kept per token",
    )
    add(
        "--gpus",
        type=_positive_int,
        default=1,
        help="GPUs sharing each step (torchrun --nproc_per_node): --batch-size is split "
        "among them and the estimate is one GPU's",
    )
    add(
        "--strategy",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="with --gpus > 1: ddp keeps a replica on each GPU, fsdp shards parameters, "
        "gradients and AdamW state (default: ddp)",
    )
    add(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="where the step runs: it decides the attention kernel (on a CPU, attention "
        "dropout falls back to the unfused kernel that keeps seq x seq scores) and, with "
        "--measure, where the model is measured",
    )
    add(
        "--gpu",
        type=gpu_size,
        metavar="SIZE",
        help="also print the largest batch that fits a GPU of this size, e.g. 24GB or 80GB "
        "(GB = GiB: GPU memory comes in binary sizes, a 24 GB card holds 24 GiB; default: "
        "none, not asked)",
    )
    add(
        "--measure",
        action="store_true",
        help="also build the model from the config with random weights, train 2 steps in a "
        "fresh process on --device, and print the measured peak with an itemised receipt "
        "next to the estimate (small models; needs torch and transformers)",
    )
    estimate.set_defaults(run=_job("estimate"))


def _add_claims(commands) -> None:
    from lowrank.commands.claims import CLAIMS  # framework-free: no torch at parse time

    claims = commands.add_parser(
        "claims", help="one number of the LoRA or QLoRA papers, and what lowrank measures for it"
    )
    claims.add_argument("name", choices=list(CLAIMS), help="which claim (docs: Claims, checked)")
    claims.add_argument(
        "--smoke", action="store_true", help="small sizes, seconds (two-tasks, latency, nf4, bits)"
    )
    claims.set_defaults(run=_job("claims"))


_SOURCE_FORMATS = ("peft", "mlx-lm", "loralib")  # lowrank.torch.adapter_files.FORMATS
_CONVENTIONS = ("alpha/r", "alpha", "none")  # lowrank.torch.adapter_files.CONVENTIONS


def _add_source_options(add) -> None:
    """--from, --convention, --alpha, --base: how `inspect` and `convert` read an adapter."""
    add(
        "--from",
        dest="format",
        choices=_SOURCE_FORMATS,
        help="the adapter's format (default: detected from the files)",
    )
    add(
        "--convention",
        choices=_CONVENTIONS,
        help="for PEFT-layout files whose producer scaled differently: alpha (s = alpha, "
        "older tutorials) or none (s = 1) (default: PEFT's alpha/r, or alpha/sqrt(r) with "
        "use_rslora)",
    )
    add(
        "--alpha",
        type=_positive_number,
        help="lora_alpha of a loralib state dict, which does not store it (s = alpha / r; "
        "required for loralib; default: none)",
    )
    add(
        "--base",
        metavar="MODEL_OR_CONFIG",
        help="the model the adapter belongs to: a model folder or a bare config.json "
        "(default: none)",
    )


def _add_inspect(commands) -> None:
    def energy_share(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0  # refused below, with the text as given
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"must be a share in (0, 1], got {text!r}")
        return value

    inspect = commands.add_parser(
        "inspect",
        help="what is in a LoRA adapter (PEFT, mlx-lm, loralib): per-layer rank, scale, "
        "spectrum; with --base, coverage and what PEFT would skip",
    )
    add = inspect.add_argument
    add("adapter", help="adapter folder (PEFT, mlx-lm) or state dict file (loralib)")
    _add_source_options(add)
    add("--json", action="store_true", help="print the report as JSON")
    add(
        "--plot",
        metavar="FILE.png",
        help="also write the per-layer spectra to this PNG (default: no plot)",
    )
    add(
        "--energy",
        type=energy_share,
        default=0.9,
        help="share of ||s B A||_F^2 the energy rank keeps",
    )
    inspect.set_defaults(run=_job("inspect"))


def _add_convert(commands) -> None:
    convert = commands.add_parser(
        "convert",
        help="an mlx-lm, loralib or differently scaled adapter to PEFT, with a printed proof "
        "that the outputs agree",
    )
    add = convert.add_argument
    add("source", help="adapter folder (PEFT, mlx-lm) or state dict file (loralib)")
    add(
        "--out",
        type=_output_folder,
        required=True,
        help="the PEFT adapter folder to write (required; default: none)",
    )
    _add_source_options(add)
    convert.set_defaults(run=_job("convert"))


def _add_resize(commands) -> None:
    from lowrank.commands.resize import energy_share  # torch-free at parse time

    resize = commands.add_parser(
        "resize", help="the best lower-rank version of a PEFT adapter (SVD of its factors)"
    )
    add = resize.add_argument
    add("adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    size = resize.add_mutually_exclusive_group(required=True)
    size.add_argument(
        "--rank",
        type=_positive_int,
        help="the new rank of every layer; a layer of lower rank keeps its own (default: "
        "none; give --rank or --energy)",
    )
    size.add_argument(
        "--energy",
        type=energy_share,
        help="per layer, the smallest rank holding this share of ||s B A||_F^2, e.g. 0.9 "
        "(default: none; give --rank or --energy)",
    )
    add(
        "--out",
        type=_output_folder,
        required=True,
        help="the folder to write the adapter to",
    )
    add("--json", action="store_true", help="print the report as JSON instead of a table")
    resize.set_defaults(run=_job("resize"))


def _add_extract(commands) -> None:
    from lowrank.commands.resize import energy_share, rank_list  # torch-free at parse time

    extract = commands.add_parser(
        "extract", help="a LoRA adapter from a full fine-tune (SVD of W_tuned - W_base)"
    )
    add = extract.add_argument
    add("base", help="the base model folder (loaded with the tuned model's class)")
    add("tuned", help="the fine-tuned model folder, as `lowrank finetune --method full` writes")
    size = extract.add_mutually_exclusive_group(required=True)
    size.add_argument(
        "--rank",
        type=rank_list,
        help="the rank of every layer, or a comma list (1,2,4,8): one adapter per rank, in "
        "OUT/r<rank>/ (default: none; give --rank or --energy)",
    )
    size.add_argument(
        "--energy",
        type=energy_share,
        help="per layer, the smallest rank holding this share of ||W_tuned - W_base||_F^2 "
        "(default: none; give --rank or --energy)",
    )
    add(
        "--targets",
        type=_layer_names,
        help="comma-separated layer names to extract (default: every Linear/Conv1D layer "
        "whose weight changed)",
    )
    add(
        "--out",
        type=_output_folder,
        required=True,
        help="the folder to write the adapter(s) to",
    )
    add(
        "--eval-file",
        help="JSONL as lowrank finetune reads it: score the tuned model, the base and each "
        "extracted adapter on it (default: no evaluation)",
    )
    add("--max-length", type=_positive_int, default=256, help="tokens kept per evaluation row")
    add("--json", action="store_true", help="print the report as JSON instead of tables")
    extract.set_defaults(run=_job("extract"))


def _add_merge_audit(commands) -> None:
    def blocksize(text: str) -> int:
        value = _positive_int(text)
        if value & (value - 1):
            raise argparse.ArgumentTypeError(f"must be a power of two, got {text!r}")
        return value

    audit = commands.add_parser(
        "merge-audit",
        help="a QLoRA adapter: on its 4-bit base, or merged into W, deq(Q(W)) or 4 bits again?",
    )
    add = audit.add_argument
    add("adapter", help="the adapter folder lowrank finetune --method qlora wrote (PEFT layout)")
    add(
        "--base",
        required=True,
        metavar="MODEL",
        help="the model folder it was trained on (full precision)",
    )
    add(
        "--data",
        metavar="FILE",
        help='JSONL rows {"text", "label"} or {"text"} to compare the outputs on, tokenized as '
        "finetune does (default: 16 rows of 32 random token ids, seed 0: KL and agreement only)",
    )
    add("--quant-type", choices=("nf4", "fp4"), default="nf4", help="the base's 4-bit type")
    add("--blocksize", type=blocksize, default=64, help="the base's quantization block size")
    add(
        "--double-quant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the base's block scales were quantized a second time, as in QLoRA",
    )
    add(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="what the merged weights are stored in (re-quantized from, for 4 bits again)",
    )
    add("--max-rows", type=_positive_int, default=512, metavar="N", help="rows of --data used")
    add("--json", action="store_true", help="print the report as JSON instead of a table")
    audit.set_defaults(run=_job("merge_audit"))


def build_parser() -> argparse.ArgumentParser:
    """The `lowrank` argument parser: one subcommand per job, every option with help and default.

    Examples:
        >>> args = build_parser().parse_args(["estimate", "config.json", "--batch-size", "4"])
        >>> args.command, args.method, args.batch_size, args.seq_len
        ('estimate', 'qlora', 4, 512)
    """
    parser = _Parser(prog=PROG, description=__doc__)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (
        _add_numpy_demo,
        _add_demo,
        _add_finetune,
        _add_estimate,
        _add_claims,
        _add_inspect,
        _add_convert,
        _add_resize,
        _add_extract,
        _add_merge_audit,
    ):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error prints one line `lowrank: error: ...` and returns 2.

    Examples:
        >>> main(["estimate", "no-such-config.json"])  # doctest: +ELLIPSIS
        2
        >>> main(["claims", "bits", "--smoke"])  # doctest: +ELLIPSIS
        Claim: NF4 with double quantization costs 4.127 bits per weight; ...
        0
    """
    args = build_parser().parse_args(argv)  # argparse's errors: _Parser.error, exit status 2
    try:
        return args.run(args)
    except USER_ERRORS as error:
        if isinstance(error, ImportError) and (error.name or "").startswith("lowrank"):
            raise  # lowrank failing to import itself is a bug, not a missing package
        print(_error_line(_describe(error)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130

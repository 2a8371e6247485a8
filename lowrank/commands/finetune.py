"""`lowrank finetune`: fine-tune a Hugging Face model on a JSONL file (full, LoRA, QLoRA).

    lowrank finetune MODEL DATA.jsonl --method qlora --r 8 --eval-split 0.1 --out runs/finetune

The rows decide the task (`lowrank.data.read_jsonl`; tokens, batches and the metric in
`finetune_data.py`): {"text"} or {"prompt", "completion"} rows train causal language
modelling, {"text", "label"} rows sequence classification with a new head. The model comes
from `lowrank.torch.hf`; LoRA adapters (Hu et al. 2021, arXiv:2106.09685), or QLoRA's NF4 base
with adapters on every linear layer (Dettmers et al. 2023, arXiv:2305.14314), from
`lowrank.torch.add_lora`; the loop, log.jsonl, checkpoints and resumption from
`lowrank.torch.train`.

What the output folder holds: with LoRA or QLoRA a PEFT adapter folder
(`PeftModel.from_pretrained(base, out)` loads it), in which a classifier's new head is a
module trained in full and saved with the adapter, as PEFT's modules_to_save; with full
fine-tuning the model and its tokenizer as `save_pretrained` writes them
(`AutoModel*.from_pretrained(out)` loads it). `--seed` seeds the head's and the adapters'
initialisation too, so two runs on the CPU write the same bytes.

Under `torchrun --nproc_per_node N -m lowrank finetune ...` every process runs the job and
`lowrank.torch.train` splits each batch across them (DDP, or FSDP with `--strategy fsdp`;
QLoRA's 4-bit codes are then stored as parameters so that FSDP shards them); rank 0 alone
writes the output folder and prints.

(About 430 lines, a quarter of them the docstring of `finetune`'s two dozen options: the job,
what it saves and the line that says so; the data side is `finetune_data.py`.)
"""

import argparse
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from lowrank._folders import write_folder_atomically
from lowrank._validate import (
    METHODS,
    check_choice,
    check_dropout,
    check_int,
    check_positive_number,
)
from lowrank.accounting import format_bytes
from lowrank.commands.finetune_data import (
    check_examples,
    evaluation,
    pad_collate,
    split_examples,
    tokenize_rows,
)
from lowrank.data import read_jsonl
from lowrank.shapes import ALL_LINEAR, method_default_targets
from lowrank.torch import (
    TrainConfig,
    TrainResult,
    add_lora,
    all_linear_targets,
    load_model,
    load_tokenizer,
    prepare_for_kbit_training,
    seed_everything,
    train,
)
from lowrank.torch.checkpoint import TRAINABLE_NAME, TRAINER_STATE_NAME, save_trainable
from lowrank.torch.distributed import PARALLEL_MODES, is_main_process, set_quant_storage
from lowrank.torch.hf import HEAD_NAMES
from lowrank.torch.peft_format import ADAPTER_FILES
from lowrank.torch.train import SCHEDULES

__all__ = ["FinetuneResult", "finetune", "main"]


@dataclass
class FinetuneResult:
    """What a `finetune` run produced: the training run, the trained model and what was saved.

    Examples:
        >>> from lowrank.commands.finetune import FinetuneResult
        >>> from lowrank.torch.train import TrainResult
        >>> run = TrainResult(losses=[0.9, 0.5], steps=2)
        >>> result = FinetuneResult(run, None, "an adapter", ["adapter_config.json"], 1234)
        >>> result.summary("runs/x")
        'saved an adapter to runs/x (1.2 kB (1.2 KiB)); 2 steps, final train loss 0.5000'
    """

    run: TrainResult
    model: nn.Module | None
    saved: str  # what the output folder holds, in words
    files: list[str]  # the files of the final save, in the output folder
    size_bytes: int  # their total size

    def summary(self, out_dir: str | os.PathLike) -> str:
        """One line: what was saved, where, its size, the steps and the last metric."""
        metric = f"final train loss {self.run.losses[-1]:.4f}"
        if self.run.evals:
            shown = ", ".join(f"{key} {value:.4f}" for key, value in self.run.evals[-1].items())
            metric = f"eval {shown} (epoch {len(self.run.evals)})"
        size = format_bytes(self.size_bytes)
        return f"saved {self.saved} to {out_dir} ({size}); {self.run.steps} steps, {metric}"


def _check_model_path(name_or_path: str | os.PathLike) -> None:
    """A local path must be a model folder; a hub name ("org/model") is left to the loader."""
    path = Path(name_or_path)
    text = str(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{text} is a folder without a config.json: not a model folder")
    elif path.exists():
        raise ValueError(f"{text} is a file; expected a model folder or a Hugging Face model name")
    elif path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or not text:
        raise FileNotFoundError(f"no model folder at {text!r}")


def _load(name_or_path: str | os.PathLike, what: str, loader, **options):
    """`loader(name_or_path, **options)`; a folder it cannot load raises one ValueError that
    names it (`load_model` words its own; the tokenizer's and deep JSON's are worded here)."""
    try:
        return loader(name_or_path, **options)
    except RecursionError:  # transformers' json on a file nested thousands of levels deep
        raise ValueError(
            f"cannot load a {what} from {str(name_or_path)!r}: its JSON nests too deeply"
        ) from None
    except (OSError, ValueError) as error:
        if what == "model" and isinstance(error, ValueError):
            raise  # load_model's own message names the folder
        raise ValueError(f"cannot load a {what} from {str(name_or_path)!r}: {error}") from None


def _check_options(
    *, method, r, alpha, dropout, epochs, batch_size, grad_accum_steps, lr, schedule,
    warmup_ratio, warmup_steps, max_length, eval_split, eval_file, seed, bf16, save_steps,
    resume, loraplus_ratio, parallel, **_,
) -> None:  # fmt: skip
    """`finetune`'s arguments, before any file is read: ValueError naming the first bad one."""
    check_choice("method", method, METHODS)
    check_choice("schedule", schedule, SCHEDULES)
    if parallel is not None:
        check_choice("parallel", parallel, PARALLEL_MODES)
        if parallel == "fsdp" and (save_steps is not None or resume is not None):
            raise ValueError(
                "save_steps and resume need the ddp strategy: FSDP shards AdamW's moments, "
                "and a checkpoint holds whole tensors"
            )
    for name, value in (("r", r), ("epochs", epochs), ("batch_size", batch_size)):
        check_int(name, value)
    check_int("grad_accum_steps", grad_accum_steps)
    check_int("max_length", max_length)
    check_int("seed", seed, low=0)
    check_positive_number("alpha", alpha)  # inf or nan would train to a loss of nan
    check_dropout(dropout)
    if lr is not None:
        check_positive_number("lr", lr)
    if warmup_steps is not None:
        check_int("warmup_steps", warmup_steps, low=0)
    if loraplus_ratio is not None:
        check_positive_number("loraplus_ratio", loraplus_ratio)
        if method == "full":
            raise ValueError("loraplus_ratio applies to lora and qlora (B factors), not full")
    if save_steps is not None:
        check_int("save_steps", save_steps)
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if not 0 <= eval_split < 1:
        raise ValueError(f"eval_split must be a fraction in [0, 1), got {eval_split}")
    if eval_split and eval_file is not None:
        raise ValueError("give an evaluation split or an evaluation file, not both")
    if bf16 and not torch.cuda.is_available():
        raise ValueError(
            "bf16 needs a CUDA GPU: no GPU is visible here, and on a CPU without bfloat16 "
            "units PyTorch's bfloat16 autocast is about 20x slower than float32 (leave bf16 off)"
        )
    if resume is not None and not (Path(resume) / TRAINER_STATE_NAME).is_file():
        raise ValueError(
            f"no training checkpoint at {resume}: a checkpoint is a checkpoint-<step> or "
            f"epoch-<n> folder of an earlier run (with its {TRAINER_STATE_NAME})"
        )


def _heads(model: nn.Module) -> list[str]:
    """The names of a classification model's new head(s): `HEAD_NAMES` ("classifier", ...)."""
    return [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in HEAD_NAMES]


def _pretrained_writer(tokenizer, written: list[str]):
    """`save(model, folder)` for full fine-tuning: the model and tokenizer as `save_pretrained`
    writes them, the folder changed as a unit; adapter files an earlier run left are dropped
    (transformers would take the folder for an adapter)."""

    def save(model: nn.Module, folder: Path) -> None:
        def write(new: Path) -> None:
            model.save_pretrained(new)
            tokenizer.save_pretrained(new)
            written.extend(sorted(os.listdir(new)))

        write_folder_atomically(folder, write, owns=(*ADAPTER_FILES, TRAINABLE_NAME))

    return save


def finetune(
    model_name_or_path: str | os.PathLike,
    data_path: str | os.PathLike,
    *,
    method: str = "lora",
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: list[str] | str | None = None,
    epochs: int = 1,
    batch_size: int = 8,
    grad_accum_steps: int = 1,
    lr: float | None = None,
    schedule: str = "cosine",
    warmup_ratio: float = 0.06,
    warmup_steps: int | None = None,
    loraplus_ratio: float | None = None,
    max_length: int = 256,
    eval_split: float = 0.0,
    eval_file: str | os.PathLike | None = None,
    seed: int = 0,
    bf16: bool | None = None,
    gradient_checkpointing: bool = False,
    save_steps: int | None = None,
    resume: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "runs/finetune",
    progress: bool = True,
    parallel: str | None = None,
) -> FinetuneResult:
    """Fine-tune a Hugging Face model on a JSONL file (see `lowrank.data.read_jsonl`).

    text or prompt/completion rows: causal language modelling; text/label rows: sequence
    classification (a new head, trained in full next to the adapters and saved with them as
    PEFT's modules_to_save). method "full", "lora" or "qlora" (NF4 + double quantization
    base). targets: None for the architecture's default (LoRA: query and value projections;
    QLoRA: all linear layers), "all-linear", or names. Writes log.jsonl and the trained
    weights to `out_dir`: a PEFT adapter folder, or with "full" a `from_pretrained` folder.

    LoRA: Hu et al. 2021, arXiv:2106.09685; QLoRA: Dettmers et al. 2023, arXiv:2305.14314;
    the optimizer is AdamW (Loshchilov & Hutter, arXiv:1711.05101) with warmup and a cosine,
    linear or constant schedule. The arguments and the data files are checked before any
    model is loaded.

    Args:
        model_name_or_path: a local model folder, or a Hugging Face model name in the cache.
        data_path: the JSONL file.
        method: "full", "lora" or "qlora".
        r: the LoRA rank.
        alpha: LoRA's alpha (scale = alpha / r).
        dropout: dropout on the adapters' input.
        targets: the layers to adapt (see above).
        epochs: passes over the data.
        batch_size: examples per micro-batch.
        grad_accum_steps: micro-batches per optimizer step.
        lr: the peak learning rate; None for 2e-5 (full) or 2e-4 (adapters).
        schedule: the learning rate after warmup: "cosine", "linear" or "constant".
        warmup_ratio: share of the steps spent warming up (unless `warmup_steps`).
        warmup_steps: optimizer steps of warmup; None: `warmup_ratio` of them.
        loraplus_ratio: LoRA+ (Hayou et al. 2024, arXiv:2402.12354): the B factors train at
            this many times `lr` (`TrainConfig.loraplus_lr_ratio`); None: plain LoRA.
        max_length: tokens kept per row.
        eval_split: share of the rows held out (seeded) for a metric after each epoch.
        eval_file: a JSONL file of the same format to evaluate on instead.
        seed: seeds the head and adapter initialisation, dropout, the order and the split.
        bf16: bfloat16 autocast; None: on CUDA only; True needs CUDA (ValueError otherwise).
        gradient_checkpointing: recompute activations in backward to save memory.
        save_steps: write a resumable checkpoint every this many steps (None: none).
        resume: a checkpoint folder of an earlier run with the same settings to continue.
        out_dir: where log.jsonl, checkpoints and the trained weights go.
        progress: show a progress bar.
        parallel: under torchrun, "ddp" or "fsdp" (`TrainConfig.parallel`); None: DDP there.

    Returns:
        A `FinetuneResult`: the run, the trained model, and what was saved.

    Examples:
        >>> from lowrank.torch.hf import minilm_path
        >>> result = finetune(minilm_path(), "reviews.jsonl", r=4)  # doctest: +SKIP
        >>> result.summary("runs/finetune")  # doctest: +SKIP
        'saved a LoRA adapter (PEFT layout) with the trained classifier ... eval accuracy ...'
        >>> finetune("gpt2", "reviews.jsonl", method="dora")
        Traceback (most recent call last):
        ...
        ValueError: method must be one of ['full', 'lora', 'qlora'], got 'dora'
        >>> finetune("./no-such-model", "reviews.jsonl")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no model folder at './no-such-model'
    """
    _check_options(**locals())  # here, locals() are the arguments
    _check_model_path(model_name_or_path)
    dataset = read_jsonl(data_path)  # errors name the line before any model is loaded
    eval_dataset = read_jsonl(eval_file) if eval_file is not None else None
    if eval_dataset is not None and eval_dataset.format != dataset.format:
        raise ValueError(
            f"{eval_file} is {eval_dataset.format} but {data_path} is {dataset.format}: "
            "evaluate on rows of the training format"
        )
    classification = dataset.format == "classification"
    seed_everything(seed)  # before the head and the adapters are initialised
    model = _load(
        model_name_or_path,
        "model",
        load_model,
        task="classification" if classification else "causal_lm",
        num_labels=len(dataset.label_names) if classification else None,
    )
    tokenizer = _load(model_name_or_path, "tokenizer", load_tokenizer)
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):  # transformers makes one anyway
        raise ValueError(
            f"the tokenizer of {str(model_name_or_path)!r} has no vocabulary, only special "
            "tokens: is the folder missing its tokenizer files (tokenizer.json, vocab...)?"
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"the tokenizer of {str(model_name_or_path)!r} has neither a padding nor an "
            "end-of-text token to pad batches with"
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if classification:
        model.config.id2label = {i: str(name) for i, name in enumerate(dataset.label_names)}
        model.config.label2id = {str(name): i for i, name in enumerate(dataset.label_names)}
    heads = _heads(model) if classification else []
    if method == "full":
        model.requires_grad_(True)
    else:
        if targets is None:
            # the one default `lowrank estimate` uses too: qlora every linear layer, lora q and v
            targets = method_default_targets(method, getattr(model.config, "model_type", None))
        if targets in (ALL_LINEAR, [ALL_LINEAR]):
            targets = all_linear_targets(model)
        if isinstance(targets, list):  # a head trains in full, never through LoRA
            targets = [t for t in targets if not any(t.startswith(h + ".") for h in heads)]
        if method == "qlora":
            prepare_for_kbit_training(model, gradient_checkpointing=gradient_checkpointing)
        add_lora(
            model,
            targets,
            r=r,
            alpha=alpha,
            dropout=dropout,
            quant_type="nf4" if method == "qlora" else None,
            modules_to_save=heads or None,
        )
        if method == "qlora" and parallel == "fsdp":
            set_quant_storage(model, torch.uint8)  # codes as parameters: FSDP shards them
    vocabulary = model.get_input_embeddings().num_embeddings
    examples = tokenize_rows(dataset, tokenizer, max_length)
    check_examples(examples, dataset, vocabulary, max_length)
    held_out = []
    if eval_dataset is not None:
        held_out = tokenize_rows(eval_dataset, tokenizer, max_length, dataset.label_names)
        check_examples(held_out, eval_dataset, vocabulary, max_length)
    elif eval_split:
        examples, held_out = split_examples(examples, eval_split, seed)
    collate = pad_collate(tokenizer.pad_token_id)
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        grad_accum_steps=grad_accum_steps,
        lr=lr if lr is not None else (2e-5 if method == "full" else 2e-4),
        schedule=schedule,
        warmup_ratio=warmup_ratio,
        warmup_steps=warmup_steps,
        loraplus_lr_ratio=loraplus_ratio,
        bf16=bf16 is not False,  # None: autocast where CUDA is (train's rule), off on a CPU
        gradient_checkpointing=gradient_checkpointing,
        seed=seed,
        out_dir=str(out_dir),
        save_steps=save_steps,
        resume_from=str(resume) if resume is not None else None,
        progress=progress,
        parallel=parallel,
    )
    written: list[str] = []
    if method == "full":
        save = _pretrained_writer(tokenizer, written)
    else:
        save = partial(save_trainable, base_model_name_or_path=str(model_name_or_path))

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(**batch).loss

    evaluate = evaluation(held_out, collate, batch_size, classification) if held_out else None
    run = train(
        model, examples, config, loss_fn=loss_fn, collate=collate, evaluate=evaluate, save=save
    )
    if method != "full":
        written = [n for n in (*ADAPTER_FILES, TRAINABLE_NAME) if (Path(out_dir) / n).exists()]
    saved = {
        "full": "the full model and tokenizer (from_pretrained layout)",
        "lora": "a LoRA adapter (PEFT layout)",
        "qlora": "a QLoRA adapter (PEFT layout, trained on an NF4 base)",
    }[method]
    if heads and method != "full":
        saved += f" with the trained {', '.join(heads)} (modules_to_save)"
    size = sum((Path(out_dir) / name).stat().st_size for name in written)
    return FinetuneResult(run, model, saved, written, size)


def main(args: argparse.Namespace) -> int:
    """`lowrank finetune MODEL DATA [--method ...]`: train, print each epoch's metric and a
    last line saying what was saved, where, its size and the final metric. Bad arguments, data
    or model folders raise the errors `lowrank.cli.main` prints; a loss that is not finite is
    a ValueError. Returns 0.

    Examples:
        >>> from lowrank.cli import build_parser
        >>> args = build_parser().parse_args(["finetune", "gpt2", "data.jsonl", "--r", "4"])
        >>> args.method, args.r, args.out, args.eval_split, args.schedule
        ('lora', 4, 'runs/finetune', 0.0, 'cosine')
        >>> main(args)  # doctest: +SKIP
        saved a LoRA adapter (PEFT layout) to runs/finetune (...); 12 steps, final train loss ...
        0
    """
    result = finetune(
        args.model,
        args.data,
        method=args.method,
        r=args.r,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=args.targets,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum_steps=args.grad_accum_steps,
        lr=args.lr,
        schedule=args.schedule,
        warmup_ratio=args.warmup_ratio,
        warmup_steps=args.warmup_steps,
        loraplus_ratio=args.loraplus_ratio,
        max_length=args.max_length,
        eval_split=args.eval_split,
        eval_file=args.eval_file,
        seed=args.seed,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        save_steps=args.save_steps,
        resume=args.resume,
        out_dir=args.out,
        parallel=args.parallel,
    )
    losses = result.run.losses
    bad = next((step for step, loss in enumerate(losses, 1) if not math.isfinite(loss)), 0)
    if bad:
        raise ValueError(
            f"training diverged: the loss was {losses[bad - 1]} at step {bad} "
            f"(try a lower --lr); the run's files are in {args.out}"
        )
    if not is_main_process():  # under torchrun, rank 0 speaks for the run
        return 0
    for epoch, metrics in enumerate(result.run.evals, 1):
        shown = ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())
        print(f"epoch {epoch}/{len(result.run.evals)}: eval {shown}")
    print(result.summary(args.out))
    return 0

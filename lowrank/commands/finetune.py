"""`lowrank finetune`: fine-tune a Hugging Face model on a JSONL file (full, LoRA, QLoRA).

    lowrank finetune MODEL DATA.jsonl --method qlora --r 8 --out runs/finetune

The rows decide the task (`lowrank.data.read_jsonl`): {"text"} or {"prompt", "completion"}
rows train causal language modelling, {"text", "label"} rows sequence classification with a
new head. The model comes from `lowrank.torch.hf`; LoRA adapters (Hu et al. 2021,
arXiv:2106.09685), or QLoRA's NF4 base with adapters on every linear layer (Dettmers et al.
2023, arXiv:2305.14314), from `lowrank.torch.add_lora`; the loop and log.jsonl from
`lowrank.torch.train`, the saved adapter (PEFT layout) from `lowrank.torch.checkpoint`.
"""

import argparse
import math
import os
from pathlib import Path

import torch
from torch import nn

from lowrank._validate import METHODS, check_choice, check_int, check_positive_number
from lowrank.data import read_jsonl
from lowrank.torch import (
    TrainConfig,
    add_lora,
    all_linear_targets,
    default_targets,
    load_model,
    load_tokenizer,
    prepare_for_kbit_training,
    train,
)
from lowrank.torch.hf import HEAD_NAMES

__all__ = ["finetune", "main"]


def _tokenize_for_training(dataset, tokenizer, max_length: int) -> list[dict]:
    """Token ids and labels per row. Language modelling: labels are the ids themselves (the
    model shifts them), with -100 (ignored by the loss) on prompt tokens for prompt/completion.
    Classification: the class index."""
    examples = []
    if dataset.format == "classification":
        for row, label in zip(dataset.rows, dataset.label_ids(), strict=True):
            ids = tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"]
            examples.append({"input_ids": ids, "labels": label})
        return examples
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in dataset.rows:
        if dataset.format == "text":
            ids = tokenizer(row["text"])["input_ids"] + eos
            labels = list(ids)
        else:
            prompt = tokenizer(row["prompt"])["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos
            ids = prompt + completion
            labels = [-100] * len(prompt) + completion
        examples.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return examples


def _check_examples(examples: list[dict], dataset, model: nn.Module, max_length: int) -> None:
    """Refuse rows that would train on nothing (a loss of nan) or index past the embeddings."""
    rows = model.get_input_embeddings().num_embeddings
    for i, example in enumerate(examples):
        ids = example["input_ids"]
        if ids and max(ids) >= rows:
            raise ValueError(
                f"{dataset.where(i)}: the tokenizer gives token id {max(ids)} but the model has "
                f"{rows} token embeddings: the tokenizer does not belong to this model"
            )
        labels = example["labels"]
        if isinstance(labels, list) and all(label == -100 for label in labels[1:]):
            raise ValueError(
                f"{dataset.where(i)}: no token to learn from (the row tokenizes to "
                f"{len(ids)} tokens{'' if len(ids) < max_length else ', cut at max_length'}; "
                "a prediction needs a token before it)"
            )


def _pad_collate(pad_id: int):
    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
        mask = torch.zeros(len(examples), longest, dtype=torch.long)
        sequence_labels = isinstance(examples[0]["labels"], list)
        labels = torch.full((len(examples), longest), -100) if sequence_labels else None
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            mask[row, :n] = 1
            if sequence_labels:
                labels[row, :n] = torch.tensor(example["labels"])
        if not sequence_labels:
            labels = torch.tensor([e["labels"] for e in examples])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


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


def finetune(
    model_name_or_path: str | os.PathLike,
    data_path: str | os.PathLike,
    *,
    method: str = "lora",
    r: int = 8,
    alpha: float = 16,
    targets: list[str] | str | None = None,
    epochs: int = 1,
    batch_size: int = 8,
    lr: float | None = None,
    max_length: int = 256,
    out_dir: str | os.PathLike = "runs/finetune",
    gradient_checkpointing: bool = False,
    progress: bool = True,
):
    """Fine-tune a Hugging Face model on a JSONL file (see `lowrank.data.read_jsonl`).

    text or prompt/completion rows: causal language modelling; text/label rows: sequence
    classification (a new head, trained alongside the adapters). method "full", "lora" or
    "qlora" (NF4 + double quantization base). targets: None for the architecture's default
    (LoRA: query and value projections; QLoRA: all linear layers), "all-linear", or names.
    lr: None for 2e-5 (full) or 2e-4 (adapters). Writes log.jsonl, the adapter (PEFT layout)
    and other trained tensors to `out_dir`. Returns the `TrainResult`.

    LoRA: Hu et al. 2021, arXiv:2106.09685; QLoRA: Dettmers et al. 2023, arXiv:2305.14314;
    the optimizer is AdamW (Loshchilov & Hutter, arXiv:1711.05101) with warmup and cosine decay.
    The arguments and the data file are checked before any model is loaded.

    Args:
        model_name_or_path: a local model folder, or a Hugging Face model name in the cache.
        data_path: the JSONL file.
        method: "full", "lora" or "qlora".
        r: the LoRA rank.
        alpha: LoRA's alpha (scale = alpha / r).
        targets: the layers to adapt (see above).
        epochs: passes over the data.
        batch_size: examples per optimizer step.
        lr: the peak learning rate.
        max_length: tokens kept per row.
        out_dir: where log.jsonl and the trained tensors go.
        gradient_checkpointing: recompute activations in backward to save memory.
        progress: show a progress bar.

    Examples:
        >>> from lowrank.torch.hf import minilm_path
        >>> result = finetune(minilm_path(), "reviews.jsonl", r=4)  # doctest: +SKIP
        >>> len(result.losses) == result.steps  # one loss per optimizer step  # doctest: +SKIP
        True
        >>> finetune("gpt2", "reviews.jsonl", method="dora")
        Traceback (most recent call last):
        ...
        ValueError: method must be one of ['full', 'lora', 'qlora'], got 'dora'
        >>> finetune("./no-such-model", "reviews.jsonl")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no model folder at './no-such-model'
    """
    check_choice("method", method, METHODS)
    for name, value in (("r", r), ("epochs", epochs), ("batch_size", batch_size)):
        check_int(name, value)
    check_int("max_length", max_length)
    check_positive_number("alpha", alpha)  # inf or nan would train to a loss of nan
    if lr is not None:
        check_positive_number("lr", lr)
    _check_model_path(model_name_or_path)
    dataset = read_jsonl(data_path)  # errors name the line before any model is loaded
    classification = dataset.format == "classification"
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
    if method == "full":
        model.requires_grad_(True)
    else:
        if targets is None:
            targets = "all-linear" if method == "qlora" else default_targets(model)
        if targets == "all-linear" or targets == ["all-linear"]:
            targets = all_linear_targets(model)
        if method == "qlora":
            prepare_for_kbit_training(model, gradient_checkpointing=gradient_checkpointing)
        add_lora(model, targets, r=r, alpha=alpha, quant_type="nf4" if method == "qlora" else None)
        for name, module in model.named_modules():  # a new classification head must train
            if name.rsplit(".", 1)[-1] in HEAD_NAMES and classification:
                module.requires_grad_(True)
    examples = _tokenize_for_training(dataset, tokenizer, max_length)
    _check_examples(examples, dataset, model, max_length)
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr if lr is not None else (2e-5 if method == "full" else 2e-4),
        gradient_checkpointing=gradient_checkpointing,
        out_dir=str(out_dir),
        progress=progress,
    )

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(**batch).loss

    collate = _pad_collate(tokenizer.pad_token_id)
    return train(model, examples, config, loss_fn=loss_fn, collate=collate)


def main(args: argparse.Namespace) -> int:
    """`lowrank finetune MODEL DATA [--method ...]`: train, print the steps and the final loss.
    Bad arguments, data or model folders raise the errors `lowrank.cli.main` prints; a loss
    that is not finite is a ValueError. Returns 0.

    Examples:
        >>> from lowrank.cli import build_parser
        >>> args = build_parser().parse_args(["finetune", "gpt2", "data.jsonl", "--r", "4"])
        >>> args.method, args.r, args.out
        ('lora', 4, 'runs/finetune')
        >>> # prints "<steps> steps, final loss <loss>; written to runs/finetune", returns 0
        >>> main(args)  # doctest: +SKIP
    """
    result = finetune(
        args.model,
        args.data,
        method=args.method,
        r=args.r,
        alpha=args.alpha,
        targets=args.targets,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        out_dir=args.out,
    )
    bad = next((step for step, loss in enumerate(result.losses, 1) if not math.isfinite(loss)), 0)
    if bad:
        raise ValueError(
            f"training diverged: the loss was {result.losses[bad - 1]} at step {bad} "
            f"(try a lower --lr); the run's files are in {result.out_dir}"
        )
    print(f"{result.steps} steps, final loss {result.losses[-1]:.4f}; written to {result.out_dir}")
    return 0

"""`lowrank finetune`: fine-tune a Hugging Face model on a JSONL file (full, LoRA, QLoRA).

    lowrank finetune MODEL DATA.jsonl --method qlora --r 8 --out runs/finetune

The rows decide the task (`lowrank.data.read_jsonl`): {"text"} or {"prompt", "completion"}
rows train causal language modelling, {"text", "label"} rows sequence classification with a
new head. The model comes from `lowrank.torch.hf`; LoRA adapters (Hu et al. 2021,
arXiv:2106.09685), or QLoRA's NF4 base with adapters on every linear layer (Dettmers et al.
2023, arXiv:2305.14314), from `lowrank.torch.add_lora`; the loop, log.jsonl and the saved
adapter (PEFT layout) from `lowrank.torch.train`.
"""

import argparse
import os

import torch
from torch import nn

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
    """
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method must be 'full', 'lora' or 'qlora', got {method!r}")
    dataset = read_jsonl(data_path)  # errors name the line before any model is loaded
    classification = dataset.format == "classification"
    model = load_model(
        model_name_or_path,
        task="classification" if classification else "causal_lm",
        num_labels=len(dataset.label_names) if classification else None,
    )
    tokenizer = load_tokenizer(model_name_or_path)
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
    A bad data file or argument prints what was wrong and returns 2."""
    targets = args.targets.split(",") if args.targets else None
    try:
        result = finetune(
            args.model,
            args.data,
            method=args.method,
            r=args.r,
            alpha=args.alpha,
            targets=targets,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            out_dir=args.out,
        )
    except (ValueError, FileNotFoundError) as error:  # bad data or arguments: say which
        print(f"lowrank finetune: error: {error}")
        return 2
    print(f"{result.steps} steps, final loss {result.losses[-1]:.4f}; written to {result.out_dir}")
    return 0

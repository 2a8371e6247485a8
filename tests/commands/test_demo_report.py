"""The demo's report folder changes as a unit: report.json, summary.md, the plots and adapter/.

Oracles: the file system (what the folder and its parent hold, bytes before and after a write
that fails half-way) and the report dict itself (report.json read back).
"""

import json
import os
import stat

import pytest

pytest.importorskip("matplotlib")

from lowrank import viz  # noqa: E402
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
    return {
        "config": {"epochs": 1, "batch_size": 16},
        "device": "cpu",
        "torch_threads": 1,
        "data": "toy",
        "model": "toy",
        "rows": [row, {**row, "method": "full"}],
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
            }
        },
        "merge": {
            "max_abs_logit_diff": 1e-6,
            "max_abs_logit": 3.0,
            "merged_over_base": 1.0,
            "unmerged_over_base": 1.2,
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

"""`lowrank demo --smoke`: the whole demo at tiny sizes, end to end, through the command line.

The real all-MiniLM-L6-v2 weights and the real VADER data, 32 training and 32 test words, one
epoch. Numbers that do not depend on training are checked against independent counts.
"""

import json
from types import SimpleNamespace

import torch
from torch import nn

from lowrank.cli import main
from lowrank.commands.demo import _peak_bytes


def test_smoke_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--smoke", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert str(out) in printed and "within 1 point of full fine-tuning" in printed
    assert "How both hold: 90% of the energy needs" in printed  # energy vs behaviour, one line
    # progress on stderr, apart from the summary: each method named as it starts and ends,
    # each check announced as it runs
    progress = [line for line in captured.err.splitlines() if line[:1].isdigit()]
    progress += [line for line in captured.err.splitlines() if line.startswith("check ")]
    assert "3/6 LoRA r=1: training query,value, 2 steps" in progress
    assert any(line.startswith("6/6 QLoRA r=8: done in ") for line in progress)
    assert [line[:9] for line in progress if line.startswith("check ")] == [
        "check 1/4",
        "check 1/4",
        "check 2/4",
        "check 3/4",
        "check 4/4",
    ]
    assert "check " not in printed and "1/6 head only" not in printed
    for name in ("report.json", "summary.md", "accuracy.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 0
    for name in ("accuracy.png", "trainable_params.png", "loss_curves.png", "update_energy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # PNG's signature
    assert not list(out.glob(".*.tmp"))  # every atomic write renamed its temporary file
    report = json.loads((out / "report.json").read_text())

    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == [
        "head only",
        "full fine-tuning",
        "LoRA r=1",
        "LoRA r=4",
        "LoRA r=8",
        "QLoRA r=8",
    ]
    # Trainable numbers from the paper's formula r * (in + out) per adapted matrix: all-MiniLM
    # has 6 layers of hidden size 384; query and value are 384 x 384; the head is 384*2 + 2.
    head = 384 * 2 + 2
    for r in (1, 4, 8):
        assert rows[f"LoRA r={r}"]["trainable_params"] == 6 * 2 * r * (384 + 384) + head
    # QLoRA adapts all 6 linear layers of each block: 4 of 384x384, 1536x384 and 384x1536.
    assert rows["QLoRA r=8"]["trainable_params"] == 6 * 8 * (4 * 768 + 2 * 1920) + head
    # full fine-tuning trains everything: the published 22,713,216 numbers less BERT's [CLS]
    # pooler (384*384 + 384, unused by mean pooling), plus the head
    assert rows["full fine-tuning"]["trainable_params"] == 22_713_216 - (384 * 384 + 384) + head
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["wall_time_s"] > 0 and row["peak_bytes"] > 0
    # an adapter file is far smaller than the full model's
    assert rows["LoRA r=8"]["saved_bytes"] * 100 < rows["full fine-tuning"]["saved_bytes"]

    # every linear layer of MiniLM's 6 blocks (q, k, v, attention output, up, down) is cut
    cut = report["rank_r_agreement"]
    assert cut["layers"] == 6 * 6 and cut["ranks"] == [0, 1]
    assert all(0.0 <= share <= 1.0 for share in cut["agreement"] + cut["accuracy"])

    merge = report["merge"]
    assert merge["max_abs_logit_diff"] <= 1e-4 * max(1.0, merge["max_abs_logit"])  # float32
    assert {name: len(s) for name, s in merge["forward_s"].items()} == {
        "base": 9,
        "merged": 9,
        "unmerged": 9,
    }
    for name in ("merged", "unmerged"):
        verdict = merge["timing"][name]["verdict"]
        assert verdict in printed
        assert verdict == "no measurable difference" or verdict.startswith("measurably")
    assert report["adapter_reload"]["identical"]
    agreement = report["numpy_vs_torch"]
    assert agreement["max_relative_loss_diff"] <= 1e-9
    assert agreement["max_relative_adapter_diff"] <= 1e-9


def test_peak_memory_semantics():
    # Oracle: the bytes of nn.Linear(3, 2) in float32 counted by hand, (3 * 2 + 2) * 4 = 32.
    model = nn.Linear(3, 2)
    measured = SimpleNamespace(peak_bytes=1000, rise_bytes=100)
    assert _peak_bytes(measured, model, torch.device("cuda")) == 1000  # the allocator's peak
    assert _peak_bytes(measured, model, torch.device("cpu")) == 32 + 100  # weights + RSS rise
    unmeasurable = SimpleNamespace(peak_bytes=None, rise_bytes=None)
    assert _peak_bytes(unmeasurable, model, torch.device("cpu")) is None

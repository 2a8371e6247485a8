"""Tests for the NumPy demo (`lowrank numpy-demo`): it runs, its numbers add up, its story holds.

Oracles: parameter counts from the LoRA paper's r * (in + out) and the MLP's shapes, worked out
here; accuracies and ranks against thresholds measured over seeds 0-5 (stated below); and a
Python in which `import torch` fails, for "NumPy only".
"""

import json
import subprocess
import sys

import pytest

from lowrank.cli import main
from lowrank.commands.numpy_demo import RANKS, format_report, run_demo

SIZES = [16, 64, 64, 8]
BASE = sum(a * b + b for a, b in zip(SIZES[:-1], SIZES[1:], strict=True))  # 5,768


@pytest.fixture(scope="module")
def result() -> dict:
    return run_demo(seed=0)


def test_result_is_plain_json(result) -> None:
    assert json.loads(json.dumps(result)) == result


def test_rows_and_parameter_counts(result) -> None:
    rows = result["methods"]
    assert [row["method"] for row in rows] == ["full fine-tuning"] + [f"LoRA r={r}" for r in RANKS]
    assert result["total_parameters"] == BASE
    assert rows[0]["trainable"] == BASE and rows[0]["share"] == 1.0
    for row, r in zip(rows[1:], RANKS, strict=True):
        lora = sum(r * (a + b) for a, b in zip(SIZES[:-1], SIZES[1:], strict=True))
        assert row["trainable"] == lora
        assert row["share"] == pytest.approx(lora / (BASE + lora))


def test_the_story_holds_for_seed_0(result) -> None:
    # Measured over seeds 0-5: before 0.46-0.55, full fine-tuning 0.91-0.93, every LoRA rank
    # within 0.014 of full fine-tuning; layer 0's update has energy rank 2 on every seed.
    rows = result["methods"]
    assert result["pretrained_accuracy"] > 0.88
    assert all(row["accuracy_before"] < 0.6 for row in rows)
    full = rows[0]["accuracy_after"]
    assert full > 0.88
    for row in rows[1:]:
        assert row["accuracy_after"] > full - 0.03, row["method"]
    updates = {u["layer"]: u for u in result["full_ft_update"]}
    assert list(updates) == ["layers.0", "layers.2", "layers.4"]
    assert [updates[name]["shape"] for name in updates] == [[64, 16], [64, 64], [8, 64]]
    assert updates["layers.0"]["energy_rank_90"] <= 3
    assert all(1 <= u["energy_rank_90"] <= u["max_rank"] for u in updates.values())


def test_report_shows_every_row(result) -> None:
    report = format_report(result)
    for row in result["methods"]:
        assert row["method"] in report
        assert f"{row['trainable']:,}" in report
        assert f"{row['accuracy_after']:.1%}" in report
    assert "generated data" in report
    assert "energy rank (90%)" in report


def test_cli_prints_the_same_report_again(result, capsys) -> None:
    # A second, independent run through the CLI: seeded, so identical up to the timing line.
    assert main(["numpy-demo", "--seed", "0"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    expected = format_report(result).splitlines()
    assert printed[:-1] == expected[:-1]
    assert printed[-1].startswith("  finished in")


def test_runs_with_numpy_only():
    # Oracle: a fresh interpreter in which importing torch raises ImportError. The command's
    # whole path (the CLI, the job, lowrank.numpy) must import without it; --help exits 0.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from lowrank.cli import build_parser\n"
        "import lowrank.commands.numpy_demo\n"
        "build_parser().parse_args(['numpy-demo', '--help'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--seed" in done.stdout

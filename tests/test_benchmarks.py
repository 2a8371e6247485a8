"""The benchmark harness runs end to end in --quick mode and writes its files.

No timing is asserted: shared CI machines are too noisy for that (docs/benchmarks.md).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_table_json_and_plots(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("OMP_NUM_THREADS", None)  # the harness's own threads, as a user runs it
    done = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    md = (tmp_path / "latest.md").read_text()
    data = json.loads((tmp_path / "latest.json").read_text())
    assert "| row |" in md and "ours/theirs" in md
    groups = {row["group"] for row in data["rows"]}
    assert {"quant", "numpy", "lora", "qlora", "step"} <= groups
    for row in data["rows"]:
        assert row["times"]["lowrank"]["median_s"] > 0, row["name"]
        assert row["floor_s"] is None or row["floor_s"] > 0, row["name"]
    assert set(data["scaling"]) == {"r", "width", "tokens"}
    for name in ("ratios.png", "scaling_time.png", "scaling_memory.png"):
        assert (tmp_path / name).stat().st_size > 0
    # every missed time target has its profile
    for name in data["meta"]["profiles"]:
        assert "== torch.profiler (ops) ==" in (tmp_path / name).read_text()


def test_only_and_bad_section(tmp_path):
    done = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--only", "nonsense", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "unknown sections" in done.stderr

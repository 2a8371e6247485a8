"""`lowrank resize` through `lowrank.cli.main`: the folder it writes, the table and JSON it
prints (checked against NumPy's dense SVD of the update built here), and one-line errors
with exit status 2."""

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from lowrank.cli import main
from lowrank.torch import add_lora, lora_layers, save_adapter


@pytest.fixture
def adapter(tmp_path):
    """Two float64 layers with r = 4; returns the folder and each layer's update s B A."""
    model = nn.Sequential(OrderedDict(q=nn.Linear(10, 12), v=nn.Linear(10, 10))).double()
    add_lora(model, ["q", "v"], r=4, alpha=8)
    generator = torch.Generator().manual_seed(0)
    updates = {}
    with torch.no_grad():
        for name, layer in lora_layers(model):
            layer.A["default"].copy_(torch.randn(4, 10, generator=generator))
            layer.B["default"].copy_(torch.randn(layer.out_features, 4, generator=generator))
            updates[name] = layer.delta_weight("default").numpy()
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", updates


def test_the_table_and_json_show_the_eckart_young_errors(adapter, tmp_path, capsys):
    folder, updates = adapter
    assert main(["resize", str(folder), "--rank", "2", "--out", str(tmp_path / "r2")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"resized {folder} to rank 2 -> {tmp_path / 'r2'}")
    assert lines[1].split() == ["layer", "r", "->", "r'", "||s", "B", "A||_F", "||error||_F",
                                "Eckart-Young", "relative"]  # fmt: skip
    assert [line.split()[:4] for line in lines[2:]] == [
        ["q", "4", "->", "2"],
        ["v", "4", "->", "2"],
    ]
    assert (tmp_path / "r2" / "adapter_model.safetensors").is_file()
    argv = ["resize", str(folder), "--energy", "0.95", "--out", str(tmp_path / "e"), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["energy"] == 0.95 and report["rank"] is None
    for row in report["layers"]:
        s = np.linalg.svd(updates[row["name"]], compute_uv=False)
        assert row["new_rank"] == int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= 0.95)) + 1
        tail = np.sqrt(np.sum(s[row["new_rank"] :] ** 2))
        assert row["bound"] == pytest.approx(tail, rel=1e-9, abs=1e-12)
        assert row["error"] == pytest.approx(tail, rel=1e-8, abs=1e-10 * s[0])
        assert row["relative_error"] == pytest.approx(tail / np.linalg.norm(s), rel=1e-8, abs=1e-12)


def test_a_rank_above_the_adapters_is_capped_with_a_note(adapter, tmp_path, capsys):
    folder, _ = adapter
    assert main(["resize", str(folder), "--rank", "16", "--out", str(tmp_path / "r16")]) == 0
    out = capsys.readouterr().out
    assert "4 ->  4*" in out and "it keeps its rank (resize never adds rank)" in out


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--rank", "0"], "--rank: must be a positive integer"),
        (["--energy", "1.5"], "--energy: must be a share in (0, 1]"),
        (["--energy", "0"], "--energy: must be a share in (0, 1]"),
        (["--rank", "2", "--energy", "0.9"], "not allowed with argument"),
        ([], "one of the arguments --rank --energy is required"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(adapter, tmp_path, capsys, extra, words):
    folder, _ = adapter
    with pytest.raises(SystemExit) as done:
        main(["resize", str(folder), "--out", str(tmp_path / "o"), *extra])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowrank: error: ") and words in err


def test_a_folder_that_is_no_adapter_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["resize", str(tmp_path / "empty"), "--rank", "2", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is no PEFT adapter" in err
    assert not (tmp_path / "o").exists()

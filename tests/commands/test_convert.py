"""`lowrank convert` from the command line: the proof is printed, the folder loads in PEFT,
bad input is one line with exit status 2 and writes nothing. Oracles: PEFT's
`PeftModel.from_pretrained` on the folder, with loralib's formula applied by hand."""

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn

from lowrank.cli import main


def test_prints_the_proof_and_peft_loads_it(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 8, generator=g), torch.randn(4, 2, generator=g)
    torch.save({"0.lora_A": A, "0.lora_B": B, "0.weight": torch.zeros(4, 8)}, tmp_path / "l.pt")
    out = tmp_path / "peft"
    assert main(["convert", str(tmp_path / "l.pt"), "--out", str(out), "--alpha", "6"]) == 0
    text = capsys.readouterr().out
    assert "max |difference|" in text and "the outputs agree" in text
    base = nn.Sequential(nn.Linear(8, 4)).double()
    x = torch.randn(3, 8, dtype=torch.float64, generator=g)
    model = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    expected = base(x) + (x @ A.double().T @ B.double().T) * 6 / 2  # loralib's forward
    assert (model(x) - expected).abs().max() <= 1e-12  # float64 rounding only


def test_bad_inputs_one_line_nothing_written(tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "mlx").mkdir()
    save_file({"q.lora_a": torch.ones(8, 2)}, tmp_path / "mlx" / "adapters.safetensors")
    config = {"fine_tune_type": "lora", "lora_parameters": {"rank": 2, "scale": 20.0}}
    (tmp_path / "mlx" / "adapter_config.json").write_text(json.dumps(config))
    config["fine_tune_type"] = "dora"
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(config))
    save_file({"q.lora_a": torch.ones(8, 2)}, tmp_path / "dora" / "adapters.safetensors")
    cases = {
        "mlx": "q.lora_a has no matching lora_b",
        "dora": "fine_tune_type='dora' is not supported",
        ".": "none of the adapter formats",
    }
    for source, message in cases.items():
        assert main(["convert", str(tmp_path / source), "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert error.startswith("lowrank: error: ") and message in error and error.count("\n") == 1
    with pytest.raises(SystemExit) as exit_status:  # argparse's own check: exits
        main(["convert", str(tmp_path / "mlx"), "--out", str(out), "--convention", "x"])
    assert exit_status.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not out.exists()

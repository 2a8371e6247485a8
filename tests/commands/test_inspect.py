"""`lowrank inspect` from the command line: the text table, --json, --plot, and bad input as
one line with exit status 2. Oracle: the library's report on the same file, the PNG header."""

import json

import torch

from lowrank.cli import main
from lowrank.torch.adapter_report import inspect_adapter


def loralib_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"q.lora_A": torch.randn(2, 8, generator=g), "q.lora_B": torch.randn(4, 2, generator=g)}
    torch.save(state, tmp_path / "lora.pt")
    return tmp_path / "lora.pt"


def test_text_json_and_plot(tmp_path, capsys):
    path = loralib_file(tmp_path)
    assert main(["inspect", str(path), "--alpha", "4", "--plot", str(tmp_path / "s.png")]) == 0
    text = capsys.readouterr().out
    assert (
        "loralib" in text
        and "s = alpha / r" in text
        and all(len(x) < 100 for x in text.splitlines())
    )
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["inspect", str(path), "--from", "loralib", "--alpha", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(json.dumps(inspect_adapter(path, alpha=4).to_dict()))


def test_bad_input_is_one_line(tmp_path, capsys):
    path = loralib_file(tmp_path)
    assert main(["inspect", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("lowrank: error: ") and "lora_alpha" in error and error.count("\n") == 1
    assert main(["inspect", str(tmp_path)]) == 2
    assert "none of the adapter formats" in capsys.readouterr().err

"""Tests for lowrank.torch.peft_format: PEFT-layout adapter files written (and read back by
lowrank and by PEFT), the folder changed as a unit. (Loading: test_peft_load.py; PEFT itself is
the oracle in tests/interop/test_peft.py.)

Oracles: the files' raw contents (JSON, safetensors read directly), PEFT reading them.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from toy_models import IDS, make_model, randomize, two_adapters

import lowrank.torch.peft_format as peft_format
from lowrank.torch import (
    add_lora,
    load_adapter,
    lora_state_dict,
    save_adapter,
    set_active_adapter,
)


def test_save_writes_the_peft_layout(tmp_path):
    model = two_adapters()
    save_adapter(model, tmp_path, "b")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 5
    assert config["use_rslora"] is True and config["bias"] == "none"
    assert config["target_modules"] == ["1", "3", "4"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(
        f"base_model.model.{i}.lora_{f}.weight" for i in (1, 3, 4) for f in "AB"
    )
    assert torch.equal(tensors["base_model.model.3.lora_A.weight"], model[3].A["b"])  # (r, in)
    assert tensors["base_model.model.3.lora_B.weight"].shape == (6, 3)  # (out, r)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]  # no temporary files left behind
    embedding = lora_state_dict(model, "default")
    assert embedding["base_model.model.0.lora_embedding_A"].shape == (2, 13)
    assert embedding["base_model.model.0.lora_embedding_B"].shape == (8, 2)


def test_save_and_load_round_trip_with_patterns(tmp_path):
    model = add_lora(
        make_model(),
        ["0", "1", "3", "4"],
        r=2,
        alpha=3,
        rank_pattern={"3": 4},
        alpha_pattern={"4": 7.5},
    )
    randomize(model, "default", 3)
    save_adapter(model, tmp_path)
    fresh = load_adapter(make_model(), tmp_path)
    torch.testing.assert_close(fresh(IDS), model(IDS), rtol=0, atol=0)
    assert fresh[3].r["default"] == 4 and fresh[4].alpha["default"] == 7.5
    # loading into an existing adapter of the same name overwrites its factors
    target = add_lora(make_model(), ["0", "1", "3", "4"], r=2, rank_pattern={"3": 4})
    load_adapter(target, tmp_path)
    torch.testing.assert_close(target(IDS), model(IDS), rtol=0, atol=0)
    # and under another name next to an existing adapter, inactive
    other = load_adapter(two_adapters(), tmp_path, adapter_name="loaded")
    set_active_adapter(other, "loaded")
    torch.testing.assert_close(other(IDS), model(IDS), rtol=0, atol=0)


def test_failed_write_leaves_the_old_files(tmp_path, monkeypatch):
    model = two_adapters()
    save_adapter(model, tmp_path)
    old = (tmp_path / "adapter_model.safetensors").read_bytes()

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(peft_format, "save_file", crash)
    randomize(model, "default", 9)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == old
    assert len(list(tmp_path.iterdir())) == 2


# ---- the folder as a unit ------------------------------------------------------------------------


def test_save_keeps_other_files_drops_an_old_pickle_and_refuses_a_link(tmp_path):
    folder = tmp_path / "run"
    save_adapter(two_adapters(), folder)
    (folder / "log.jsonl").write_text("a training log\n")
    (folder / "adapter_model.bin").write_bytes(b"an older PEFT save's weights")
    save_adapter(two_adapters(), folder, "b")
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "log.jsonl",
    ]
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (tmp_path / "link").symlink_to(folder)
    with pytest.raises(ValueError, match="link exists and is not a folder"):
        save_adapter(two_adapters(), tmp_path / "link")


# ---- PEFT reading lowrank's patterns -------------------------------------------------------------


def test_pattern_keys_for_nested_names_select_one_layer_in_peft(tmp_path):
    peft = pytest.importorskip("peft")

    # "1" is also the end of "0.1": an unanchored key would give "0.1" layer 1's rank in PEFT
    def nested():
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 4))

    ours = add_lora(nested(), ["0.0", "0.1", "1"], r=2, alpha=4, rank_pattern={"^1": 3})
    randomize(ours, "default", 2)
    assert ours[0][1].r["default"] == 2 and ours[1].r["default"] == 3
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(nested(), tmp_path)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-6, atol=1e-6)
    again = load_adapter(nested(), tmp_path)
    torch.testing.assert_close(again(x), ours(x), rtol=0, atol=0)


# ---- modules_to_save -----------------------------------------------------------------------------


def test_a_module_trained_in_full_is_saved_under_its_own_name_as_peft_saves_it(tmp_path):
    model = add_lora(make_model(), ["1", "3"], r=2, modules_to_save=["4"])
    with torch.no_grad():
        model[4].modules_to_save["default"].bias.fill_(0.5)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["4"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(
        tensors["base_model.model.4.bias"], torch.full((4,), 0.5, dtype=torch.float64)
    )
    assert tensors["base_model.model.4.weight"].shape == (4, 6)
    assert not any("modules_to_save" in key for key in tensors)  # no in-memory names
    second = add_lora(model, ["1"], r=1, adapter_name="b")  # no copies: none listed
    save_adapter(second, tmp_path / "b", "b")
    assert (
        json.loads((tmp_path / "b" / "adapter_config.json").read_text())["modules_to_save"] is None
    )


def test_a_name_peft_would_read_as_more_modules_is_refused_on_saving(tmp_path):
    # PEFT selects a module whose name ends with an entry: "0" would also select "10".
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(4, 4) for _ in range(11)))
    add_lora(model, ["1"], r=1, modules_to_save=["0"])
    with pytest.raises(ValueError, match="would also select '10' in PEFT"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()

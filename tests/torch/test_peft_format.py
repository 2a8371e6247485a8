"""Tests for lowrank.torch.peft_format: PEFT-layout adapter files written and read back,
validate-then-apply loading, rollback on failure. (PEFT itself is the oracle in
tests/interop/test_peft.py.)

Oracles: the files' raw contents (JSON, safetensors read directly), the untouched model.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from toy_models import IDS, assert_same_state, make_model, randomize, state, two_adapters

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


def corrupt(folder, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("base_model.model.3.lora_B.weight"), "missing .*3.lora_B"),
        (lambda t: t.update({"base_model.model.9.lora_A.weight": torch.zeros(2, 2)}), "9.lora_A"),
        (
            lambda t: t.update({"base_model.model.3.lora_A.weight": torch.zeros(2, 11)}),
            r"3: A \(2, 11\)",
        ),
        (
            lambda t: t.update({"base_model.model.4.lora_B.weight": torch.zeros(4, 3)}),
            r"4: A \(2, 6\), B \(4, 3\)",
        ),
    ],
)
def test_a_load_that_does_not_fit_changes_nothing(tmp_path, edit, message):
    source = add_lora(make_model(), ["0", "1", "3", "4"], r=2)
    save_adapter(source, tmp_path)
    corrupt(tmp_path, edit)
    for model in (make_model(), two_adapters()):
        before = state(model)
        with pytest.raises(ValueError, match=message):
            load_adapter(model, tmp_path, adapter_name="new")
        assert_same_state(before, state(model))


def test_load_rejects_other_peft_methods_and_other_models(tmp_path):
    source = add_lora(make_model(), ["1", "3"], r=2)
    save_adapter(source, tmp_path)
    wider = nn.Sequential(nn.Embedding(13, 8), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6))
    before = state(wider)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(wider, tmp_path)
    assert_same_state(before, state(wider))
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(make_model(), tmp_path)


def test_a_failure_while_changing_the_model_is_rolled_back(tmp_path, monkeypatch):
    source = add_lora(make_model(), ["0", "1", "3", "4"], r=2)
    randomize(source, "default", 4)
    save_adapter(source, tmp_path)
    model = add_lora(make_model(), ["1"], r=3, adapter_name="kept")
    before = state(model)
    original = peft_format.add_lora

    def add_then_fail(*args, **kwargs):
        original(*args, **kwargs)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(peft_format, "add_lora", add_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_adapter(model, tmp_path)
    assert_same_state(before, state(model))
    assert copy.deepcopy(model)(IDS).shape == (2, 3, 4)


@pytest.mark.cuda
def test_save_on_cuda_load_on_cpu_and_back(tmp_path):
    model = two_adapters().cuda()
    save_adapter(model, tmp_path, "b")
    on_cpu = load_adapter(make_model(), tmp_path, "b")
    set_active_adapter(model, "b")
    torch.testing.assert_close(on_cpu(IDS), model(IDS.cuda()).cpu(), rtol=1e-9, atol=1e-9)
    on_cuda = load_adapter(make_model().cuda(), tmp_path, "b")
    assert on_cuda[1].A["b"].device.type == "cuda"
    torch.testing.assert_close(on_cuda(IDS.cuda()), model(IDS.cuda()), rtol=0, atol=0)


def test_a_qlora_adapter_loads_onto_a_4bit_or_a_full_precision_base(tmp_path):
    model = add_lora(make_model().float(), ["1", "3"], r=2, quant_type="nf4")
    randomize(model, "default", 5)
    save_adapter(model, tmp_path)
    again = load_adapter(
        add_lora(make_model().float(), ["1", "3"], r=2, quant_type="nf4"), tmp_path
    )
    torch.testing.assert_close(again(IDS), model(IDS), rtol=0, atol=0)
    full = load_adapter(make_model().float(), tmp_path)
    assert torch.equal(full[3].B["default"], model[3].B["default"])

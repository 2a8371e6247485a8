"""Tests for lowrank.torch.adapters: several adapters, combinations, PEFT-layout files.

Oracles: the untouched base model, weighted sums of B A written out by hand in float64,
torch.linalg.svd of the dense sum (Eckart-Young), and the files' raw contents.
"""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank.torch.adapters as adapters_module
from lowrank.torch.adapters import (
    combine_adapters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    load_adapter,
    lora_state_dict,
    save_adapter,
    set_active_adapter,
)
from lowrank.torch.lora import add_lora, lora_layers, merge_lora


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Embedding(13, 8), nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6), nn.Linear(6, 4)
    ).double()


def randomize(model: nn.Module, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.A:
                layer.A[name].copy_(torch.randn(layer.A[name].shape, generator=generator))
                layer.B[name].copy_(torch.randn(layer.B[name].shape, generator=generator))


def two_adapters() -> nn.Module:
    model = add_lora(make_model(), ["0", "1", "3"], r=2, alpha=3)
    add_lora(model, ["1", "3", "4"], r=3, alpha=5, use_rslora=True, adapter_name="b")
    randomize(model, "default", 1)
    randomize(model, "b", 2)
    return model


IDS = torch.tensor([[1, 4, 7], [12, 0, 3]])


def state(model: nn.Module) -> dict:
    """Everything a failed call must not change: module types, tensors, flags."""
    return {
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "tensors": {n: t.detach().clone() for n, t in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "active": [(n, layer.active_adapter) for n, layer in lora_layers(model)],
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert after["types"] == before["types"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][name], tensor), name
    assert after["grad"] == before["grad"] and after["active"] == before["active"]


def test_list_switch_disable_delete():
    base = make_model()
    plain = base(IDS)
    model = two_adapters()
    assert list_adapters(model) == ["default", "b"]
    with_default = model(IDS)
    set_active_adapter(model, "b")
    with_b = model(IDS)
    assert not torch.allclose(with_default, with_b)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{i}.{f}.b" for i in (1, 3, 4) for f in "AB"
    }
    with disable_adapters(model):
        torch.testing.assert_close(model(IDS), plain, rtol=0, atol=0)
    torch.testing.assert_close(model(IDS), with_b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        set_active_adapter(model, "c")
    delete_adapter(model, "b")
    assert list_adapters(model) == ["default"] and type(model[4]) is nn.Linear  # unwrapped
    set_active_adapter(model, "default")
    torch.testing.assert_close(model(IDS), with_default, rtol=0, atol=0)
    delete_adapter(model, "default")
    assert [type(m) for m in model] == [type(m) for m in base]  # back to the plain model
    torch.testing.assert_close(model(IDS), plain, rtol=0, atol=0)


def test_disable_restores_after_an_exception_and_refuses_a_merged_model():
    model = two_adapters()
    expected = model(IDS)
    with pytest.raises(KeyError), disable_adapters(model):
        raise KeyError("boom")
    torch.testing.assert_close(model(IDS), expected, rtol=0, atol=0)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="merged"), disable_adapters(model):
        pass
    with pytest.raises(RuntimeError, match="merged"):
        set_active_adapter(model, "b")


def weighted_update(layer, names, weights) -> torch.Tensor:
    """sum_i w_i s_i B_i A_i, written out with the scales recomputed from r and alpha."""
    total = 0
    for name, w in zip(names, weights, strict=True):
        if name in layer.A:
            r, alpha = layer.r[name], layer.alpha[name]
            scale = alpha / (math.sqrt(r) if layer.use_rslora[name] else r)
            total = total + w * scale * layer.B[name] @ layer.A[name]
    return total


def new_update(layer, name) -> torch.Tensor:
    assert layer.scale(name) == 1.0
    return layer.B[name] @ layer.A[name]


def test_combine_cat_is_the_exact_weighted_sum():
    model = two_adapters()
    combine_adapters(model, ["default", "b"], [0.7, -1.3], "mix", combination="cat")
    for _, layer in lora_layers(model):
        expected = weighted_update(layer, ["default", "b"], [0.7, -1.3])
        torch.testing.assert_close(new_update(layer, "mix"), expected, rtol=1e-12, atol=1e-12)
    assert model[1].r["mix"] == 5 and model[0].r["mix"] == 2 and model[4].r["mix"] == 3
    assert list_adapters(model) == ["default", "mix", "b"]  # in order of first appearance
    assert model[1].active_adapter == "default"


@pytest.mark.parametrize("r", [1, 3, 6])
def test_combine_svd_is_the_truncated_svd_of_the_weighted_sum(r):
    model = two_adapters()
    combine_adapters(model, ["default", "b"], [0.5, 2.0], "svd", combination="svd", r=r)
    layer = model[3]  # (out 6, in 12), ranks 2 + 3: the sum has rank 5
    dense = weighted_update(layer, ["default", "b"], [0.5, 2.0])
    U, S, Vh = torch.linalg.svd(dense)
    best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]  # Eckart-Young: the closest rank-r matrix
    torch.testing.assert_close(new_update(layer, "svd"), best, rtol=1e-10, atol=1e-10)
    error = torch.linalg.matrix_norm(dense - new_update(layer, "svd"))
    torch.testing.assert_close(error, S[r:].square().sum().sqrt(), rtol=1e-9, atol=1e-9)
    assert layer.A["svd"].shape == (r, 12) and layer.B["svd"].shape == (6, r)
    assert model[4].r["svd"] == min(r, 4)  # layer 4 is (4, 6): no higher rank fits


def test_combine_linear_mixes_the_factors_not_the_updates():
    model = add_lora(make_model(), ["1"], r=2, alpha=4)
    add_lora(model, ["1"], r=2, alpha=2, adapter_name="b")
    randomize(model, "default", 1)
    randomize(model, "b", 2)
    combine_adapters(model, ["default", "b"], [0.3, 0.6], "lin", combination="linear")
    layer = model[1]
    s1, s2 = 2.0, 1.0
    c1, c2 = math.sqrt(0.3 * s1), math.sqrt(0.6 * s2)
    A1, B1, A2, B2 = layer.A["default"], layer.B["default"], layer.A["b"], layer.B["b"]
    cross = c1 * c2 * (B1 @ A2 + B2 @ A1)
    expected = weighted_update(layer, ["default", "b"], [0.3, 0.6]) + cross
    torch.testing.assert_close(new_update(layer, "lin"), expected, rtol=1e-12, atol=1e-12)
    assert cross.abs().max() > 0.1  # so it really is not the weighted sum
    with pytest.raises(ValueError, match="equal ranks"):
        combine_adapters(two_adapters(), ["default", "b"], [1.0, 1.0], "x", combination="linear")


def test_combine_errors_leave_the_model_unchanged():
    model = two_adapters()
    before = state(model)
    with pytest.raises(ValueError, match="combination"):
        combine_adapters(model, ["default"], [1.0], "x", combination="ties")
    with pytest.raises(ValueError, match="one weight per adapter"):
        combine_adapters(model, ["default", "b"], [1.0], "x")
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        combine_adapters(model, ["default"], [1.0], "b", combination="cat")
    with pytest.raises(ValueError, match="rank r"):
        combine_adapters(model, ["default"], [1.0], "x", combination="svd")
    with pytest.raises(ValueError, match="square roots"):
        combine_adapters(model, ["default"], [-1.0], "x", combination="linear")
    assert_same_state(before, state(model))


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

    monkeypatch.setattr(adapters_module, "save_file", crash)
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
    original = adapters_module.add_lora

    def add_then_fail(*args, **kwargs):
        original(*args, **kwargs)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(adapters_module, "add_lora", add_then_fail)
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

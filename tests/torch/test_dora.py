"""DoRA in torch (Liu et al. 2024, arXiv:2402.09353) against the NumPy reference in float64:
forward and gradients (with the norm detached, section 4.3), merge/unmerge, add_lora hooks,
and the PEFT files (the magnitude key, refusals, rollback; PEFT itself: tests/interop).

Tolerances: both halves compute the same float64 formula with different op orders, so they
agree to a few ulps of the outputs' scale; 1e-10 leaves room and an error in the formula (a
missing factor m / n, a norm over the wrong axis) is off by order 1.
"""

import copy
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank.numpy.dora import DoRALinear as NumpyDoRA
from lowrank.torch import peft_load
from lowrank.torch.dora import DoRALinear, row_norms
from lowrank.torch.model import (
    add_lora,
    count_parameters,
    lora_layers,
    merge_lora,
    merged_copy,
    unmerge_lora,
)
from lowrank.torch.peft_format import adapter_config, lora_state_dict, save_adapter
from lowrank.torch.peft_load import load_adapter


def trained(seed=0, bias=True, dropout=0.0):
    torch.manual_seed(seed)
    layer = DoRALinear(nn.Linear(7, 5, bias=bias).double())
    layer.add_adapter("default", r=3, alpha=6, dropout=dropout)
    layer.active_adapter = "default"
    with torch.no_grad():
        layer.B["default"].normal_()
        layer.magnitude["default"].uniform_(0.5, 2.0)
    return layer


def numpy_twin(layer, detach_norm=True):
    base = layer.base_layer
    bias = None if base.bias is None else base.bias.detach().numpy()
    twin = NumpyDoRA(base.weight.detach().numpy(), bias, r=3, alpha=6, detach_norm=detach_norm)
    twin.A[...] = layer.A["default"].detach().numpy()
    twin.B[...] = layer.B["default"].detach().numpy()
    twin.magnitude[...] = layer.magnitude["default"].detach().numpy()
    return twin


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_numpy_in_float64(bias):
    layer = trained(bias=bias)
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 4, 5, dtype=torch.float64)
    y = layer(x)
    y.backward(dy)
    twin = numpy_twin(layer)
    y_np = twin.forward(x.detach().numpy())
    dx_np = twin.backward(dy.numpy())
    np.testing.assert_allclose(y.detach().numpy(), y_np, rtol=0, atol=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), dx_np, rtol=0, atol=1e-10)
    for name, grad in twin.grads().items():
        ours = getattr(layer, name)["default"].grad.numpy()
        np.testing.assert_allclose(ours, grad, rtol=0, atol=1e-10, err_msg=name)


def test_the_norm_is_detached():
    layer = trained()
    x, dy = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    layer(x).backward(dy)
    exact = numpy_twin(layer, detach_norm=False)
    exact.forward(x.numpy())
    exact.backward(dy.numpy())
    gap = np.abs(layer.B["default"].grad.numpy() - exact.grad_B).max()
    assert gap > 1e-3  # autograd did not differentiate through ||V||_c
    assert not layer.direction_norm("default").requires_grad


def test_new_adapter_is_the_identity_and_the_norm_is_over_the_input_dim():
    torch.manual_seed(0)
    base = nn.Linear(6, 4).double()
    layer = DoRALinear(base)
    layer.add_adapter("default", r=2, alpha=2)
    layer.active_adapter = "default"
    W = base.weight.detach()
    torch.testing.assert_close(layer.magnitude["default"].detach(), W.norm(dim=1))
    assert row_norms(W).shape == (4,)
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-12)


def test_merge_and_unmerge_restore_outputs_and_weights():
    layer = trained()
    W = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 7, dtype=torch.float64)
    y = layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-12)
    norms = layer.base_layer.weight.detach().norm(dim=1)
    torch.testing.assert_close(norms, layer.magnitude["default"].detach(), rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), W, rtol=0, atol=1e-12)
    assert layer.merged_norm is None


def model():
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            embed=nn.Embedding(11, 8), q=nn.Linear(8, 8), v=nn.Linear(8, 8), out=nn.Linear(8, 3)
        )
    ).double()


def test_add_lora_use_dora_merges_and_counts_the_magnitude():
    net = add_lora(model(), ["q", "v"], r=2, alpha=4, use_dora=True)
    assert [type(layer).__name__ for _, layer in lora_layers(net)] == ["DoRALinear"] * 2
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == [f"{n}.{p}.default" for n in "qv" for p in ("A", "B", "magnitude")]
    assert count_parameters(net)[0] == 2 * (2 * (8 + 8) + 8)
    for _, layer in lora_layers(net):
        with torch.no_grad():
            layer.B["default"].normal_()
            layer.magnitude["default"].mul_(1.5)
    ids = torch.tensor([[1, 2, 3, 4]])
    y = net(ids).detach()
    torch.testing.assert_close(merged_copy(net)(ids), y, rtol=0, atol=1e-12)
    merge_lora(net)
    torch.testing.assert_close(net(ids), y, rtol=0, atol=1e-12)
    unmerge_lora(net)
    torch.testing.assert_close(net(ids), y, rtol=0, atol=1e-12)


def test_dora_on_a_4bit_base_and_merged_copy():
    torch.manual_seed(0)
    net = add_lora(
        nn.Sequential(OrderedDict(q=nn.Linear(64, 64))),
        ["q"],
        r=4,
        quant_type="nf4",
        use_dora=True,
    )
    with torch.no_grad():
        net.q.B["default"].normal_(std=0.05)
    x = torch.randn(2, 64)
    plain = merged_copy(net)
    assert type(plain.q).__name__ == "Linear"
    torch.testing.assert_close(plain(x), net(x), rtol=0, atol=1e-4)  # float32 op order


def test_use_dora_refusals_change_nothing():
    net = model()
    with pytest.raises(ValueError, match="Linear layers only"):
        add_lora(net, ["embed", "q"], r=2, use_dora=True)
    assert not list(lora_layers(net))
    add_lora(net, ["q"], r=2)
    with pytest.raises(ValueError, match="holds plain LoRA adapters"):
        add_lora(net, ["q"], r=2, use_dora=True, adapter_name="second")
    with pytest.raises(TypeError, match="use_dora"):
        add_lora(model(), ["q"], use_dora="yes")


def test_delete_adapter_removes_the_magnitude():
    layer = trained()
    layer.add_adapter("other", r=2, alpha=2)
    layer.delete_adapter("other")
    assert list(layer.magnitude) == ["default"]


def test_peft_files_round_trip_and_refusals(tmp_path):
    net = add_lora(model(), ["q", "v"], r=2, alpha=4, use_dora=True)
    with torch.no_grad():
        net.q.magnitude["default"].mul_(1.5)
        net.v.B["default"].normal_()
    assert adapter_config(net)["use_dora"] is True
    assert lora_state_dict(net)["base_model.model.q.lora_magnitude_vector"].shape == (8,)
    save_adapter(net, tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    loaded = load_adapter(model(), tmp_path)
    torch.testing.assert_close(loaded(ids), net(ids), rtol=0, atol=0)
    # a wrong magnitude shape, or a plain-LoRA layer in the way: refused, nothing changed
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    good = dict(tensors)
    tensors["base_model.model.q.lora_magnitude_vector"] = torch.ones(3, dtype=torch.float64)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"lora_magnitude_vector: shape \(3,\)"):
        load_adapter(model(), tmp_path)
    save_file(good, weights)
    plain = add_lora(model(), ["q", "v"], r=2, alpha=4)
    with pytest.raises(ValueError, match="holds plain LoRA adapters"):
        load_adapter(plain, tmp_path, adapter_name="second")
    assert list(plain.q.A) == ["default"]
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"target_modules": ["embed", "q", "v"]}))
    good["base_model.model.embed.lora_embedding_A"] = torch.zeros(2, 11, dtype=torch.float64)
    good["base_model.model.embed.lora_embedding_B"] = torch.zeros(8, 2, dtype=torch.float64)
    save_file(good, weights)
    with pytest.raises(ValueError, match="Linear layers only"):
        load_adapter(model(), tmp_path)
    mixed = add_lora(add_lora(model(), ["q"], r=2, use_dora=True), ["v"], r=2)
    with pytest.raises(ValueError, match="use_dora"):
        adapter_config(mixed)


def test_a_failed_load_into_an_existing_dora_adapter_restores_the_magnitude(tmp_path, monkeypatch):
    source = add_lora(model(), ["q", "v"], r=2, alpha=4, use_dora=True)
    with torch.no_grad():
        source.q.magnitude["default"].mul_(3.0)
    save_adapter(source, tmp_path)
    target = add_lora(model(), ["q", "v"], r=2, alpha=4, use_dora=True)
    before = target.q.magnitude["default"].detach().clone()

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(peft_load, "install_copies", fail)  # after the magnitudes are copied
    with pytest.raises(RuntimeError, match="out of memory"):
        load_adapter(target, tmp_path)
    torch.testing.assert_close(target.q.magnitude["default"].detach(), before, rtol=0, atol=0)


def test_tools_that_read_plain_lora_refuse_dora(tmp_path):
    """save/load_trainable keep DoRA's magnitudes; combine_adapters, resize, inspect/convert and
    the merge audit, whose maths is W + sBA, refuse a DoRA adapter by name."""
    from lowrank.torch import add_lora, combine_adapters, load_trainable, save_trainable
    from lowrank.torch.adapter_files import read_adapter
    from lowrank.torch.merge_audit import merge_audit
    from lowrank.torch.resize import resize_adapter

    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), out=nn.Linear(8, 2)))
    model = add_lora(copy.deepcopy(base), ["q"], r=2, use_dora=True)
    with torch.no_grad():
        model.q.B["default"].normal_()
        model.q.magnitude["default"].mul_(1.5)
    save_trainable(model, tmp_path / "dora")
    again = load_trainable(
        add_lora(copy.deepcopy(base), ["q"], r=2, use_dora=True), tmp_path / "dora"
    )
    assert torch.equal(again.q.magnitude["default"], model.q.magnitude["default"])
    with pytest.raises(ValueError, match="DoRA"):
        combine_adapters(model, ["default"], [1.0], "mix")
    with pytest.raises(ValueError, match="DoRA"):
        resize_adapter(tmp_path / "dora", tmp_path / "small", rank=1)
    with pytest.raises(ValueError, match="DoRA"):
        read_adapter(tmp_path / "dora")
    with pytest.raises(ValueError, match="DoRA"):
        merge_audit(base, tmp_path / "dora", [torch.randn(4, 8)])

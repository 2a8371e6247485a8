"""Tests for lowrank.torch.pissa: PiSSA / OLoRA against the NumPy mirror in float64, on every
layer kind they apply to, and their errors. PEFT is the oracle in tests/interop/test_pissa_peft.py.

Oracles: `lowrank.numpy.pissa` on the same float64 weights (a separate implementation on
NumPy's LAPACK; SVD and QR are unique up to the signs of singular vector pairs / of Q's columns
and R's rows, so factors are compared after fixing those signs), and the model's outputs
before the change. Tolerance 1e-10: float64 products of numbers of size ~1.
"""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowrank.numpy import MLP
from lowrank.numpy import add_lora as np_add_lora
from lowrank.numpy import lora_layers as np_lora_layers
from lowrank.numpy import pissa as np_pissa
from lowrank.torch import add_lora, lora_layers, merge_lora
from lowrank.torch.pissa import olora_init, pissa_init, plain_lora_copy

TOL = dict(rtol=1e-10, atol=1e-10)
INITS = {"pissa": (pissa_init, np_pissa.pissa_init), "olora": (olora_init, np_pissa.olora_init)}


class Net(nn.Module):
    """The torch twin of numpy's MLP([12, 10, 6]): the same parameter names."""

    def __init__(self, numpy_model: MLP) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6)).double()
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                parameter.copy_(torch.from_numpy(numpy_model.parameters()[name]))

    def forward(self, x):
        return self.layers(x)


def signs(B: torch.Tensor, B_ref: torch.Tensor) -> torch.Tensor:
    """+-1 per column of B that makes it point as B_ref's does."""
    return torch.sign((B * B_ref).sum(dim=0))


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("init", sorted(INITS))
def test_matches_the_numpy_mirror_in_float64(init, use_rslora):
    reference = MLP([12, 10, 6], rng=np.random.default_rng(3))
    ours = add_lora(Net(reference), ["layers.0", "layers.2"], r=3, alpha=5, use_rslora=use_rslora)
    reference = np_add_lora(reference, r=3, alpha=5, use_rslora=use_rslora)
    x = torch.randn(4, 12, dtype=torch.float64)
    before = ours(x)
    initial = INITS[init][0](ours)
    np_initial = INITS[init][1](reference)
    for (name, layer), (np_name, np_layer) in zip(
        lora_layers(ours), np_lora_layers(reference), strict=True
    ):
        assert name == np_name and layer.A["default"].dtype == torch.float64
        A_ref, B_ref = torch.from_numpy(np_layer.A), torch.from_numpy(np_layer.B)
        s = signs(layer.B["default"], B_ref)
        torch.testing.assert_close(layer.B["default"] * s, B_ref, **TOL)
        torch.testing.assert_close(layer.A["default"] * s[:, None], A_ref, **TOL)
        torch.testing.assert_close(layer.base_weight(), torch.from_numpy(np_layer.weight), **TOL)
        torch.testing.assert_close(
            initial[name][0] * s[:, None], torch.from_numpy(np_initial[np_name][0]), **TOL
        )
    torch.testing.assert_close(ours(x), before, **TOL)


@pytest.mark.parametrize("init", sorted(INITS))
def test_conv1d_round_trip(init):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(attn=Conv1D(12, 8)))  # W stored [in=8, out=12]
    W = model.attn.weight.detach().clone()
    model = add_lora(model, ["attn"], r=2, alpha=4)
    x = torch.randn(3, 8)
    before = model(x)
    initial = INITS[init][0](model)
    assert model.attn.A["default"].shape == (2, 8) and model.attn.B["default"].shape == (12, 2)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)  # float32 rounding
    with torch.no_grad():
        model.attn.B["default"].add_(0.1)  # as if trained
    plain = plain_lora_copy(model, initial)
    torch.testing.assert_close(plain.attn.base_layer.weight, W, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)


def test_only_the_named_adapter_and_errors_change_nothing():
    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), v=nn.Linear(8, 8), emb=nn.Embedding(5, 8)))
    model = add_lora(base, ["q", "v"], r=2)
    model.v.base_layer.weight.data[0, 0] = float("nan")
    q_weight = model.q.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="'v'.*not finite"):
        pissa_init(model)
    torch.testing.assert_close(model.q.base_layer.weight, q_weight)  # q was not touched first
    with pytest.raises(ValueError, match="no LoRA layer holds adapter 'other'"):
        olora_init(model, "other")
    embedded = add_lora(nn.Sequential(OrderedDict(emb=nn.Embedding(5, 8))), ["emb"], r=2)
    with pytest.raises(ValueError, match="Linear and Conv1D"):
        pissa_init(embedded)
    merged = merge_lora(add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 8))), ["q"], r=2))
    with pytest.raises(ValueError, match="merged"):
        pissa_init(merged)
    fine = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 8))), ["q"], r=2)
    A0, B0 = pissa_init(fine)["q"]
    with pytest.raises(ValueError, match="do not match"):
        plain_lora_copy(fine, {"q": (A0[:1], B0)})
    with pytest.raises(ValueError, match="without the adapter"):
        plain_lora_copy(fine, {"k": (A0, B0)})


def test_a_4bit_base_holds_the_quantized_residual():
    torch.manual_seed(0)
    model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(64, 64))), ["q"], r=4, quant_type="nf4")
    x = torch.randn(3, 64)
    before = model(x)
    pissa_init(model)
    after = model(x)
    # NF4 rounds the residual, whose entries are smaller than W's: close, not equal
    assert (after - before).abs().max() < 0.1 * before.abs().max()

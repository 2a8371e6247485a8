"""lowrank's LoRA layers against microsoft's loralib (the LoRA paper's own code).

Same weights and factors in float64: same outputs, same gradients for x, A and B, and the
same merged weight (loralib merges when a layer goes to eval mode). float64 and a handful of
small matmuls in the same order: we expect agreement to ~1e-15 and allow 1e-12.
"""

import loralib
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowrank.torch import add_lora

TOL = {"rtol": 1e-12, "atol": 1e-12}


def copy_factors(theirs, ours) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        theirs.lora_A.copy_(torch.randn(theirs.lora_A.shape, generator=generator))
        theirs.lora_B.copy_(torch.randn(theirs.lora_B.shape, generator=generator))
        ours.A["default"].copy_(theirs.lora_A)
        ours.B["default"].copy_(theirs.lora_B)


def check_same(theirs, ours, x) -> None:
    theirs.train()  # loralib adds the update unmerged in train mode
    x_theirs, x_ours = x.clone().requires_grad_(x.is_floating_point()), x.clone()
    x_ours.requires_grad_(x.is_floating_point())
    y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
    torch.testing.assert_close(y_ours, y_theirs, **TOL)
    dy = torch.randn(y_ours.shape, dtype=y_ours.dtype, generator=torch.Generator().manual_seed(1))
    y_theirs.backward(dy)
    y_ours.backward(dy)
    torch.testing.assert_close(ours.A["default"].grad, theirs.lora_A.grad, **TOL)
    torch.testing.assert_close(ours.B["default"].grad, theirs.lora_B.grad, **TOL)
    if x.is_floating_point():
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, **TOL)
    theirs.eval()  # loralib merges here
    ours.merge()
    torch.testing.assert_close(ours.base_layer.weight, theirs.weight, **TOL)


@pytest.mark.parametrize("r", [1, 4])
def test_linear_matches_loralib(r):
    theirs = loralib.Linear(6, 5, r=r, lora_alpha=7).double()
    base = nn.Linear(6, 5).double()
    base.load_state_dict({"weight": theirs.weight, "bias": theirs.bias})
    ours = add_lora(nn.ModuleDict({"layer": base}), ["layer"], r=r, alpha=7)["layer"]
    copy_factors(theirs, ours)
    check_same(theirs, ours, torch.randn(3, 2, 6, dtype=torch.float64))


def test_conv1d_matches_loralib_fan_in_fan_out():
    theirs = loralib.Linear(6, 5, r=3, lora_alpha=2, fan_in_fan_out=True).double()
    base = Conv1D(5, 6).double()  # weight stored (in, out), like loralib's fan_in_fan_out
    with torch.no_grad():
        base.weight.copy_(theirs.weight)
        base.bias.copy_(theirs.bias)
    ours = add_lora(nn.ModuleDict({"layer": base}), ["layer"], r=3, alpha=2)["layer"]
    copy_factors(theirs, ours)
    check_same(theirs, ours, torch.randn(4, 6, dtype=torch.float64))


def test_embedding_matches_loralib():
    theirs = loralib.Embedding(10, 4, r=2, lora_alpha=3, padding_idx=0).double()
    base = nn.Embedding(10, 4, padding_idx=0).double()
    base.load_state_dict({"weight": theirs.weight})
    ours = add_lora(nn.ModuleDict({"layer": base}), ["layer"], r=2, alpha=3)["layer"]
    copy_factors(theirs, ours)
    check_same(theirs, ours, torch.tensor([[0, 3, 9], [2, 2, 0]]))

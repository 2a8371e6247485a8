"""lowrank.torch.lora.LoRALinear against the NumPy reference lowrank.numpy.lora.LoRALinear.

Same W, b, A, B and inputs in float64: the PyTorch layer's forward and autograd gradients
(dx, dA, dB) must equal the reference's hand-written forward and backward to a relative
difference of 1e-12 (float64 carries ~1e-16; a few matmuls of small sizes stay far below).
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank.numpy.lora import LoRALinear as NumpyLoRALinear
from lowrank.torch import add_lora


def relative_difference(ours: torch.Tensor, reference: np.ndarray) -> float:
    ours = ours.detach().numpy()
    return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-300))


def pair(in_features, out_features, r, alpha, use_rslora, bias, seed):
    """The same LoRA layer twice: NumPy reference and a wrapped torch nn.Linear."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out_features, in_features))
    b = rng.standard_normal(out_features) if bias else None
    reference = NumpyLoRALinear(W, b, r=r, alpha=alpha, use_rslora=use_rslora, rng=rng)
    reference.B = rng.standard_normal((out_features, r))  # a trained adapter, not B = 0
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(W))
        if bias:
            linear.bias.copy_(torch.from_numpy(b))
    layer = add_lora(
        nn.ModuleDict({"layer": linear}), ["layer"], r=r, alpha=alpha, use_rslora=use_rslora
    )["layer"]
    with torch.no_grad():
        layer.A["default"].copy_(torch.from_numpy(reference.A))
        layer.B["default"].copy_(torch.from_numpy(reference.B))
    return reference, layer


@settings(max_examples=25, deadline=None)
@given(
    in_features=st.integers(1, 9),
    out_features=st.integers(1, 9),
    data=st.data(),
    alpha=st.floats(0.1, 64),
    use_rslora=st.booleans(),
    bias=st.booleans(),
    leading=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    seed=st.integers(0, 2**31),
)
def test_forward_and_gradients_equal_the_numpy_reference(
    in_features, out_features, data, alpha, use_rslora, bias, leading, seed
):
    r = data.draw(st.integers(1, min(in_features, out_features)))
    reference, layer = pair(in_features, out_features, r, alpha, use_rslora, bias, seed)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((*leading, in_features))
    dy = rng.standard_normal((*leading, out_features))

    y_reference = reference.forward(x, training=True)
    dx_reference = reference.backward(dy)
    x_torch = torch.from_numpy(x).requires_grad_(True)
    y = layer(x_torch)
    y.backward(torch.from_numpy(dy))

    assert relative_difference(y, y_reference) <= 1e-12
    assert relative_difference(x_torch.grad, dx_reference) <= 1e-12
    assert relative_difference(layer.A["default"].grad, reference.grad_A) <= 1e-12
    assert relative_difference(layer.B["default"].grad, reference.grad_B) <= 1e-12
    assert layer.base_layer.weight.grad is None  # frozen in both


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_weights_equal_the_numpy_reference(use_rslora):
    reference, layer = pair(7, 5, 3, 6.0, use_rslora, True, seed=3)
    reference.merge()
    layer.merge()
    np.testing.assert_allclose(
        layer.base_layer.weight.detach().numpy(), reference.weight, rtol=1e-12, atol=1e-12
    )
    reference.unmerge()
    layer.unmerge()
    np.testing.assert_allclose(
        layer.base_layer.weight.detach().numpy(), reference.weight, rtol=1e-12, atol=1e-12
    )

"""NumPy reference vs PyTorch: identical 4-bit codes, scales and float32 dequantized values;
QLoRA forward and backward equal in float64 (the torch side through autograd)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowrank.numpy import quant as np_quant
from lowrank.numpy.qlora import QLoRALinear
from lowrank.torch import quant as torch_quant
from lowrank.torch.qlora import Linear4bit


def quantize_both(w: np.ndarray, **kwargs):
    return np_quant.quantize_4bit(w, **kwargs), torch_quant.quantize_4bit(
        torch.from_numpy(w), **kwargs
    )


def assert_same(q_np, q_torch):
    np.testing.assert_array_equal(q_np.packed, q_torch.packed.numpy())
    np.testing.assert_array_equal(q_np.absmax, q_torch.absmax.numpy())
    assert q_np.shape == q_torch.shape and q_np.nbytes == q_torch.nbytes
    if q_np.double_quant:
        np.testing.assert_array_equal(q_np.absmax2, q_torch.absmax2.numpy())
        assert q_np.offset == q_torch.offset.item()
    out_np = np_quant.dequantize_4bit(q_np)
    out_torch = torch_quant.dequantize_4bit(q_torch)
    # identical float32 bits (the torch result is cast to q.dtype, float32 here)
    np.testing.assert_array_equal(out_np.view(np.uint32), out_torch.numpy().view(np.uint32))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_numpy_and_torch_identical(quant_type, double_quant):
    rng = np.random.default_rng(0)
    for shape, blocksize in [((1,), 64), ((5,), 2), ((129,), 64), ((33, 77), 32),
                             ((300, 200), 64), ((70000,), 16), ((3, 4, 500), 4096)]:  # fmt: skip
        w = (rng.standard_normal(shape) * rng.exponential(size=shape)).astype(np.float32)
        w.reshape(-1)[: w.size // 5] = 0  # all-zero blocks
        kwargs = dict(blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
        assert_same(
            np_quant.quantize_4bit(w, **kwargs),
            torch_quant.quantize_4bit(torch.from_numpy(w), **kwargs),
        )


@settings(max_examples=50, deadline=None)
@given(
    w=hnp.arrays(
        np.float32,
        st.integers(1, 700),
        elements=st.floats(allow_nan=False, allow_infinity=False, width=32, allow_subnormal=False),
    ),
    blocksize=st.sampled_from([1, 4, 64, 512]),
    quant_type=st.sampled_from(["nf4", "fp4", "int4"]),
    double_quant=st.booleans(),
)
def test_numpy_and_torch_identical_property(w, blocksize, quant_type, double_quant):
    kwargs = dict(blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    assert_same(
        np_quant.quantize_4bit(w, **kwargs),
        torch_quant.quantize_4bit(torch.from_numpy(w), **kwargs),
    )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qlora_forward_backward_float64(quant_type):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((24, 40))
    b = rng.standard_normal(24)
    r, alpha = 4, 8
    layer_np = QLoRALinear(W, b, r=r, alpha=alpha, quant_type=quant_type, rng=rng)
    layer_np.B[...] = rng.standard_normal(layer_np.B.shape)
    x = rng.standard_normal((3, 5, 40))
    dy = rng.standard_normal((3, 5, 24))
    y_np = layer_np.forward(x)
    dx_np = layer_np.backward(dy)

    # torch: the 4-bit base plus the LoRA path written out, differentiated by autograd
    linear = torch.nn.Linear(40, 24).double()
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(W))
        linear.bias.copy_(torch.from_numpy(b))
    base = Linear4bit.from_linear(linear, quant_type=quant_type)
    A = torch.tensor(layer_np.A, requires_grad=True)
    B = torch.tensor(layer_np.B, requires_grad=True)
    x_t = torch.tensor(x, requires_grad=True)
    y_t = base(x_t) + (alpha / r) * (x_t @ A.T) @ B.T
    y_t.backward(torch.from_numpy(dy))

    # same float32 decoded weight on both sides; float64 sums in different orders: 1e-12
    np.testing.assert_allclose(y_t.detach().numpy(), y_np, rtol=0, atol=1e-12)
    np.testing.assert_allclose(x_t.grad.numpy(), dx_np, rtol=0, atol=1e-12)
    np.testing.assert_allclose(A.grad.numpy(), layer_np.grad_A, rtol=0, atol=1e-12)
    np.testing.assert_allclose(B.grad.numpy(), layer_np.grad_B, rtol=0, atol=1e-12)

"""lowrank.numpy.qlora.QLoRALinear: forward against the written-out formula, hand-written
backward against finite differences, and the 4-bit base's bookkeeping."""

import numpy as np
import pytest

from lowrank.numpy.gradcheck import numerical_gradient, numerical_gradient_of_output, relative_error
from lowrank.numpy.qlora import QLoRALinear
from lowrank.numpy.quant import code_for, dequantize_4bit, quantize_4bit, unpack_4bit


def make_layer(quant_type="nf4", use_rslora=False, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((6, 10))  # (out, in)
    b = rng.standard_normal(6) if bias else None
    layer = QLoRALinear(
        W, b, r=3, alpha=5, quant_type=quant_type, blocksize=16, use_rslora=use_rslora, rng=rng
    )
    layer.B[...] = rng.standard_normal(layer.B.shape)  # a trained-looking B, so all paths count
    return layer, W, b


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_forward_is_the_qlora_formula(quant_type):
    layer, W, b = make_layer(quant_type)
    x = np.random.default_rng(1).standard_normal((4, 10))
    # W_q decoded from the codes and scales by hand: level[code] * absmax of its block of 16
    q = quantize_4bit(W, blocksize=16, quant_type=quant_type)
    W_q = code_for(quant_type)[unpack_4bit(q.packed, 60)] * np.repeat(q.absmax_float32(), 16)[:60]
    W_q = W_q.reshape(6, 10).astype(np.float64)
    scale = 5 / 3
    expected = x @ W_q.T + b + scale * (x @ layer.A.T) @ layer.B.T
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-13, atol=1e-13)
    # and the base is close to, but not exactly, the full-precision W
    assert 0 < np.abs(W_q - W).max() < 0.35 * np.abs(W).max()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_backward_matches_finite_differences(use_rslora):
    layer, _, _ = make_layer(use_rslora=use_rslora)
    x = np.random.default_rng(2).standard_normal((2, 3, 10))  # leading dims are a batch
    dy = np.random.default_rng(3).standard_normal((2, 3, 6))
    layer.forward(x)
    dx = layer.backward(dy)

    def loss(_=None):
        return np.sum(layer.forward(x) * dy)

    # float64 centred differences, h = 1e-6: error ~1e-10 relative; a wrong term is ~1
    assert relative_error(layer.grad_A, numerical_gradient(loss, layer.A)) < 1e-7
    assert relative_error(layer.grad_B, numerical_gradient(loss, layer.B)) < 1e-7
    numeric_dx = numerical_gradient_of_output(lambda v: layer.forward(v), x.copy(), dy)
    assert relative_error(dx, numeric_dx) < 1e-7


def test_only_the_4bit_copy_is_kept():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 128))
    layer = QLoRALinear(W, r=4, alpha=8)
    assert layer.weight is None
    assert layer.quantized.nbytes * 8 / W.size < 4.2  # ~4.13 bits per weight
    np.testing.assert_array_equal(layer.base_weight(), dequantize_4bit(layer.quantized))
    assert layer.base_weight().dtype == np.float64


def test_merge_requantizes_and_guards():
    layer, _, _ = make_layer()
    x = np.random.default_rng(4).standard_normal((5, 10))
    before = layer.forward(x, training=False)
    expected_weight = layer.base_weight() + layer.delta_weight()
    layer.merge()
    # merged: one 4-bit matmul; the merged weight is the 4-bit rounding of W_q + scale * B A
    np.testing.assert_array_equal(
        layer.base_weight(), dequantize_4bit(quantize_4bit(expected_weight, blocksize=16))
    )
    after = layer.forward(x, training=False)
    assert np.abs(after - before).max() < 0.5 * np.abs(before).max()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merge_refuses_non_finite():
    layer, _, _ = make_layer()
    codes_before = layer.quantized.packed.copy()
    layer.B[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()
    assert not layer.merged
    np.testing.assert_array_equal(layer.quantized.packed, codes_before)


def test_new_adapter_leaves_the_quantized_base_output():
    rng = np.random.default_rng(5)
    W = rng.standard_normal((8, 32))
    layer = QLoRALinear(W, r=2, alpha=4)  # B = 0
    x = rng.standard_normal((3, 32))
    np.testing.assert_array_equal(layer.forward(x), x @ layer.base_weight().T)

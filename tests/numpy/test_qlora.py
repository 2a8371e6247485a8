"""lowrank.numpy.qlora: the frozen 4-bit Linear4bit and QLoRALinear on top of it. Forward
against the written-out formula, hand-written backward against finite differences, and the
4-bit base's bookkeeping."""

import numpy as np
import pytest

from lowrank.numpy import (
    Linear,
    Linear4bit,
    QLoRALinear,
    dequantize_4bit,
    numerical_gradient,
    numerical_gradient_of_output,
    quantize_4bit,
    relative_error,
)
from lowrank.numpy.codebooks import code_for
from lowrank.numpy.quant import unpack_4bit


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
    assert isinstance(layer.base_layer, Linear4bit)
    assert not hasattr(layer.base_layer, "weight")  # no full-precision copy
    with pytest.raises(AttributeError):
        layer.weight  # noqa: B018
    quantized = layer.base_layer.quantized()
    assert quantized.nbytes * 8 / W.size < 4.2  # ~4.13 bits per weight
    np.testing.assert_array_equal(layer.base_weight(), dequantize_4bit(quantized))
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
    codes_before = layer.base_layer.weight_packed.copy()
    layer.B[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()
    assert not layer.merged
    np.testing.assert_array_equal(layer.base_layer.weight_packed, codes_before)


def test_new_adapter_leaves_the_quantized_base_output():
    rng = np.random.default_rng(5)
    W = rng.standard_normal((8, 32))
    layer = QLoRALinear(W, r=2, alpha=4)  # B = 0
    x = rng.standard_normal((3, 32))
    np.testing.assert_array_equal(layer.forward(x), x @ layer.base_weight().T)


def make_linear4bit(seed=0, bias=True, quant_type="nf4"):
    rng = np.random.default_rng(seed)
    linear = Linear(10, 6, bias=bias, rng=rng)
    return Linear4bit.from_linear(linear, quant_type=quant_type, blocksize=16), linear


@pytest.mark.parametrize("bias", [True, False])
def test_linear4bit_forward_is_x_times_the_decoded_weight(bias):
    layer, linear = make_linear4bit(bias=bias)
    x = np.random.default_rng(6).standard_normal((2, 3, 10))
    # oracle: the 4-bit round trip of the weight done by hand, then the linear formula
    q = quantize_4bit(linear.weight, blocksize=16)
    W_q = code_for("nf4")[unpack_4bit(q.packed, 60)] * np.repeat(q.absmax_float32(), 16)[:60]
    W_q = W_q.reshape(6, 10).astype(np.float64)
    expected = x @ W_q.T + (linear.bias if bias else 0.0)
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-13, atol=1e-13)
    assert layer.dequantize_weight().dtype == np.float64  # the weight's own dtype


def test_linear4bit_backward_decodes_again_and_matches_finite_differences():
    layer, _ = make_linear4bit(seed=1)
    x = np.random.default_rng(7).standard_normal((4, 10))
    dy = np.random.default_rng(8).standard_normal((4, 6))
    layer.forward(x)
    dx = layer.backward(dy)
    numeric = numerical_gradient_of_output(lambda v: layer.forward(v), x.copy(), dy)
    assert relative_error(dx, numeric) < 1e-7
    assert layer.params() == {} and layer.grads() == {}  # frozen: nothing to train


def test_linear4bit_set_weight_checks_shape_and_values():
    layer, linear = make_linear4bit(seed=2)
    packed = layer.weight_packed.copy()
    with pytest.raises(ValueError, match=r"weight must be \[6, 10\]"):
        layer.set_weight(np.zeros((10, 6)))
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.set_weight(np.full((6, 10), np.nan))
    np.testing.assert_array_equal(layer.weight_packed, packed)
    layer.set_weight(2 * linear.weight)
    np.testing.assert_array_equal(
        layer.dequantize_weight(), dequantize_4bit(quantize_4bit(2 * linear.weight, blocksize=16))
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"quant_type": "nf3"}, "quant_type"), ({"blocksize": 48}, "power of two"),
     ({"double_quant": "no"}, "double_quant must be True or False")],
)  # fmt: skip
def test_linear4bit_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Linear4bit.from_linear(Linear(4, 3), **kwargs)


def test_linear4bit_float16_weights_at_their_max_decode_finite():
    """A float16 weight at 65504 (its max), double-quantized: the rebuilt scale lay above
    65504, so the weight decoded back to float16 was inf. The decode clamps it to 65504."""
    weight = np.full((21, 64), 65504.0, np.float16)
    weight[-1] = 0  # one all-zero block: the rebuilt scales of the others overshoot
    linear = Linear(64, 21, rng=np.random.default_rng(0))
    linear.weight = weight
    layer = Linear4bit.from_linear(linear, blocksize=64)
    decoded = layer.dequantize_weight()
    assert decoded.dtype == np.float16 and np.all(np.isfinite(decoded))
    assert np.all(np.abs(decoded[:-1]) >= 64000)  # within double quantization's error of 65504
    y = layer.forward(np.ones((1, 64), np.float32))
    assert np.all(np.isfinite(y))

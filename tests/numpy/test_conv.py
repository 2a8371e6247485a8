"""Tests for lowrank.numpy.conv: im2col / col2im, the frozen Conv2d and LoRAConv.

Oracles: torch.nn.functional.conv2d for the plain convolution (shares no code with im2col),
the adjoint identity <im2col(x), c> = <x, col2im(c)> for col2im, centred finite differences
(float64) for every hand-written gradient, and torch's LoRAConv with autograd on nn.Conv2d
(float64, the same weights) for the LoRA path and its gradients.
"""

import numpy as np
import pytest

from lowrank.numpy import numerical_gradient_of_output, relative_error
from lowrank.numpy.conv import Conv2d, LoRAConv, col2im, im2col

torch = pytest.importorskip("torch")
F = torch.nn.functional

# Finite differences in float64 agree with a correct backward to ~1e-9 (see gradcheck.py).
GRAD_TOL = 1e-7
# Two float64 evaluations of the same sums in a different order: ~1e-15 relative.
SAME_MATH_TOL = 1e-12

IN_CHANNELS, OUT_CHANNELS = 3, 4
# (kernel, stride, padding, dilation): plain, strided and padded, dilated, rectangular
CONFIGS = [
    ((3, 3), (1, 1), (0, 0), (1, 1)),
    ((3, 3), (2, 2), (1, 1), (1, 1)),
    ((3, 3), (1, 1), (2, 2), (2, 2)),
    ((2, 3), (2, 1), (1, 0), (1, 2)),
]


def make_layer(kernel, stride, padding, dilation, *, r=2, dropout=0.0, seed=0):
    """A LoRAConv with a random (non-zero) B, so that every gradient is non-trivial."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(OUT_CHANNELS, IN_CHANNELS, *kernel))
    layer = LoRAConv(
        weight,
        rng.normal(size=OUT_CHANNELS),
        stride=stride,
        padding=padding,
        dilation=dilation,
        r=r,
        alpha=2.0 * r + 1,
        dropout=dropout,
        rng=rng,
    )
    layer.B[...] = rng.normal(size=layer.B.shape)
    return layer, rng.normal(size=(2, IN_CHANNELS, 7, 6))


def torch_conv(x, weight, bias, layer):
    """torch.nn.functional.conv2d with the layer's stride, padding and dilation."""
    return F.conv2d(
        torch.from_numpy(x),
        torch.from_numpy(weight),
        None if bias is None else torch.from_numpy(bias),
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
    ).numpy()


@pytest.mark.parametrize("config", CONFIGS)
def test_conv2d_forward_matches_torch_conv2d(config) -> None:
    layer, x = make_layer(*config)
    base = layer.base_layer
    expected = torch_conv(x, base.weight, base.bias, base)
    assert relative_error(base.forward(x), expected) < SAME_MATH_TOL


@pytest.mark.parametrize("config", CONFIGS)
def test_col2im_is_the_adjoint_of_im2col(config) -> None:
    kernel, stride, padding, dilation = config
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, IN_CHANNELS, 7, 6))
    cols = im2col(x, kernel, stride, padding, dilation)
    c = rng.normal(size=cols.shape)
    # <im2col(x), c> = <x, col2im(c)>: the definition of the adjoint, which backward needs
    back = col2im(c, x.shape, kernel, stride, padding, dilation)
    assert abs(np.sum(cols * c) - np.sum(x * back)) < SAME_MATH_TOL * abs(np.sum(cols * c))


@pytest.mark.parametrize("config", CONFIGS)
def test_backward_matches_finite_differences(config) -> None:
    layer, x = make_layer(*config)
    dy = np.random.default_rng(2).normal(size=layer.forward(x).shape)
    dx = layer.backward(dy)

    def f(_):
        return layer.forward(x)

    assert relative_error(dx, numerical_gradient_of_output(f, x, dy)) < GRAD_TOL
    assert relative_error(layer.grad_A, numerical_gradient_of_output(f, layer.A, dy)) < GRAD_TOL
    assert relative_error(layer.grad_B, numerical_gradient_of_output(f, layer.B, dy)) < GRAD_TOL


def test_backward_with_dropout_matches_finite_differences() -> None:
    layer, x = make_layer(*CONFIGS[1], dropout=0.3)

    def f(_):
        layer.rng = np.random.default_rng(5)  # the same dropout mask at every call
        return layer.forward(x)

    dy = np.random.default_rng(2).normal(size=f(None).shape)
    dx = layer.backward(dy)
    grad_A, grad_B = layer.grad_A, layer.grad_B
    assert relative_error(dx, numerical_gradient_of_output(f, x, dy)) < GRAD_TOL
    assert relative_error(grad_A, numerical_gradient_of_output(f, layer.A, dy)) < GRAD_TOL
    assert relative_error(grad_B, numerical_gradient_of_output(f, layer.B, dy)) < GRAD_TOL


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_and_gradients_match_torch_lora_conv(config) -> None:
    from lowrank.torch.conv import LoRAConv as TorchLoRAConv

    layer, x = make_layer(*config)
    base = layer.base_layer
    conv = torch.nn.Conv2d(
        IN_CHANNELS,
        OUT_CHANNELS,
        base.kernel_size,
        stride=base.stride,
        padding=base.padding,
        dilation=base.dilation,
        dtype=torch.float64,
    )
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(base.weight))
        conv.bias.copy_(torch.from_numpy(base.bias))
    mirror = TorchLoRAConv(conv)
    mirror.add_adapter("default", r=layer.r, alpha=layer.alpha)
    mirror.active_adapter = "default"
    with torch.no_grad():
        mirror.A["default"].copy_(torch.from_numpy(layer.A))
        mirror.B["default"].copy_(torch.from_numpy(layer.B))
    x_t = torch.from_numpy(x.copy()).requires_grad_(True)
    y_t = mirror(x_t)
    dy = np.random.default_rng(3).normal(size=tuple(y_t.shape))
    y_t.backward(torch.from_numpy(dy))

    y = layer.forward(x)
    dx = layer.backward(dy)
    assert relative_error(y, y_t.detach().numpy()) < SAME_MATH_TOL
    assert relative_error(dx, x_t.grad.numpy()) < SAME_MATH_TOL
    assert relative_error(layer.grad_A, mirror.A["default"].grad.numpy()) < SAME_MATH_TOL
    assert relative_error(layer.grad_B, mirror.B["default"].grad.numpy()) < SAME_MATH_TOL
    assert relative_error(layer.delta_weight(), mirror.delta_weight().detach().numpy()) < 1e-15


def test_update_is_a_conv_with_the_merged_weight() -> None:
    layer, x = make_layer(*CONFIGS[1])
    delta = layer.scale * (layer.B @ layer.A)  # (out, in * kh * kw), the paper's formula
    weight = layer.weight + delta.reshape(layer.weight.shape)
    expected = torch_conv(x, weight, layer.bias, layer.base_layer)
    assert relative_error(layer.forward(x, training=False), expected) < SAME_MATH_TOL


def test_new_adapter_leaves_the_output_unchanged() -> None:
    rng = np.random.default_rng(0)
    weight, x = rng.normal(size=(4, 3, 3, 3)), rng.normal(size=(2, 3, 5, 5))
    layer = LoRAConv(weight, padding=1, r=2)
    assert np.array_equal(layer.forward(x), layer.base_layer.forward(x))
    bound = 1 / np.sqrt(3 * 3 * 3)  # kaiming-uniform a=sqrt(5) on fan-in in * kh * kw
    assert layer.A.shape == (2, 27) and np.abs(layer.A).max() <= bound


def test_merge_and_unmerge_round_trip() -> None:
    layer, x = make_layer(*CONFIGS[2])
    W_before = layer.weight.copy()
    y_before = layer.forward(x, training=False)
    layer.merge()
    assert relative_error(layer.forward(x), y_before) < SAME_MATH_TOL
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.backward(np.ones_like(y_before))
    layer.unmerge()
    assert relative_error(layer.weight, W_before) < SAME_MATH_TOL
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight": np.zeros((4, 3, 3))}, "4-D"),
        ({"stride": 0}, "stride"),
        ({"padding": (1, -1)}, "padding"),
        ({"dilation": (1, 2, 3)}, "dilation"),
        ({"bias": np.zeros(3)}, "bias"),
        ({"r": 0}, "r"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message) -> None:
    arguments = {"weight": np.zeros((4, 3, 3, 3)), "r": 2} | kwargs
    weight = arguments.pop("weight")
    with pytest.raises(ValueError, match=message):
        LoRAConv(weight, **arguments)


def test_forward_and_backward_reject_bad_calls() -> None:
    layer = LoRAConv(np.zeros((4, 3, 3, 3)), r=2)
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((1, 4, 1, 1)))
    with pytest.raises(ValueError, match="x must be"):
        layer.forward(np.zeros((1, 2, 5, 5)))  # 2 channels, the layer takes 3
    with pytest.raises(ValueError, match="does not fit"):
        layer.forward(np.zeros((1, 3, 2, 2)))  # a 3x3 kernel on a 2x2 input, no padding
    layer.forward(np.zeros((1, 3, 5, 5)))
    with pytest.raises(ValueError, match="dy must have shape"):
        layer.backward(np.zeros((1, 4, 2, 2)))


def test_conv2d_alone_backward_matches_finite_differences() -> None:
    conv = Conv2d(np.random.default_rng(0).normal(size=(4, 3, 3, 3)), stride=2, padding=1)
    x = np.random.default_rng(1).normal(size=(2, 3, 6, 5))
    dy = np.random.default_rng(2).normal(size=conv.forward(x).shape)
    dx = conv.backward(dy)
    assert relative_error(dx, numerical_gradient_of_output(conv.forward, x, dy)) < GRAD_TOL

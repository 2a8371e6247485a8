"""DoRA in NumPy (Liu et al. 2024, arXiv:2402.09353): forward against the formula written out
by hand, backward against centred finite differences in float64, merge/unmerge, MLP hook.

Tolerances: finite differences in float64 with h = 1e-6 agree with a correct backward to a
relative error of about 1e-9 (`lowrank.numpy.gradcheck`); 1e-7 leaves room and a wrong
backward is off by order 1. Merge/unmerge round at float64 epsilon: 1e-12.
"""

import numpy as np
import pytest

from lowrank.numpy import MLP, numerical_gradient, numerical_gradient_of_output, relative_error
from lowrank.numpy.dora import DoRALinear, row_norms
from lowrank.numpy.model import add_lora, merge_lora, unmerge_lora


def trained_layer(dropout=0.0, detach_norm=True, seed=0):
    rng = np.random.default_rng(seed)
    W, b = rng.normal(size=(5, 7)), rng.normal(size=5)
    layer = DoRALinear(W, b, r=3, alpha=6, dropout=dropout, detach_norm=detach_norm, rng=rng)
    layer.B[...] = rng.normal(size=(5, 3))  # as if trained
    layer.magnitude[...] = rng.uniform(0.5, 2.0, size=5)
    return layer, W, b, rng


def test_forward_is_magnitude_times_unit_rows():
    layer, W, b, rng = trained_layer()
    x = rng.normal(size=(2, 4, 7))  # (batch, tokens, in)
    V = W + 2.0 * layer.B @ layer.A  # scale = 6 / 3
    W_dora = layer.magnitude[:, None] * V / np.sqrt((V**2).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(layer.forward(x), x @ W_dora.T + b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(W_dora, axis=1), layer.magnitude, atol=1e-12)
    np.testing.assert_allclose(row_norms(V), np.linalg.norm(V, axis=1), atol=1e-12)


def test_a_new_adapter_changes_nothing():
    rng = np.random.default_rng(1)
    W = rng.normal(size=(4, 6))
    layer = DoRALinear(W, r=2)
    x = rng.normal(size=(3, 6))
    np.testing.assert_allclose(layer.magnitude, np.linalg.norm(W, axis=1), atol=1e-14)
    np.testing.assert_allclose(layer.forward(x), x @ W.T, atol=1e-12)


@pytest.mark.parametrize("detach_norm", [False, True])
def test_backward_matches_finite_differences(detach_norm):
    layer, W, b, rng = trained_layer(detach_norm=detach_norm)
    x, dy = rng.normal(size=(3, 7)), rng.normal(size=(3, 5))
    layer.forward(x)
    dx = layer.backward(dy)
    grads = {k: v.copy() for k, v in layer.grads().items()}
    n_fixed = row_norms(W + layer.delta_weight())

    def loss(_):
        if not detach_norm:
            return np.sum(layer.forward(x) * dy)
        # the norm held constant (section 4.3): W' = (m / n0) * (W + scale * B @ A)
        V = W + layer.delta_weight()
        return np.sum((x @ ((layer.magnitude / n_fixed)[:, None] * V).T + b) * dy)

    for name, param in layer.params().items():
        assert relative_error(grads[name], numerical_gradient(loss, param)) < 1e-7, name
    dx_num = numerical_gradient_of_output(lambda x_: layer.forward(x_), x, dy)
    assert relative_error(dx, dx_num) < 1e-7


def test_the_detached_gradient_differs_from_the_exact_one():
    exact, *_ = trained_layer(detach_norm=False)
    detached, _, _, rng = trained_layer(detach_norm=True)
    x, dy = rng.normal(size=(3, 7)), rng.normal(size=(3, 5))
    for layer in (exact, detached):
        layer.forward(x)
        layer.backward(dy)
    np.testing.assert_allclose(exact.grad_magnitude, detached.grad_magnitude, atol=1e-14)
    assert relative_error(exact.grad_B, detached.grad_B) > 1e-3


def test_dropout_backward_with_a_fixed_mask():
    layer, _, _, rng = trained_layer(dropout=0.3, detach_norm=False)
    x, dy = rng.normal(size=(4, 7)), rng.normal(size=(4, 5))
    state = layer.rng.bit_generator.state
    layer.forward(x)
    dx = layer.backward(dy)

    def forward_same_mask(x_):
        layer.rng.bit_generator.state = state
        return layer.forward(x_)

    assert relative_error(dx, numerical_gradient_of_output(forward_same_mask, x, dy)) < 1e-7


def test_merge_and_unmerge():
    layer, W, _, rng = trained_layer()
    x = rng.normal(size=(3, 7))
    y = layer.forward(x, training=False)
    layer.merge()
    np.testing.assert_allclose(layer.forward(x), y, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(layer.weight, axis=1), layer.magnitude, atol=1e-12)
    with pytest.raises(RuntimeError, match="merged"):
        layer.backward(np.ones((3, 5)))
    layer.unmerge()
    np.testing.assert_allclose(layer.weight, W, atol=1e-12)
    np.testing.assert_allclose(layer.forward(x, training=False), y, atol=1e-12)


def test_add_lora_with_dora_on_the_mlp():
    model = MLP([4, 8, 3], rng=np.random.default_rng(0))
    x = np.random.default_rng(1).normal(size=(2, 4))
    before = model.forward(x)
    add_lora(model, r=2, use_dora=True)
    assert [type(layer).__name__ for layer in model.layers[::2]] == ["DoRALinear"] * 2
    assert list(model.parameters()) == [
        f"layers.{i}.{p}" for i in (0, 2) for p in ("A", "B", "magnitude")
    ]
    assert model.num_trainable() == 2 * (4 + 8) + 8 + 2 * (8 + 3) + 3
    np.testing.assert_allclose(model.forward(x), before, atol=1e-12)
    model.layers[0].B[...] = 0.3
    y = model.forward(x, training=False)
    unmerged = model.layers[0].weight.copy()
    merge_lora(model)
    np.testing.assert_allclose(model.forward(x), y, atol=1e-12)
    unmerge_lora(model)
    np.testing.assert_allclose(model.layers[0].weight, unmerged, atol=1e-12)
    with pytest.raises(ValueError, match="use_dora"):
        add_lora(MLP([4, 8, 3]), r=2, use_dora=True, quant_type="nf4")

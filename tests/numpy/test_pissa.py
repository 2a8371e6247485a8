"""Tests for lowrank.numpy.pissa: PiSSA and OLoRA initialisations and the rank-2r conversion.

Oracles (float64): Eckart-Young (the residual of the best rank-r fit has exactly the
remaining singular values of W, from NumPy's dense svdvals), a weight built from a known
orthonormal Q and upper-triangular R (OLoRA must give back their leading parts, up to signs),
and the forward of the model before the change. Tolerance 1e-10: a few float64 products of
numbers of size ~1.
"""

import numpy as np
import pytest

from lowrank.numpy import MLP, add_lora, lora_layers, merge_lora
from lowrank.numpy.pissa import olora_init, pissa_init, plain_lora_copy

TOL = 1e-10
X = np.random.default_rng(1).normal(size=(5, 12))


def model(r=3, alpha=5.0, use_rslora=False, **options):
    return add_lora(MLP([12, 10, 6]), r=r, alpha=alpha, use_rslora=use_rslora, **options)


@pytest.mark.parametrize("init", [pissa_init, olora_init])
def test_the_model_computes_what_it_did(init):
    net = model()
    before = net.forward(X, training=False)
    init(net)
    np.testing.assert_allclose(net.forward(X, training=False), before, atol=TOL)


def test_pissa_moves_the_top_singular_values_into_the_adapter():
    net = model(r=3, alpha=5.0)
    originals = {name: layer.weight.copy() for name, layer in lora_layers(net)}
    initial = pissa_init(net)
    for name, layer in lora_layers(net):
        S = np.linalg.svd(originals[name], compute_uv=False)
        np.testing.assert_allclose(np.linalg.svd(layer.delta_weight(), compute_uv=False)[:3], S[:3])
        residual_S = np.linalg.svd(layer.weight, compute_uv=False)
        np.testing.assert_allclose(residual_S[: len(S) - 3], S[3:], atol=TOL)  # Eckart-Young
        # A A^T = B^T B = diag(S_r / scale): the scale is split evenly between the factors
        np.testing.assert_allclose(layer.A @ layer.A.T, np.diag(S[:3] / layer.scale), atol=TOL)
        np.testing.assert_allclose(layer.B.T @ layer.B, np.diag(S[:3] / layer.scale), atol=TOL)
        np.testing.assert_array_equal(initial[name][0], layer.A)


def test_olora_gives_back_the_leading_q_and_r():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    R = np.triu(rng.normal(size=(10, 12)))
    net = model(r=3, alpha=6.0)
    net.layers[0].set_base_weight(Q @ R)  # W (10, 12)
    olora_init(net)
    layer = net.layers[0]
    signs = np.sign(np.diag(layer.A[:, :3]) * np.diag(R[:3, :3]))  # QR is unique up to signs
    np.testing.assert_allclose(layer.B, Q[:, :3] * signs, atol=TOL)
    np.testing.assert_allclose(layer.A, R[:3] * signs[:, None], atol=TOL)
    np.testing.assert_allclose(layer.weight, Q @ R - 2.0 * layer.B @ layer.A, atol=TOL)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("init", [pissa_init, olora_init])
def test_plain_copy_is_lora_of_rank_2r_on_the_original_weight(init, use_rslora):
    net = model(use_rslora=use_rslora)
    originals = [layer.weight.copy() for _, layer in lora_layers(net)]
    initial = init(net)
    for _, layer in lora_layers(net):
        layer.B += 0.1  # as if trained
        layer.A -= 0.05
    plain = plain_lora_copy(net, initial)
    for (_, layer), (_, trained), W in zip(
        lora_layers(plain), lora_layers(net), originals, strict=True
    ):
        np.testing.assert_allclose(layer.weight, W, atol=TOL)
        assert layer.r == 6 and layer.scale == pytest.approx(trained.scale)
    np.testing.assert_allclose(
        plain.forward(X, training=False), net.forward(X, training=False), atol=TOL
    )
    assert lora_layers(net)[0][1].r == 3  # the model itself is unchanged


def test_errors_change_nothing():
    with pytest.raises(ValueError, match="no LoRA layers"):
        pissa_init(MLP([4, 3]))
    net = model()
    net.layers[2].set_base_weight(np.full((6, 10), np.nan))
    weight0, A0 = net.layers[0].weight.copy(), net.layers[0].A.copy()
    with pytest.raises(ValueError, match="layers.2"):
        pissa_init(net)
    np.testing.assert_array_equal(net.layers[0].weight, weight0)  # layer 0 was not touched
    np.testing.assert_array_equal(net.layers[0].A, A0)
    merged = merge_lora(model())
    with pytest.raises(ValueError, match="merged"):
        olora_init(merged)
    net = model()
    initial = pissa_init(net)
    with pytest.raises(ValueError, match="do not match"):
        plain_lora_copy(net, {"layers.0": (initial["layers.0"][0][:1], initial["layers.0"][1])})
    with pytest.raises(ValueError, match="not LoRA layers"):
        plain_lora_copy(net, {"layers.1": initial["layers.0"]})


def test_a_4bit_base_holds_the_quantized_residual():
    net = model(quant_type="nf4")
    before = net.forward(X, training=False)
    pissa_init(net)
    after = net.forward(X, training=False)
    # NF4 rounds the residual, whose entries are smaller than W's: close, not equal
    assert np.abs(after - before).max() < 0.1 * np.abs(before).max()

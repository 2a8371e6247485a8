"""Tests for lowrank.numpy.lora: LoRALinear and Linear.

Oracles: centred finite differences (float64), torch autograd on the same formula, torch's own
init functions, and the formulas of the LoRA / rsLoRA papers written out in the test.
"""

import math

import numpy as np
import pytest

from lowrank._validate import RankWarning
from lowrank.numpy import (
    Linear,
    LoRALinear,
    kaiming_uniform_A,
    numerical_gradient_of_output,
    relative_error,
)

# Finite differences in float64 agree with a correct backward to ~1e-9 (see gradcheck.py).
GRAD_TOL = 1e-7
# Two float64 evaluations of the same formula with different summation order: ~1e-15.
SAME_MATH_TOL = 1e-12

OUT, IN = 5, 7


def make_layer(*, r=3, alpha=6.0, dropout=0.0, use_rslora=False, bias=True, seed=0):
    """A layer with a random (non-zero) B, so that every gradient is non-trivial."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(OUT, IN))
    b = rng.normal(size=OUT) if bias else None
    layer = LoRALinear(W, b, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, rng=rng)
    layer.B[...] = rng.normal(size=layer.B.shape)
    return layer


def forward_with_fixed_mask(layer, x, mask_seed=123):
    """Forward that draws the same dropout mask on every call (reseeds the layer's generator)."""
    layer.rng = np.random.default_rng(mask_seed)
    return layer.forward(x, training=True)


CONFIGS = [
    pytest.param({}, id="plain"),
    pytest.param({"bias": False}, id="no-bias"),
    pytest.param({"use_rslora": True, "r": 4, "alpha": 3.0}, id="rslora"),
    pytest.param({"dropout": 0.4}, id="dropout"),
    pytest.param({"dropout": 0.25, "use_rslora": True}, id="dropout-rslora"),
    pytest.param({"r": 1}, id="rank-1"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("x_shape", [(4, IN), (2, 3, IN)], ids=["2d", "3d"])
def test_backward_matches_finite_differences(config, x_shape) -> None:
    layer = make_layer(**config)
    rng = np.random.default_rng(1)
    x = rng.normal(size=x_shape)
    dy = rng.normal(size=(*x_shape[:-1], OUT))
    forward_with_fixed_mask(layer, x)
    dx = layer.backward(dy)

    def f(_):
        return forward_with_fixed_mask(layer, x)

    assert relative_error(dx, numerical_gradient_of_output(f, x, dy)) < GRAD_TOL
    assert relative_error(layer.grad_A, numerical_gradient_of_output(f, layer.A, dy)) < GRAD_TOL
    assert relative_error(layer.grad_B, numerical_gradient_of_output(f, layer.B, dy)) < GRAD_TOL


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_and_backward_match_torch_autograd(config) -> None:
    torch = pytest.importorskip("torch")
    layer = make_layer(**config)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, IN))
    dy = rng.normal(size=(2, 3, OUT))
    y = forward_with_fixed_mask(layer, x, mask_seed=7)
    dx = layer.backward(dy)

    # The paper's formula, in torch: y = x W^T + b + scale * dropout(x) A^T B^T, with the
    # inverted-dropout mask drawn as documented (keep where uniform >= p, divide by 1 - p).
    p = config.get("dropout", 0.0)
    keep = np.random.default_rng(7).random(x.shape) >= p if p else np.ones(x.shape, bool)
    scale = layer.alpha / (math.sqrt(layer.r) if config.get("use_rslora") else layer.r)
    x_t = torch.tensor(x, requires_grad=True)
    A_t = torch.tensor(layer.A, requires_grad=True)
    B_t = torch.tensor(layer.B, requires_grad=True)
    mask_t = torch.tensor(keep / (1 - p))
    bias_t = None if layer.bias is None else torch.tensor(layer.bias)
    y_t = torch.nn.functional.linear(x_t, torch.tensor(layer.weight), bias_t)
    y_t = y_t + scale * ((x_t * mask_t) @ A_t.T @ B_t.T)
    y_t.backward(torch.tensor(dy))

    assert layer.scale == pytest.approx(scale, rel=1e-15)
    assert relative_error(y, y_t.detach().numpy()) < SAME_MATH_TOL
    assert relative_error(dx, x_t.grad.numpy()) < SAME_MATH_TOL
    assert relative_error(layer.grad_A, A_t.grad.numpy()) < SAME_MATH_TOL
    assert relative_error(layer.grad_B, B_t.grad.numpy()) < SAME_MATH_TOL


def test_frozen_weight_and_bias_get_no_gradient() -> None:
    layer = make_layer()
    layer.forward(np.ones((2, IN)))
    layer.backward(np.ones((2, OUT)))
    assert set(layer.params()) == set(layer.grads()) == {"A", "B"}
    assert layer.params()["A"] is layer.A and layer.params()["B"] is layer.B
    assert layer.grads()["A"] is layer.grad_A


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_new_adapter_leaves_the_output_unchanged(init, dropout) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    W, b, x = rng.normal(size=(OUT, IN)), rng.normal(size=OUT), rng.normal(size=(4, IN))
    layer = LoRALinear(W, b, r=2, dropout=dropout, init=init, rng=rng)
    assert np.array_equal(layer.B, np.zeros((OUT, 2)))
    expected = torch.nn.functional.linear(torch.tensor(x), torch.tensor(W), torch.tensor(b))
    for training in (True, False):
        assert np.allclose(layer.forward(x, training), expected.numpy(), rtol=0, atol=1e-14)


def test_kaiming_bound_is_torchs_kaiming_uniform_with_a_sqrt5() -> None:
    torch = pytest.importorskip("torch")
    r, n_in = 64, 1000
    # torch's bound, from torch's own gain and fan-in functions (not our 1/sqrt(in)).
    probe = torch.empty(r, n_in, dtype=torch.float64)
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(probe)
    gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    torch_bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    torch.manual_seed(0)
    torch_draw = torch.nn.init.kaiming_uniform_(probe, a=math.sqrt(5)).numpy().ravel()

    ours = kaiming_uniform_A(r, n_in, np.random.default_rng(0)).ravel()
    assert ours.shape == (r * n_in,)
    assert np.abs(ours).max() <= torch_bound
    # 64,000 uniform draws come within 1e-3 of the bound with overwhelming probability.
    assert np.abs(ours).max() > torch_bound * (1 - 1e-3)
    # Same distribution as torch's draw: a two-sample Kolmogorov-Smirnov test.
    stats = pytest.importorskip("scipy.stats")
    assert stats.ks_2samp(ours, torch_draw).pvalue > 1e-3
    layer = LoRALinear(np.zeros((OUT, n_in)), r=OUT, rng=np.random.default_rng(1))
    assert np.abs(layer.A).max() <= torch_bound


def test_gaussian_init_has_std_one_over_r_like_peft() -> None:
    # PEFT: nn.init.normal_(lora_A.weight, std=1 / r) for init_lora_weights="gaussian".
    r, n_in = 4, 20_000
    layer = LoRALinear(np.zeros((8, n_in)), r=r, init="gaussian", rng=np.random.default_rng(0))
    assert layer.A.shape == (r, n_in)
    assert layer.A.std() == pytest.approx(1 / r, rel=0.02)  # 80,000 draws: std error ~0.25%
    assert abs(layer.A.mean()) < 0.01


def test_dropout_mask_statistics_and_no_dropout_at_inference() -> None:
    rng = np.random.default_rng(4)
    W = rng.normal(size=(OUT, 400))
    layer = LoRALinear(W, r=1, alpha=1.0, dropout=0.3, rng=rng)
    layer.A[...] = 1.0
    layer.B[...] = 1.0  # the LoRA path is then sum(dropout(x)) on every output
    x = np.ones((50, 400))
    lora_out = layer.forward(x, training=True) - x @ W.T  # (50, OUT): sum of the mask per row
    kept = lora_out[:, 0] * (1 - 0.3)  # undo the 1/(1-p) scale -> number of kept inputs
    assert np.allclose(kept, np.round(kept))  # survivors are exactly x / (1 - p)
    assert kept.mean() / 400 == pytest.approx(0.7, abs=0.01)  # 20,000 draws, std ~0.003
    assert np.allclose(layer.forward(x, training=False) - x @ W.T, 400.0)


def test_merge_and_unmerge_round_trip() -> None:
    layer = make_layer(dropout=0.3, use_rslora=True, r=2)
    x = np.random.default_rng(5).normal(size=(6, IN))
    W_before = layer.weight.copy()
    y_before = layer.forward(x, training=False)
    layer.merge()
    assert layer.merged
    # W' = W + scale * B A, as in the paper (written out here, not via delta_weight()).
    assert np.allclose(layer.weight, W_before + layer.alpha / np.sqrt(2) * layer.B @ layer.A)
    assert relative_error(layer.forward(x, training=False), y_before) < SAME_MATH_TOL
    layer.unmerge()
    assert not layer.merged
    assert relative_error(layer.weight, W_before) < SAME_MATH_TOL
    assert relative_error(layer.forward(x, training=False), y_before) < SAME_MATH_TOL


def test_merge_twice_and_unmerge_unmerged_raise() -> None:
    layer = make_layer()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.forward(np.ones((1, IN)))
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.backward(np.ones((1, OUT)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e308])
def test_non_finite_merge_raises_and_leaves_weight_untouched(bad) -> None:
    layer = make_layer()
    layer.A[...] = 1.0
    layer.B[0, :] = bad  # 1e308: the sum over r = 3 terms in B @ A overflows to inf
    W_before = layer.weight.copy()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()
    assert np.array_equal(layer.weight, W_before)
    assert not layer.merged


def test_merge_changes_the_layers_copy_not_the_callers_weight() -> None:
    W = np.random.default_rng(6).normal(size=(OUT, IN))
    W_caller = W.copy()
    layer = LoRALinear(W, r=2)
    layer.B[...] = 1.0
    layer.merge()
    assert np.array_equal(W, W_caller)


@pytest.mark.parametrize("r", [0, -1, True, 2.0, "2", None])
def test_rank_validation(r) -> None:
    with pytest.raises(ValueError, match="rank r must be a positive int"):
        LoRALinear(np.zeros((OUT, IN)), r=r)


@pytest.mark.parametrize("r", [6, 100])
def test_a_rank_above_min_in_out_warns_and_still_has_rank_at_most_min(r) -> None:
    with pytest.warns(RankWarning, match=f"r={r} exceeds"):
        layer = LoRALinear(np.zeros((OUT, IN)), r=r, rng=np.random.default_rng(0))
    assert layer.A.shape == (r, IN) and layer.B.shape == (OUT, r)
    layer.B[...] = np.random.default_rng(1).normal(size=layer.B.shape)
    # B @ A is (5, r) @ (r, 7): its rank is bounded by 5 whatever r is (oracle: NumPy's rank)
    assert np.linalg.matrix_rank(layer.delta_weight()) == min(OUT, IN)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"weight": np.zeros(5)}, ValueError, "2-D"),
        ({"weight": np.array([[np.nan, 0.0]])}, ValueError, "NaN"),
        ({"weight": np.array([["a"]])}, TypeError, "real numbers"),
        ({"bias": np.zeros(4)}, ValueError, "bias"),
        ({"alpha": 0}, ValueError, "alpha"),
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"alpha": float("inf")}, ValueError, "alpha"),
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"alpha": True}, TypeError, "alpha"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"dropout": "0.1"}, TypeError, "dropout"),
        ({"init": "xavier"}, ValueError, "init"),
        ({"rng": 0}, TypeError, "Generator"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, message) -> None:
    args = {"weight": np.zeros((OUT, IN)), "r": 1} | kwargs
    with pytest.raises(error, match=message):
        LoRALinear(**args)


def test_forward_and_backward_reject_bad_calls() -> None:
    layer = make_layer()
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((1, OUT)))
    with pytest.raises(ValueError, match=f"\\(..., {IN}\\)"):
        layer.forward(np.ones((2, IN + 1)))
    layer.forward(np.ones((2, IN)))
    with pytest.raises(ValueError, match="dy"):
        layer.backward(np.ones((2, OUT + 1)))


def test_dtype_float32_stays_float32_and_ints_become_float64() -> None:
    layer32 = LoRALinear(np.ones((OUT, IN), dtype=np.float32), r=2)
    assert layer32.weight.dtype == layer32.A.dtype == layer32.B.dtype == np.float32
    layer64 = LoRALinear(np.ones((OUT, IN), dtype=np.int64), np.zeros(OUT, dtype=np.int64), r=2)
    assert layer64.weight.dtype == layer64.A.dtype == layer64.bias.dtype == np.float64


def test_seeded_by_default_and_by_the_generator_given() -> None:
    W = np.zeros((OUT, IN))
    assert np.array_equal(LoRALinear(W, r=2).A, LoRALinear(W, r=2).A)  # default: seeded 0
    a = LoRALinear(W, r=2, rng=np.random.default_rng(9)).A
    assert np.array_equal(a, LoRALinear(W, r=2, rng=np.random.default_rng(9)).A)
    assert not np.array_equal(a, LoRALinear(W, r=2, rng=np.random.default_rng(10)).A)


# --- Linear: the trainable layer ------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_backward_matches_finite_differences_and_torch(bias) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    layer = Linear(IN, OUT, bias=bias, rng=rng)
    x = rng.normal(size=(2, 3, IN))
    dy = rng.normal(size=(2, 3, OUT))
    y = layer.forward(x)
    dx = layer.backward(dy)

    def f(_):
        return layer.forward(x)

    assert relative_error(dx, numerical_gradient_of_output(f, x, dy)) < GRAD_TOL
    assert relative_error(layer.grad_weight, numerical_gradient_of_output(f, layer.weight, dy)) < (
        GRAD_TOL
    )
    torch_layer = torch.nn.Linear(IN, OUT, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        torch_layer.weight.copy_(torch.tensor(layer.weight))
        if bias:
            torch_layer.bias.copy_(torch.tensor(layer.bias))
    x_t = torch.tensor(x, requires_grad=True)
    y_t = torch_layer(x_t)
    y_t.backward(torch.tensor(dy))
    assert relative_error(y, y_t.detach().numpy()) < SAME_MATH_TOL
    assert relative_error(dx, x_t.grad.numpy()) < SAME_MATH_TOL
    assert relative_error(layer.grad_weight, torch_layer.weight.grad.numpy()) < SAME_MATH_TOL
    if bias:
        assert relative_error(layer.grad_bias, torch_layer.bias.grad.numpy()) < SAME_MATH_TOL
        assert relative_error(layer.grad_bias, numerical_gradient_of_output(f, layer.bias, dy)) < (
            GRAD_TOL
        )
    assert set(layer.params()) == set(layer.grads()) == ({"weight", "bias"} if bias else {"weight"})


def test_linear_init_bounds_match_nn_linear() -> None:
    torch = pytest.importorskip("torch")
    n_in, n_out = 300, 200
    torch.manual_seed(0)
    reference = torch.nn.Linear(n_in, n_out, dtype=torch.float64)
    layer = Linear(n_in, n_out, rng=np.random.default_rng(0))
    for ours, theirs in ((layer.weight, reference.weight), (layer.bias, reference.bias)):
        theirs = theirs.detach().numpy()
        assert ours.shape == theirs.shape
        # Both uniform(-1/sqrt(in), 1/sqrt(in)): maxima within a few percent of each other.
        assert np.abs(ours).max() <= 1 / math.sqrt(n_in)
        assert np.abs(ours).max() == pytest.approx(np.abs(theirs).max(), rel=0.05)


def test_frozen_linear_has_no_parameters_and_only_returns_dx() -> None:
    layer = Linear(IN, OUT)
    layer.requires_grad = False
    layer.forward(np.ones((2, IN)))
    dx = layer.backward(np.ones((2, OUT)))
    assert np.allclose(dx, np.ones((2, OUT)) @ layer.weight)
    assert layer.params() == {} and layer.grads() == {}
    assert layer.grad_weight is None


@pytest.mark.parametrize("size", [0, -3, 2.0, True])
def test_linear_rejects_bad_sizes(size) -> None:
    with pytest.raises(ValueError, match="positive int"):
        Linear(size, 3)

"""Tests for the finite-difference helpers, against closed-form derivatives and torch autograd."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowrank.numpy import numerical_gradient, numerical_gradient_of_output, relative_error

# Centred differences in float64 with h=1e-6 are accurate to ~1e-9 relative on smooth, O(1)
# functions; 1e-7 leaves a margin and is still six orders below what a real bug produces.
TOL = 1e-7


def test_numerical_gradient_matches_closed_form_of_a_quadratic_and_a_cubic() -> None:
    rng = np.random.default_rng(0)
    M = rng.normal(size=(5, 5))
    x = rng.normal(size=5)
    # d/dx (x^T M x) = (M + M^T) x ; d/dx sum(sin(x) * x^3) = cos(x) x^3 + 3 x^2 sin(x)
    assert relative_error(numerical_gradient(lambda v: v @ M @ v, x), (M + M.T) @ x) < TOL
    expected = np.cos(x) * x**3 + 3 * x**2 * np.sin(x)
    assert relative_error(numerical_gradient(lambda v: np.sum(np.sin(v) * v**3), x), expected) < TOL


def test_numerical_gradient_restores_x_bit_for_bit_and_keeps_its_shape() -> None:
    x = np.random.default_rng(1).normal(size=(3, 4)) * 1e3
    before = x.copy()
    grad = numerical_gradient(lambda v: np.sum(v**2), x)
    assert grad.shape == (3, 4)
    assert np.array_equal(x, before)


def test_numerical_gradient_sees_parameters_through_references() -> None:
    # The way layers are checked: f ignores its argument and reads the array it closes over.
    rng = np.random.default_rng(2)
    W = rng.normal(size=(3, 4))
    x = rng.normal(size=4)
    dy = rng.normal(size=3)
    grad = numerical_gradient(lambda _: dy @ (W @ x), W)
    assert relative_error(grad, np.outer(dy, x)) < TOL  # d(dy^T W x)/dW = dy x^T


def test_numerical_gradient_of_output_matches_torch_autograd() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    M = rng.normal(size=(4, 6))
    x = rng.normal(size=(2, 3, 4))
    dout = rng.normal(size=(2, 3, 6))
    ours = numerical_gradient_of_output(lambda v: np.tanh(v @ M) ** 2, x, dout)
    x_t = torch.tensor(x, requires_grad=True)
    (torch.tanh(x_t @ torch.tensor(M)) ** 2).backward(torch.tensor(dout))
    assert relative_error(ours, x_t.grad.numpy()) < TOL


def test_numerical_gradient_of_output_checks_dout_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        numerical_gradient_of_output(lambda v: v * 2, np.zeros(3), np.zeros(4))


def test_the_check_catches_a_wrong_backward() -> None:
    # A forgotten transpose or factor must stand out by orders of magnitude, or the test is idle.
    rng = np.random.default_rng(4)
    W = rng.normal(size=(4, 4))
    x = rng.normal(size=4)
    numeric = numerical_gradient(lambda v: np.sum(np.tanh(W @ v)), x)
    right = W.T @ (1 - np.tanh(W @ x) ** 2)
    assert relative_error(right, numeric) < TOL
    assert relative_error(W @ (1 - np.tanh(W @ x) ** 2), numeric) > 1e-2  # missing transpose
    assert relative_error(2 * right, numeric) > 1e-2  # wrong factor


@pytest.mark.parametrize(
    ("x", "h", "error", "message"),
    [
        (np.zeros(3, dtype=np.float32), 1e-6, TypeError, "float64"),
        ([0.0, 1.0], 1e-6, TypeError, "float64"),
        (np.zeros(3), 0.0, ValueError, "positive"),
        (np.zeros(3), -1e-6, ValueError, "positive"),
    ],
)
def test_numerical_gradient_rejects_bad_input(x, h, error, message) -> None:
    with pytest.raises(error, match=message):
        numerical_gradient(lambda v: 0.0, x, h)


def test_numerical_gradient_wants_a_scalar_function() -> None:
    with pytest.raises(ValueError, match="numerical_gradient_of_output"):
        numerical_gradient(lambda v: v * 2, np.zeros(3))


def test_numerical_gradient_rejects_read_only_x() -> None:
    x = np.zeros(3)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        numerical_gradient(lambda v: 0.0, x)


def test_relative_error_values_from_its_definition() -> None:
    # max |a - b| / (max |a| + max |b|), worked by hand.
    assert relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.5])) == pytest.approx(0.5 / 4.5)
    assert relative_error(np.array([-3.0, 0.0]), np.array([3.0, 0.0])) == pytest.approx(1.0)
    assert relative_error(np.zeros((2, 2)), np.zeros((2, 2))) == 0.0
    # A zero entry with rounding noise does not blow up (the elementwise CS231n ratio would be 1).
    assert relative_error(np.array([1.0, 0.0]), np.array([1.0, 1e-10])) < 1e-9


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (np.zeros(2), np.zeros(3), "shapes differ"),
        (np.zeros(0), np.zeros(0), "empty"),
        (np.array([np.nan]), np.zeros(1), "NaN"),
        (np.array([np.inf]), np.zeros(1), "NaN or inf"),
    ],
)
def test_relative_error_rejects_bad_input(a, b, message) -> None:
    with pytest.raises(ValueError, match=message):
        relative_error(a, b)


finite = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, 6, elements=finite), arrays(np.float64, 6, elements=finite))
def test_relative_error_is_symmetric_and_in_unit_interval(a, b) -> None:
    e = relative_error(a, b)
    assert 0.0 <= e <= 1.0 + 1e-15
    assert e == relative_error(b, a)
    assert relative_error(a, a.copy()) == 0.0

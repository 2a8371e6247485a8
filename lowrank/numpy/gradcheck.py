"""Gradient checking: centred finite differences and a relative error, in float64.

A hand-written backward pass is only as good as its check. The check is the definition of the
derivative itself: nudge one input element by +h and -h, see how the output moves,

    df/dx_i  ~=  (f(x + h e_i) - f(x - h e_i)) / (2h)          error O(h^2) + O(eps * |f| / h)

and compare that, element by element, with what backward returned. With float64 (eps ~ 2.2e-16)
and h = 1e-6 both error terms sit near 1e-10 of the gradient's scale, so a correct backward
agrees to a relative error of about 1e-9 and a wrong one (a missing transpose, a forgotten
scale) is off by order 1. Float32 would leave only ~1e-3: always check in float64.

This is the CS231n recipe (eval_numerical_gradient and eval_numerical_gradient_array), kept
small so that later issues and classroom assignments can reuse it:

    from lowrank.numpy import numerical_gradient_of_output, relative_error
    layer.forward(x); dx = layer.backward(dy)
    dx_num = numerical_gradient_of_output(lambda x: layer.forward(x), x, dy)
    assert relative_error(dx, dx_num) < 1e-7
"""

from collections.abc import Callable

import numpy as np

__all__ = ["numerical_gradient", "numerical_gradient_of_output", "relative_error"]


def _check_perturbable(x: np.ndarray, h: float) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float64:
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"x must be a float64 NumPy array (perturbed in place), got {got}")
    if not x.flags.writeable:
        raise ValueError("x must be writeable: its elements are perturbed in place and restored")
    if not h > 0:
        raise ValueError(f"step h must be positive, got {h}")


def _scalar(value: object) -> float:
    if np.ndim(value) != 0:
        raise ValueError(
            f"f must return a scalar, got shape {np.shape(value)}; for an array output use "
            "numerical_gradient_of_output(f, x, dout)"
        )
    return float(value)


def numerical_gradient(
    f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6
) -> np.ndarray:
    """Gradient of a scalar function `f` at `x` by centred finite differences.

    `x` must be a float64 array; each element is perturbed IN PLACE (x[i] += h, x[i] -= 2h) and
    restored exactly before the next one, so `f` may read `x` through any reference it holds
    (a layer's `A`, a model's weight). That is what makes it easy to check parameter gradients:
    `numerical_gradient(lambda _: loss(), layer.A)`. Costs 2 * x.size calls of `f`.
    Returns an array of x's shape.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import numerical_gradient
        >>> x = np.array([1.0, 2.0, 3.0])
        >>> numerical_gradient(lambda x: np.sum(x**2), x)  # d/dx sum(x^2) = 2x
        array([2., 4., 6.])
        >>> x  # restored exactly
        array([1., 2., 3.])
    """
    _check_perturbable(x, h)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        original = x[index]
        x[index] = original + h
        f_plus = _scalar(f(x))
        x[index] = original - h
        f_minus = _scalar(f(x))
        x[index] = original  # restore exactly (not original + h - h, which may round)
        grad[index] = (f_plus - f_minus) / (2 * h)
    return grad


def numerical_gradient_of_output(
    f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, dout: np.ndarray, h: float = 1e-6
) -> np.ndarray:
    """Vector-Jacobian product of an array-valued `f` at `x` with `dout`, by finite differences.

    This is what a layer's backward computes: given dL/dy = `dout` for y = f(x), return
    dL/dx = J^T dout, i.e. the gradient of the scalar sum(f(x) * dout). Differencing the two
    output arrays before contracting with `dout` (as CS231n's eval_numerical_gradient_array
    does) loses less precision than differencing the two scalar sums. `x` is perturbed in place
    and restored, as in `numerical_gradient`.

    Args:
        f: x (x's shape) -> an array of dout's shape.
        x: a float64 array, perturbed in place and restored.
        dout: dL/df(x), the shape of f(x).
        h: the finite-difference step.

    Returns:
        dL/dx, an array of x's shape.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import Linear, numerical_gradient_of_output, relative_error
        >>> rng = np.random.default_rng(0)
        >>> layer, x, dy = Linear(3, 2, rng=rng), rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
        >>> _ = layer.forward(x)
        >>> dx = layer.backward(dy)  # the hand-written backward pass, (4, 2) -> (4, 3)
        >>> dx_num = numerical_gradient_of_output(layer.forward, x, dy)
        >>> bool(relative_error(dx, dx_num) < 1e-7)
        True
    """
    _check_perturbable(x, h)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        original = x[index]
        x[index] = original + h
        out_plus = np.array(f(x), dtype=np.float64)  # copy: f may return a buffer it reuses
        x[index] = original - h
        out_minus = np.array(f(x), dtype=np.float64)
        x[index] = original
        if out_plus.shape != np.shape(dout):
            raise ValueError(f"f(x) has shape {out_plus.shape} but dout has {np.shape(dout)}")
        grad[index] = np.sum((out_plus - out_minus) * dout) / (2 * h)
    return grad


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / (max |a| + max |b|): the error relative to the arrays' scale, in [0, 1].

    CS231n divides element by element (|a_i - b_i| / max(1e-8, |a_i| + |b_i|)). That fails
    correct code whenever a true gradient entry is zero or tiny (a dead ReLU unit, a column that
    dropout removed): finite differences return rounding noise of ~1e-10 there, and the ratio
    of noise to a zero is order 1. Dividing by the scale of the whole array keeps the test
    sharp (a wrong backward is still off by order 1) without that false alarm. Two all-zero
    arrays have error 0. Rule of thumb in float64: < 1e-7 is correct, > 1e-3 is a bug.
    `a` and `b` must have the same shape (any shape); the result is a float.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import relative_error
        >>> round(relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.5])), 4)  # 0.5 / 4.5
        0.1111
        >>> relative_error(np.zeros(3), np.zeros(3))
        0.0
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError("cannot compare empty arrays")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("arrays contain NaN or inf")
    scale = np.max(np.abs(a)) + np.max(np.abs(b))
    if scale == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / scale)

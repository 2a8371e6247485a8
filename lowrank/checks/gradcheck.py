"""Checks for the gradient check students write themselves in "LoRA from scratch": centred finite
differences, and a relative error that stays honest where a true gradient is zero.

After CS231n's assignments (eval_numerical_gradient, rel_error); LoRA: Hu et al. 2021,
arXiv:2106.09685, whose backward pass the students check with it.

The oracle for `numerical_gradient` is the closed-form derivative of a smooth function; for
`relative_error` the definition, worked out on arrays chosen to separate it from the usual
element-wise variant. Threshold: 1e-8 against the closed form, because centred differences with
h = 1e-6 in float64 reach ~1e-10 on these sizes while one-sided differences only reach ~h
(`NUMGRAD_TOL`).

    check_relative_error(relative_error, student_id="ada@example.edu")  # None, or CheckFailed
"""

import math

import numpy as np

from ._feedback import (
    as_array,
    as_number,
    call,
    check_callable,
    check_own_work,
    close,
    fail,
    fmt,
    scaled_error,
)
from .lora import lora_variant

__all__ = ["NUMGRAD_TOL", "check_numerical_gradient", "check_relative_error"]

NUMGRAD_TOL = 1e-8


def check_numerical_gradient(numerical_gradient, *, student_id: str | None = None) -> None:
    """numerical_gradient(f, x, h=1e-6): the gradient of scalar f at float64 x by centred
    differences, perturbing x in place and restoring it (so f may read x through a reference).

    The gradient has x's shape; it is compared with the closed-form derivative of a smooth f
    (NUMGRAD_TOL), and x must come back exactly as it was. With `student_id` also with an f
    that reads x through a reference, as when checking a LoRA layer's A (Hu et al. 2021,
    arXiv:2106.09685).

    Examples:
        >>> def numerical_gradient(f, x, h=1e-6):
        ...     grad = np.zeros_like(x)
        ...     for i in np.ndindex(x.shape):
        ...         old = x[i]
        ...         x[i] = old + h
        ...         plus = f(x)
        ...         x[i] = old - h
        ...         minus = f(x)
        ...         x[i] = old
        ...         grad[i] = (plus - minus) / (2 * h)
        ...     return grad
        >>> check_numerical_gradient(numerical_gradient, student_id="ada@example.edu")  # right
        >>> def one_sided(f, x, h=1e-6):
        ...     grad = np.zeros_like(x)
        ...     for i in np.ndindex(x.shape):
        ...         old = x[i]
        ...         base = f(x)
        ...         x[i] = old + h
        ...         grad[i] = (f(x) - base) / h
        ...         x[i] = old
        ...     return grad
        >>> check_numerical_gradient(one_sided)
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_numerical_gradient: wrong gradient
        (relative error 3.6e-07 against the closed form; allowed 1e-08: centred differences
        reach ~1e-10)
          case:     f(x) = sum(c sin x) + sum(d x^2) / 2, x of shape (3, 5)
          expected: grad.flat[:3] = [ 1.0428  1.0036 -1.5411]
          got:      grad.flat[:3] = [ 1.0428  1.0036 -1.5411]
          hint:     one-sided differences (f(x + h) - f(x)) / h have error O(h) ~ 1e-6;
                    centred differences (f(x + h) - f(x - h)) / (2 h) cancel the h term:
                    error O(h^2)
    """
    check = "check_numerical_gradient"
    check_callable(check, numerical_gradient)
    check_own_work(check, numerical_gradient)
    v = lora_variant(student_id)
    rng = np.random.default_rng(v.seed)
    shape = (v.r, v.batch)
    c, d = rng.normal(size=shape), rng.normal(size=shape)
    x0 = rng.normal(size=shape)
    want = c * np.cos(x0) + d * x0  # d/dx [sum(c sin x) + sum(d x^2) / 2]

    def through_argument(z):
        return float(np.sum(c * np.sin(z)) + 0.5 * np.sum(d * z**2))

    cases = ["f(x) = sum(c sin x) + sum(d x^2) / 2"]
    if student_id is not None:
        cases.append("the same f, reading x through a reference (as when checking a layer's A)")
    for name in cases:
        x = x0.copy()
        f = through_argument if name == cases[0] else _reads(through_argument, x)
        case = f"{name}, x of shape {shape}"
        grad = as_array(
            check, call(check, numerical_gradient, f, x, case=case), "the gradient", case=case
        )
        if not np.array_equal(x, x0):
            fail(
                check,
                "x was not restored",
                expected="x exactly as it was before the call",
                got=f"x changed by up to {np.abs(x - x0).max():.3g}",
                hint="after evaluating f at x[i] + h and x[i] - h, put the original x[i] back "
                "(assign the saved value; x[i] + h - h may round)",
                case=case,
            )
        if grad.shape != shape:
            fail(
                check,
                "wrong shape",
                expected=shape,
                got=grad.shape,
                hint="one partial derivative per element of x",
                case=case,
            )
        if close(grad, want, NUMGRAD_TOL):
            continue
        h = 1e-6
        one_sided = c * (np.sin(x0 + h) - np.sin(x0)) / h + d * (x0 + h / 2)
        hint = "grad[i] = (f(x + h e_i) - f(x - h e_i)) / (2 h), one element at a time"
        if scaled_error(grad, one_sided) < 0.1 * scaled_error(one_sided, want):
            hint = (
                "one-sided differences (f(x + h) - f(x)) / h have error O(h) ~ 1e-6; centred "
                "differences (f(x + h) - f(x - h)) / (2 h) cancel the h term: error O(h^2)"
            )
        elif np.all(grad == 0):
            hint = "all zeros: if f reads x through a reference, perturb x itself, not a copy"
        fail(
            check,
            f"wrong gradient (relative error {scaled_error(grad, want):.2g} against the "
            f"closed form; allowed {NUMGRAD_TOL:g}: centred differences reach ~1e-10)",
            expected=f"grad.flat[:3] = {np.round(want.reshape(-1)[:3], 9)}",
            got=f"grad.flat[:3] = {np.round(grad.reshape(-1)[:3], 9)}",
            hint=hint,
            case=case,
        )


def _reads(f, x: np.ndarray):
    """f evaluated at `x` whatever argument it is given: f reads x through a reference."""
    return lambda _: f(x)


def check_relative_error(relative_error, *, student_id: str | None = None) -> None:
    """relative_error(a, b) = max |a - b| / (max |a| + max |b|), and 0 for two zero arrays.

    a and b are arrays of one shape; the answer is a float. Checked on two random arrays, on a
    true zero next to finite-difference noise (where an element-by-element ratio blows up) and
    on two zero arrays.

    Examples:
        >>> def relative_error(a, b):
        ...     scale = np.abs(a).max() + np.abs(b).max()
        ...     return 0.0 if scale == 0 else float(np.abs(a - b).max() / scale)
        >>> check_relative_error(relative_error, student_id="ada@example.edu")  # silent: right
        >>> def unguarded(a, b):
        ...     return float(np.abs(a - b).max()) / float(np.abs(a).max() + np.abs(b).max())
        >>> check_relative_error(unguarded)
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_relative_error: your function raised
        ZeroDivisionError: float division by zero
          case:     two zero arrays, shape (3,)
          expected: a result
          got:      ZeroDivisionError
          hint:     run the case above yourself and read the traceback
    """
    check = "check_relative_error"
    check_callable(check, relative_error)
    check_own_work(check, relative_error)
    v = lora_variant(student_id)
    rng = np.random.default_rng(v.seed)
    a = rng.normal(size=(v.r, v.batch))
    b = a + 1e-3 * rng.normal(size=a.shape)
    sparse = np.zeros(5)
    sparse[0] = 1.0
    cases = [
        ("two random arrays", a, b),
        ("a true zero next to finite-difference noise", sparse, sparse + [0, 1e-12, 0, 0, 0]),
        ("two zero arrays", np.zeros(3), np.zeros(3)),
    ]
    for name, p, q in cases:
        scale = np.abs(p).max() + np.abs(q).max()
        want = 0.0 if scale == 0 else float(np.abs(p - q).max() / scale)
        case = f"{name}, shape {p.shape}"
        got = as_number(
            check,
            call(check, relative_error, p.copy(), q.copy(), case=case),
            "the relative error",
            case=case,
        )
        if math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-300):
            continue
        hint = "divide the largest difference by the arrays' scale, max |a| + max |b|"
        if name.startswith("a true zero") and got > 1e3 * want:
            hint = (
                "an element-by-element ratio |a_i - b_i| / (|a_i| + |b_i|) is ~1 wherever the "
                "true gradient is 0 and finite differences left 1e-12 of noise; relate the "
                "difference to the scale of the whole array instead"
            )
        elif name.startswith("two zero") and not math.isfinite(got):
            hint = "two zero arrays agree perfectly: return 0 instead of dividing 0 by 0"
        fail(check, "wrong value", expected=fmt(want), got=fmt(got), hint=hint, case=case)

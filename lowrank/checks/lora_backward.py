"""Checks for "LoRA from scratch" (NumPy), part 2: the backward pass (dA, dB, dx), the merge,
and the trainable-parameter answer; part 1 (scale, forward, initialisation, the variant and the
test layers) is `lora.py`, whose docstring states the oracles and thresholds.

LoRA: Hu et al. 2021, arXiv:2106.09685. The gradients are compared with centred finite
differences of the forward formula written out (GRAD_TOL), the merge with the float64 update
it must add (MERGE_TOL).

    check_lora_backward(lora_backward, student_id="ada@example.edu")  # None, or CheckFailed
"""

import numpy as np

from ._feedback import (
    as_array,
    as_number,
    call,
    check_callable,
    check_own_work,
    close,
    describe,
    fail,
    fmt,
    scaled_error,
)
from .lora import GRAD_TOL, MERGE_TOL, _case_text, _cases, _forward, _layer, lora_variant

__all__ = ["check_lora_backward", "check_merge", "check_trainable_answer"]


def _centred_differences(loss, array: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d loss / d array by centred differences, perturbing `array` in place and restoring it."""
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + h
        plus = loss()
        array[index] = original - h
        minus = loss()
        array[index] = original
        grad[index] = (plus - minus) / (2 * h)
    return grad


def _numeric_gradients(d: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """dL/dx, dL/dA, dL/dB of L = sum(dy * y) by centred differences of the forward formula."""
    x, W, b, A, B, dy = (d[k] for k in ("x", "W", "b", "A", "B", "dy"))

    def loss() -> float:
        return float(np.sum(dy * _forward(x, W, b, A, B, scale)))

    return {key: _centred_differences(loss, d[key[1:]]) for key in ("dx", "dA", "dB")}


def check_lora_backward(lora_backward, *, student_id: str | None = None) -> None:
    """lora_backward(dy, x, W, A, B, scale) -> (dx, dA, dB), the gradients of
    L = sum(dy * y) for y = x W^T + b + scale x A^T B^T, checked by finite differences.

    dy and x (..., out) and (..., in), W (out, in), A (r, in), B (out, r); dx, dA, dB have the
    shapes of x, A and B. The backward pass of a LoRA layer (Hu et al. 2021,
    arXiv:2106.09685), compared with centred differences (GRAD_TOL); with `student_id` also on
    the student's sizes and on x with two leading dimensions.

    Examples:
        >>> def lora_backward(dy, x, W, A, B, scale):
        ...     dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])  # (N, .)
        ...     dx = dy @ W + scale * (dy @ B) @ A  # (..., out) -> (..., in)
        ...     dA = scale * (dy2 @ B).T @ x2  # (r, N) @ (N, in) -> (r, in)
        ...     dB = scale * dy2.T @ (x2 @ A.T)  # (out, N) @ (N, r) -> (out, r)
        ...     return dx, dA, dB
        >>> check_lora_backward(lora_backward, student_id="ada@example.edu")  # silent: right
        >>> def no_scale_on_dB(dy, x, W, A, B, scale):
        ...     dx = dy @ W + scale * (dy @ B) @ A
        ...     return dx, scale * (dy @ B).T @ x, dy.T @ (x @ A.T)
        >>> check_lora_backward(no_scale_on_dB)
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_lora_backward: dB is wrong (relative
        error 0.68 against finite differences; allowed 1e-07, centred differences reach ~1e-10)
          case:     public sizes: x (5, 12), W (10, 12), A (3, 12), B (10, 3), scale 5.33333
          expected: dB.flat[:3] = [-2.0159 -3.8039 -3.1961]
          got:      dB.flat[:3] = [-0.378  -0.7132 -0.5993]
          hint:     dB is missing the factor scale = 5.33333 (the LoRA path is scaled)
    """
    check = "check_lora_backward"
    check_callable(check, lora_backward)
    check_own_work(check, lora_backward)
    for name, v, lead in _cases(student_id):
        d = _layer(v, lead)
        scale = v.alpha / v.r
        case = _case_text(name, v, d, scale)
        args = [d[k].copy() for k in ("dy", "x", "W", "A", "B")]
        result = call(check, lora_backward, *args, scale, case=case)
        if not isinstance(result, tuple | list) or len(result) != 3:
            fail(
                check,
                "expected three arrays",
                expected="(dx, dA, dB)",
                got=describe(result),
                hint="return dx, dA, dB",
                case=case,
            )
        numeric = _numeric_gradients(d, scale)
        x, W, A, B, dy = (d[k] for k in ("x", "W", "A", "B", "dy"))
        shapes = {"dx": x.shape, "dA": A.shape, "dB": B.shape}
        for key, got in zip(("dx", "dA", "dB"), result, strict=True):
            got = as_array(check, got, key, case=case)
            want = numeric[key]
            if got.shape != shapes[key]:
                hint = f"a gradient has the shape of what it differentiates: {key} like {key[1:]}"
                if got.shape == shapes[key][::-1]:
                    hint = (
                        f"{key} is off by a transpose: e.g. dL/dB = scale * dy^T h (out, r) with "
                        "h = x A^T, not h^T dy"
                    )
                fail(
                    check,
                    f"{key} has the wrong shape",
                    expected=shapes[key],
                    got=got.shape,
                    hint=hint,
                    case=case,
                )
            if close(got, want, GRAD_TOL):
                continue
            hint = "derive it from y = x W^T + b + scale * (x A^T) B^T with the chain rule"
            if close(got * scale, want, GRAD_TOL):
                hint = f"{key} is missing the factor scale = {fmt(scale)} (the LoRA path is scaled)"
            elif close(got / scale, want, GRAD_TOL):
                hint = f"{key} has the factor scale twice"
            elif key == "dx" and close(got, want - dy @ W, GRAD_TOL):
                hint = "dx misses the frozen path: dL/dx = dy W + scale * (dy B) A"
            elif key == "dx" and close(got, dy @ W, GRAD_TOL):
                hint = "dx misses the LoRA path: dL/dx = dy W + scale * (dy B) A"
            elif close(got, -want, GRAD_TOL):
                hint = f"{key} has the wrong sign"
            fail(
                check,
                f"{key} is wrong (relative error {scaled_error(got, want):.2g} against finite "
                f"differences; allowed {GRAD_TOL:g}, centred differences reach ~1e-10)",
                expected=f"{key}.flat[:3] = {np.round(want.reshape(-1)[:3], 5)}",
                got=f"{key}.flat[:3] = {np.round(got.reshape(-1)[:3], 5)}",
                hint=hint,
                case=case,
            )


def check_merge(merge_lora, *, student_id: str | None = None) -> None:
    """merge_lora(W, A, B, scale) -> W + scale * B @ A [out, in], in W's dtype (float64).

    W (out, in), A (r, in), B (out, r). Merging is why LoRA adds no inference latency (Hu et
    al. 2021, arXiv:2106.09685, section 4.1); the update W' - W is compared with scale * B @ A
    in float64 (MERGE_TOL), which also catches a merge rounded to float32 or float16.

    Examples:
        >>> check_merge(lambda W, A, B, scale: W + scale * B @ A)  # silent: right
        >>> check_merge(lambda W, A, B, scale: W + B @ A)
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_merge: the merged update W' - W is wrong
        (relative error 0.68; allowed 1e-09, a float64 merge is exact to ~1e-13)
          case:     W (10, 12) float64, A (3, 12), B (10, 3), scale 5.33333
          expected: scale * B @ A, e.g. [0, :3] = [ 0.0012 -0.008  -0.0226]
          got:      [0, :3] = [ 0.0002 -0.0015 -0.0042]
          hint:     the scale is missing: the layer computed scale * B A, so the merge must
                    add that
    """
    check = "check_merge"
    check_callable(check, merge_lora)
    check_own_work(check, merge_lora)
    v = lora_variant(student_id)
    rng = np.random.default_rng(v.seed)
    W = rng.normal(size=(v.out_features, v.in_features))  # pre-trained weights, O(1)
    A = rng.normal(size=(v.r, v.in_features)) * 0.03  # a trained adapter: an update ~1e-3
    B = rng.normal(size=(v.out_features, v.r)) * 0.03
    scale = v.alpha / v.r
    case = f"W {W.shape} float64, A {A.shape}, B {B.shape}, scale {fmt(scale)}"
    merged = call(check, merge_lora, W.copy(), A.copy(), B.copy(), scale, case=case)
    merged = as_array(check, merged, "the merged weight", case=case)
    if merged.shape != W.shape:
        hint = "B @ A is (out, r) @ (r, in) = (out, in), the shape of W"
        if merged.shape == W.shape[::-1]:
            hint = "transposed: A^T B^T is (in, out); the update to W is B @ A"
        fail(check, "wrong shape", expected=W.shape, got=merged.shape, hint=hint, case=case)
    if merged.dtype != W.dtype:
        fail(
            check,
            "the merged weight lost precision",
            expected=f"dtype {W.dtype} (W's)",
            got=f"dtype {merged.dtype}",
            hint="merge in W's dtype (or higher) and keep it: a low-precision merge rounds the "
            "small update away",
            case=case,
        )
    update, want = merged - W, scale * (B @ A)
    if close(update, want, MERGE_TOL):
        return
    hint = "the merged weight is W + scale * B @ A"
    for low in (np.float16, np.float32):
        lossy = (W.astype(low) + (scale * (B @ A)).astype(low)).astype(np.float64) - W
        if scaled_error(update, lossy) < 0.2 * max(scaled_error(lossy, want), 1e-300):
            hint = (
                f"a merge done in low precision ({np.dtype(low).name}): W + scale B A rounded to "
                f"{np.dtype(low).name} loses {scaled_error(lossy, want):.1%} of the update; "
                "compute it in float64 (W's dtype)"
            )
    if close(update, B @ A, MERGE_TOL):
        hint = "the scale is missing: the layer computed scale * B A, so the merge must add that"
    fail(
        check,
        f"the merged update W' - W is wrong (relative error {scaled_error(update, want):.2g}; "
        f"allowed {MERGE_TOL:g}, a float64 merge is exact to ~1e-13)",
        expected=f"scale * B @ A, e.g. [0, :3] = {np.round(want[0, :3], 6)}",
        got=f"[0, :3] = {np.round(update[0, :3], 6)}",
        hint=hint,
        case=case,
    )


def check_trainable_answer(my_trainable_parameters, *, student_id: str) -> None:
    """The number of parameters LoRA trains on the student's own layer: r * (in + out).

    `my_trainable_parameters` is the student's number (not a function), for the sizes of
    `lora_variant(student_id)`; A has r * in entries, B out * r (Hu et al. 2021,
    arXiv:2106.09685).

    Examples:
        >>> lora_variant("ada@example.edu")  # in 15, out 8, r 2: 2 * (15 + 8) = 46
        LoRAVariant(batch=7, in_features=15, out_features=8, r=2, alpha=32.0, seed=1676079706)
        >>> check_trainable_answer(46, student_id="ada@example.edu")  # silent: right
        >>> check_trainable_answer(15 * 8, student_id="ada@example.edu")
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_trainable_answer: wrong count
          case:     your layer: in=15, out=8, r=2
          expected: 46
          got:      120
          hint:     that is W's size; LoRA trains only A and B
    """
    check = "check_trainable_answer"
    v = lora_variant(student_id)
    want = v.r * (v.in_features + v.out_features)
    case = f"your layer: in={v.in_features}, out={v.out_features}, r={v.r}"
    got = as_number(check, my_trainable_parameters, "my_trainable_parameters", case=case)
    if got != want:
        hint = "A has r * in numbers and B has out * r: count both (W and b are frozen)"
        if got == v.in_features * v.out_features:
            hint = "that is W's size; LoRA trains only A and B"
        fail(check, "wrong count", expected=fmt(want), got=fmt(got), hint=hint, case=case)

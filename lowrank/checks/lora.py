"""Checks for "LoRA from scratch" (NumPy), part 1: the scale, forward and initialisation of one
LoRA linear layer, and the variant and test layers every check of this assignment uses
(backward and merge: `lora_backward.py`; the student's own gradient check: `gradcheck.py`).

LoRA: Hu et al. 2021, arXiv:2106.09685 (y = x W^T + b + (alpha / r) x A^T B^T, B = 0 at start);
rsLoRA: Kalajdzievski 2023, arXiv:2312.03732 (alpha / sqrt(r)).

The oracles are independent of any implementation of LoRA: the forward pass is the formula
written out in one line; every gradient is a centred finite difference of that formula; the
merge is compared in float64 with the update it must add. Thresholds (relative to the arrays'
scale, see `scaled_error`) and why:

- forward, 1e-12: float64 rounding over a few dozen multiply-adds stays near 1e-15; a missing
  term or a lost scale is off by order 1.
- merge, 1e-9 on the update W' - W (about 1e3 times smaller than W): a float64 merge gets it
  to ~1e-13, one done in float32 is off by ~1e-4 of it, in float16 by ~10%.
- gradients, 1e-7: centred differences with h = 1e-6 in float64 are accurate to ~1e-10 on
  these sizes; a transposed or unscaled gradient is off by order 1.

Sizes are per student (`lora_variant`): batch, in, out and r are all different, so a transpose
shows up as a wrong shape rather than as silently wrong numbers.

Constants: `ASSIGNMENT`, the name that seeds every variant; `FORWARD_TOL`, `GRAD_TOL` and
`MERGE_TOL`, the thresholds above.

    check_lora_forward(lora_forward, student_id="ada@example.edu")  # None, or CheckFailed
"""

import math
from dataclasses import dataclass

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
    student_rng,
)

__all__ = [
    "ASSIGNMENT",
    "FORWARD_TOL",
    "GRAD_TOL",
    "MERGE_TOL",
    "LoRAVariant",
    "check_lora_forward",
    "check_lora_init",
    "check_lora_scale",
    "lora_variant",
]

ASSIGNMENT = "lora_from_scratch"


FORWARD_TOL = 1e-12


GRAD_TOL = 1e-7


MERGE_TOL = 1e-9  # on the update W' - W, which is ~1e3 times smaller than W


@dataclass(frozen=True)
class LoRAVariant:
    """One student's sizes: x [batch, in], W [out, in], A [r, in], B [out, r]; alpha; a seed.

    Made by `lora_variant`; the checks build their test layers from it.

    Examples:
        >>> v = lora_variant()  # the public variant
        >>> v
        LoRAVariant(batch=5, in_features=12, out_features=10, r=3, alpha=16.0, seed=1299029890)
        >>> (v.batch, v.in_features), (v.r, v.in_features), (v.out_features, v.r)  # x, A, B
        ((5, 12), (3, 12), (10, 3))
    """

    batch: int
    in_features: int
    out_features: int
    r: int
    alpha: float
    seed: int


def lora_variant(student_id: str | None = None) -> LoRAVariant:
    """The sizes and seed of `student_id` (None: the public variant). Ranges are disjoint
    (r 2-4, batch 5-7, out 8-11, in 12-16), so no two sizes coincide. The same id always
    gets the same variant (a SHA-256 of the id seeds it); ids are compared without case.

    Examples:
        >>> lora_variant("ada@example.edu")
        LoRAVariant(batch=7, in_features=15, out_features=8, r=2, alpha=32.0, seed=1676079706)
        >>> lora_variant("Ada@Example.edu ") == lora_variant("ada@example.edu")
        True
        >>> lora_variant(42)
        Traceback (most recent call last):
        ...
        TypeError: student_id must be a str or None, got int
    """
    rng = student_rng(student_id, ASSIGNMENT)
    return LoRAVariant(
        batch=int(rng.integers(5, 8)),
        in_features=int(rng.integers(12, 17)),
        out_features=int(rng.integers(8, 12)),
        r=int(rng.integers(2, 5)),
        alpha=float(rng.choice([1.0, 8.0, 16.0, 32.0])),
        seed=int(rng.integers(2**31)),
    )


def _layer(v: LoRAVariant, lead: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Random float64 arrays for one case: x (*lead, batch, in), W, b, A, B (non-zero), dy."""
    rng = np.random.default_rng(v.seed)
    return {
        "x": rng.normal(size=(*lead, v.batch, v.in_features)),
        "W": rng.normal(size=(v.out_features, v.in_features)) / math.sqrt(v.in_features),
        "b": rng.normal(size=v.out_features),
        "A": rng.normal(size=(v.r, v.in_features)) / math.sqrt(v.in_features),
        "B": rng.normal(size=(v.out_features, v.r)),
        "dy": rng.normal(size=(*lead, v.batch, v.out_features)),
    }


def _forward(x, W, b, A, B, scale):
    return x @ W.T + b + scale * (x @ A.T) @ B.T  # (..., in) -> (..., out)


def _cases(student_id: str | None) -> list[tuple[str, LoRAVariant, tuple[int, ...]]]:
    """The public variant, and with a student id also theirs and a 3-D batch of theirs."""
    cases = [("public sizes", lora_variant(None), ())]
    if student_id is not None:
        v = lora_variant(student_id)
        cases += [("your sizes", v, ()), ("your sizes, x with two leading dims", v, (2,))]
    return cases


def _case_text(name: str, v: LoRAVariant, data: dict[str, np.ndarray], scale: float) -> str:
    return (
        f"{name}: x {data['x'].shape}, W {data['W'].shape}, A {data['A'].shape}, "
        f"B {data['B'].shape}, scale {fmt(scale)}"
    )


def check_lora_scale(lora_scale, *, student_id: str | None = None) -> None:
    """lora_scale(alpha, r, use_rslora=False) must be alpha / r, or alpha / sqrt(r) with rsLoRA.

    LoRA's scale (Hu et al. 2021, arXiv:2106.09685, section 4.1); rsLoRA's (Kalajdzievski
    2023, arXiv:2312.03732). Checked on a few (alpha, r) pairs, with `student_id` also the
    student's own. Returns None when right; raises `CheckFailed` with a hint otherwise.

    Examples:
        >>> import math
        >>> def lora_scale(alpha, r, use_rslora=False):
        ...     return alpha / math.sqrt(r) if use_rslora else alpha / r
        >>> check_lora_scale(lora_scale, student_id="ada@example.edu")  # silent: right
        >>> check_lora_scale(lambda alpha, r, use_rslora=False: alpha)
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_lora_scale: wrong scale
          case:     alpha=16, r=8, use_rslora=False
          expected: 2
          got:      16
          hint:     you returned alpha itself, not alpha / r: dividing by r keeps the update's
                    size roughly the same when you change r, so alpha need not be retuned
    """
    check = "check_lora_scale"
    check_callable(check, lora_scale)
    check_own_work(check, lora_scale)
    pairs = [(16.0, 8), (16.0, 4), (8.0, 2)]
    if student_id is not None:
        v = lora_variant(student_id)
        pairs.append((v.alpha, v.r))
    for alpha, r in pairs:
        for rslora in (False, True):
            case = f"alpha={fmt(alpha)}, r={r}, use_rslora={rslora}"
            got = as_number(
                check,
                call(check, lora_scale, alpha, r, use_rslora=rslora, case=case),
                "the scale",
                case=case,
            )
            want = alpha / math.sqrt(r) if rslora else alpha / r
            if math.isclose(got, want, rel_tol=1e-12):
                continue
            hint = "LoRA's update is scale * B A with scale = alpha / r (rsLoRA: alpha / sqrt(r))"
            if math.isclose(got, alpha):
                hint = (
                    "you returned alpha itself, not alpha / r: dividing by r keeps the update's "
                    "size roughly the same when you change r, so alpha need not be retuned"
                )
            elif rslora and math.isclose(got, alpha / r):
                hint = (
                    "rsLoRA divides by sqrt(r), not r: with alpha / r the update of a high-rank "
                    "adapter shrinks like 1 / sqrt(r) and learns more slowly (Kalajdzievski 2023)"
                )
            elif not rslora and math.isclose(got, alpha / math.sqrt(r)):
                hint = "that is rsLoRA's alpha / sqrt(r); with use_rslora=False it is alpha / r"
            elif math.isclose(got, r / alpha) or math.isclose(got, math.sqrt(r) / alpha):
                hint = "upside down: alpha is the numerator"
            fail(check, "wrong scale", expected=fmt(want), got=fmt(got), hint=hint, case=case)


def check_lora_forward(lora_forward, *, student_id: str | None = None) -> None:
    """lora_forward(x, W, b, A, B, scale): x W^T + b + scale * x A^T B^T, shape (..., out).

    x (..., in), W (out, in), b (out,), A (r, in), B (out, r), float64; the LoRA forward pass
    (Hu et al. 2021, arXiv:2106.09685), compared with the formula written out (FORWARD_TOL).
    With `student_id` also on the student's sizes and on x with two leading dimensions.

    Examples:
        >>> def lora_forward(x, W, b, A, B, scale):
        ...     return x @ W.T + b + scale * (x @ A.T) @ B.T
        >>> check_lora_forward(lora_forward, student_id="ada@example.edu")  # silent: right
        >>> check_lora_forward(lambda x, W, b, A, B, scale: x @ W.T + b + (x @ A.T) @ B.T)
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_lora_forward: wrong values (relative
        error 0.65, allowed 1e-12: float64 rounding is ~1e-15)
          case:     public sizes: x (5, 12), W (10, 12), A (3, 12), B (10, 3), scale 5.33333
          expected: x W^T + b + scale x A^T B^T: y.flat[:3] = [16.7673  5.5171 -3.1641]
          got:      y.flat[:3] = [4.8327 0.1431 1.0592]
          hint:     the scale is missing: multiply the LoRA path by scale
    """
    check = "check_lora_forward"
    check_callable(check, lora_forward)
    check_own_work(check, lora_forward)
    for name, v, lead in _cases(student_id):
        d = _layer(v, lead)
        scale = v.alpha / v.r
        case = _case_text(name, v, d, scale)
        args = [d[k].copy() for k in ("x", "W", "b", "A", "B")]
        y = as_array(check, call(check, lora_forward, *args, scale, case=case), "y", case=case)
        want = _forward(d["x"], d["W"], d["b"], d["A"], d["B"], scale)
        if y.shape != want.shape:
            hint = "y has one row per example: (..., in) @ (in, out) -> (..., out)"
            if y.shape == want.shape[::-1] or y.shape == (v.out_features, v.batch):
                hint = (
                    "you computed with column vectors (W x); here each ROW of x is an example, "
                    "so y = x W^T + b + scale * x A^T B^T"
                )
            elif y.shape[-1] == v.r:
                hint = "you stopped at h = x A^T (..., r); multiply by B^T to get back to out"
            fail(check, "wrong shape", expected=want.shape, got=y.shape, hint=hint, case=case)
        if close(y, want, FORWARD_TOL):
            continue
        x, W, b, A, B = (d[k] for k in ("x", "W", "b", "A", "B"))
        lora = (x @ A.T) @ B.T
        suspects = [
            (x @ W.T + b, "the LoRA path is missing: add scale * (x A^T) B^T"),
            (scale * lora, "the frozen path x W^T + b is missing: LoRA adds to it"),
            (x @ W.T + b + lora, "the scale is missing: multiply the LoRA path by scale"),
            (x @ W.T + scale * lora, "the bias b is missing"),
        ]
        hint = next((h for s, h in suspects if close(y, s, FORWARD_TOL)), "compare term by term")
        fail(
            check,
            f"wrong values (relative error {scaled_error(y, want):.2g}, allowed "
            f"{FORWARD_TOL:g}: float64 rounding is ~1e-15)",
            expected=f"x W^T + b + scale x A^T B^T: y.flat[:3] = {np.round(want.flat[:3], 4)}",
            got=f"y.flat[:3] = {np.round(y.flat[:3], 4)}",
            hint=hint,
            case=case,
        )


def check_lora_init(init_lora, *, student_id: str | None = None) -> None:
    """init_lora(in_features, out_features, r, rng) -> (A [r, in], B [out, r]): A drawn from
    `rng` like nn.Linear's weight, uniform(-1/sqrt(in), 1/sqrt(in)); B all zeros.

    LoRA's initialisation (Hu et al. 2021, arXiv:2106.09685, section 4.1): B = 0, so the
    adapted layer starts as the pre-trained one. Checked for shapes, B = 0, A's range and
    spread (on a large case) and that A comes from `rng`.

    Examples:
        >>> import math
        >>> def init_lora(in_features, out_features, r, rng):
        ...     bound = 1 / math.sqrt(in_features)
        ...     A = rng.uniform(-bound, bound, size=(r, in_features))
        ...     return A, np.zeros((out_features, r))
        >>> check_lora_init(init_lora)  # silent: right
        >>> def init_both(in_features, out_features, r, rng):
        ...     bound = 1 / math.sqrt(in_features)
        ...     A = rng.uniform(-bound, bound, size=(r, in_features))
        ...     return A, rng.normal(size=(out_features, r))
        >>> check_lora_init(init_both)
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_lora_init: B is not zero at start
          case:     in_features=12, out_features=10, r=3, rng=default_rng(1299029890)
          expected: B = 0 everywhere
          got:      max |B| = ...
          hint:     with B = 0 the update B A is zero, so the adapted layer starts exactly as
                    the pre-trained one (y = x W^T + b); a random B would change the model
                    before any training
    """
    check = "check_lora_init"
    check_callable(check, init_lora)
    check_own_work(check, init_lora)
    v = lora_variant(student_id)
    sizes = [(v.in_features, v.out_features, v.r), (256, 96, 64)]  # the last: enough samples
    for in_f, out_f, r in sizes:
        case = f"in_features={in_f}, out_features={out_f}, r={r}, rng=default_rng({v.seed})"
        result = call(check, init_lora, in_f, out_f, r, np.random.default_rng(v.seed), case=case)
        if not isinstance(result, tuple) or len(result) != 2:
            fail(
                check,
                "expected two arrays",
                expected="(A, B)",
                got=type(result).__name__,
                hint="return A, B",
                case=case,
            )
        A = as_array(check, result[0], "A", case=case)
        B = as_array(check, result[1], "B", case=case)
        for name, array, shape in (("A", A, (r, in_f)), ("B", B, (out_f, r))):
            if array.shape != shape:
                hint = "A [r, in] maps x down to r numbers; B [out, r] maps them up to out"
                if array.shape == shape[::-1]:
                    hint = f"{name} is transposed: the paper's {name} is {shape}"
                fail(
                    check,
                    f"{name} has the wrong shape",
                    expected=shape,
                    got=array.shape,
                    hint=hint,
                    case=case,
                )
        if np.any(B != 0):
            fail(
                check,
                "B is not zero at start",
                expected="B = 0 everywhere",
                got=f"max |B| = {np.abs(B).max():.3g}",
                hint="with B = 0 the update B A is zero, so the adapted layer starts exactly as "
                "the pre-trained one (y = x W^T + b); a random B would change the model "
                "before any training",
                case=case,
            )
        if not np.any(A != 0):
            fail(
                check,
                "A is all zeros",
                expected="A random, uniform(-1/sqrt(in), 1/sqrt(in))",
                got="A = 0",
                hint="with A = 0 and B = 0 both gradients vanish (dL/dB = scale dy^T (x A^T) = 0, "
                "dL/dA = scale (dy B)^T x = 0): nothing ever trains. Only B starts at zero",
                case=case,
            )
        bound = 1 / math.sqrt(in_f)
        std = float(np.std(A))
        if np.abs(A).max() > bound * (1 + 1e-12) or (
            A.size >= 4096 and abs(std - bound / math.sqrt(3)) > 0.05 * bound / math.sqrt(3)
        ):
            fail(
                check,
                "A is not drawn like nn.Linear's weight",
                expected=f"uniform(-{bound:.4f}, {bound:.4f}): |A| <= {bound:.4f}, "
                f"std {bound / math.sqrt(3):.4f}",
                got=f"max |A| = {np.abs(A).max():.4f}, std {std:.4f}",
                hint="kaiming_uniform(a=sqrt(5)) works out to uniform(-1/sqrt(in), 1/sqrt(in)); "
                "use rng.uniform(-bound, bound, size=(r, in))",
                case=case,
            )
        again = call(check, init_lora, in_f, out_f, r, np.random.default_rng(v.seed), case=case)
        other = call(check, init_lora, in_f, out_f, r, np.random.default_rng(v.seed + 1), case=case)
        if not np.array_equal(again[0], A) or np.array_equal(other[0], A):
            fail(
                check,
                "A does not come from the rng you were given",
                expected="the same A for the same rng seed, a different A for another seed",
                got="A ignores the rng",
                hint="draw with the `rng` argument (rng.uniform), not np.random or a fixed seed",
                case=case,
            )

"""Tests for lowrank.numpy.loftq: LoftQ's alternating 4-bit + rank-r fit of one matrix.

Oracles (float64): NumPy's dense SVD of the residual W - deq(Q) (Eckart-Young: the error after
the SVD step must equal the root of the sum of its singular values beyond r), plain NF4's error
||W - deq(Q(W))|| (`quantize_4bit` / `dequantize_4bit`, themselves checked bit for bit against
bitsandbytes), and the full-rank case (error 0). Tolerances: 1e-10 relative for float64 SVD
identities on numbers of size ~1; the "does not increase with T" check is measured on these
fixed seeds (re-quantizing around the fit can move the block scales, so it is not a theorem).
"""

import numpy as np
import pytest

from lowrank.numpy import dequantize_4bit, quantize_4bit
from lowrank.numpy.loftq import loftq

W = np.random.default_rng(0).normal(size=(48, 96)) * 0.05  # (out, in), a weight's size


def start_error(q, A, B, scale, weight=W):
    return np.linalg.norm(weight - (dequantize_4bit(q) + scale * B @ A))


def nf4_error(weight=W, **options):
    return np.linalg.norm(weight - dequantize_4bit(quantize_4bit(weight, **options)))


@pytest.mark.parametrize("num_iters", [1, 2, 4])
def test_the_error_is_the_eckart_young_optimum_for_its_q(num_iters):
    q, A, B = loftq(W, 6, scale=2.0, num_iters=num_iters)
    S = np.linalg.svd(W - dequantize_4bit(q), compute_uv=False)  # dense, independent
    np.testing.assert_allclose(start_error(q, A, B, 2.0), np.sqrt(np.sum(S[6:] ** 2)), rtol=1e-10)


def test_first_step_quantizes_w_itself():
    q, _, _ = loftq(W, 6, scale=2.0, num_iters=1)
    np.testing.assert_array_equal(q.packed, quantize_4bit(W).packed)
    np.testing.assert_array_equal(q.absmax, quantize_4bit(W).absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_error_drops_below_plain_nf4_and_does_not_rise_with_t(quant_type):
    errors = [nf4_error(quant_type=quant_type)]
    for num_iters in range(1, 6):
        q, A, B = loftq(W, 8, scale=2.0, num_iters=num_iters, quant_type=quant_type)
        errors.append(start_error(q, A, B, 2.0))
    assert errors[1] < errors[0]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errors, errors[1:], strict=False)), errors


def test_full_rank_fits_the_error_exactly():
    q, A, B = loftq(W, 48, scale=2.0)
    assert start_error(q, A, B, 2.0) < 1e-12 * np.linalg.norm(W)


def test_the_scale_is_split_evenly_and_s_b_a_does_not_depend_on_it():
    q1, A1, B1 = loftq(W, 4, scale=1.0)
    q4, A4, B4 = loftq(W, 4, scale=4.0)
    np.testing.assert_array_equal(q1.packed, q4.packed)  # T = 1: both quantize W
    np.testing.assert_allclose(4.0 * B4 @ A4, B1 @ A1, atol=1e-12)
    S = np.linalg.svd(W - dequantize_4bit(q4), compute_uv=False)[:4]
    np.testing.assert_allclose(A4 @ A4.T, np.diag(S / 4.0), atol=1e-12)  # A A^T = S_r / s
    np.testing.assert_allclose(B4.T @ B4, np.diag(S / 4.0), atol=1e-12)


def test_q_keeps_the_dtype_of_w():
    q, A, B = loftq(W.astype(np.float32), 4, scale=1.0)
    assert q.dtype == np.float32 and A.dtype == B.dtype == np.float64


@pytest.mark.parametrize(
    ("args", "options", "error", "match"),
    [
        ((W, 0), {"scale": 1.0}, ValueError, "r must be"),
        ((W, 49), {"scale": 1.0}, ValueError, "r must be"),
        ((W, 2.0), {"scale": 1.0}, TypeError, "r must be"),
        ((W, 2), {"scale": 0.0}, ValueError, "scale"),
        ((W, 2), {"scale": 1.0, "num_iters": 0}, ValueError, "num_iters"),
        ((W, 2), {"scale": 1.0, "num_iters": True}, TypeError, "num_iters"),
        ((W, 2), {"scale": 1.0, "quant_type": "nf8"}, ValueError, "quant_type"),
        ((W[0], 1), {"scale": 1.0}, ValueError, "2-D"),
        ((np.full((4, 4), np.nan), 1), {"scale": 1.0}, ValueError, "NaN"),
        ((np.ones((4, 4), int), 1), {"scale": 1.0}, TypeError, "floating"),
    ],
)
def test_bad_arguments_are_refused_by_name(args, options, error, match):
    with pytest.raises(error, match=match):
        loftq(*args, **options)

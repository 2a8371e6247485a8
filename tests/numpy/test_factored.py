"""lowrank.numpy.factored against the dense product: the oracle builds B @ A and takes its
singular values from the eigenvalues of its Gram matrix (np.linalg.eigvalsh), never from QR or
from np.linalg.svd of a core. Float64 throughout; tolerances are relative to s_1 at 1e-9 (the
Gram route squares the condition number, so its small singular values carry ~1e-8 * s_1 of
round-off; we compare only singular values above that)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank.numpy.factored import factored_best_rank_r, factored_core, factored_svd


def dense_singular_values(M: np.ndarray) -> np.ndarray:
    gram = M.T @ M if M.shape[1] <= M.shape[0] else M @ M.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None))


dims = st.tuples(st.integers(1, 30), st.integers(1, 30), st.integers(1, 8), st.integers(0, 2**31))


@settings(max_examples=60, deadline=None)
@given(dims)
def test_spectrum_matches_the_dense_product(dim):
    out, inp, r, seed = dim
    rng = np.random.default_rng(seed)
    B, A = rng.normal(size=(out, r)), rng.normal(size=(r, inp))
    U, s, Vh = factored_svd(B, A)
    k = min(out, inp, r)
    assert U.shape == (out, k) and s.shape == (k,) and Vh.shape == (k, inp)
    np.testing.assert_allclose(U @ np.diag(s) @ Vh, B @ A, atol=1e-10 * max(1.0, s[0]))
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(Vh @ Vh.T, np.eye(k), atol=1e-10)
    dense = dense_singular_values(B @ A)[:k]
    big = dense > 1e-6 * dense[0]
    np.testing.assert_allclose(s[big], dense[big], rtol=1e-7)


def test_core_is_small_and_reconstructs():
    rng = np.random.default_rng(1)
    B, A = rng.normal(size=(300, 4)), rng.normal(size=(4, 200))
    Q_B, core, Q_A = factored_core(B, A)
    assert core.shape == (4, 4)
    np.testing.assert_allclose(Q_B @ core @ Q_A.T, B @ A, atol=1e-10)


@pytest.mark.parametrize("r", [1, 2, 3])
def test_best_rank_r_meets_the_eckart_young_bound(r):
    rng = np.random.default_rng(2)
    # a product with known singular values 5, 3, 2, 1
    U, _ = np.linalg.qr(rng.normal(size=(20, 4)))
    V, _ = np.linalg.qr(rng.normal(size=(15, 4)))
    s = np.array([5.0, 3.0, 2.0, 1.0])
    B, A = U * s, V.T
    B_r, A_r = factored_best_rank_r(B, A, r)
    assert B_r.shape == (20, r) and A_r.shape == (r, 15)
    error = np.linalg.norm(B @ A - B_r @ A_r)
    assert error == pytest.approx(np.sqrt(np.sum(s[r:] ** 2)), rel=1e-10)
    # the even split: both factors have Frobenius norm sqrt(sum s_r)
    assert np.linalg.norm(B_r) == pytest.approx(np.sqrt(np.sum(s[:r])), rel=1e-10)
    assert np.linalg.norm(A_r) == pytest.approx(np.sqrt(np.sum(s[:r])), rel=1e-10)


def test_bad_input_is_refused_by_name():
    B, A = np.ones((4, 2)), np.ones((3, 5))
    with pytest.raises(ValueError, match="B's columns must equal A's rows"):
        factored_svd(B, A)
    with pytest.raises(ValueError, match="A contains NaN"):
        factored_svd(np.ones((4, 2)), np.full((2, 5), np.nan))
    with pytest.raises(ValueError, match=r"r must be in \[1, 2\]"):
        factored_best_rank_r(np.ones((4, 2)), np.eye(2, 5), 3)
    with pytest.raises(TypeError, match="r must be an int"):
        factored_best_rank_r(np.ones((4, 2)), np.eye(2, 5), 1.0)

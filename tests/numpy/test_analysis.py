"""Tests for lowrank.numpy.analysis against independent oracles.

The oracles never call np.linalg.svd (the route under test): singular values come from the
eigenvalues of M^T M (np.linalg.eigvalsh), singular vectors from its eigenvectors (eigh), and
the matrices are built with known spectra or known row spaces.
"""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank.numpy.analysis import (
    best_rank_r,
    effective_rank,
    energy_captured,
    energy_rank,
    singular_values,
    stable_rank,
    subspace_similarity,
    subspace_similarity_grid,
)

shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))
seeds = st.integers(0, 2**32 - 1)


def squared_singular_values(M: np.ndarray) -> np.ndarray:
    """Oracle: s_i^2 = eigenvalues of M^T M (or M M^T, the smaller), descending, clipped at 0."""
    gram = M.T @ M if M.shape[1] <= M.shape[0] else M @ M.T
    return np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)


def top_right_vectors(A: np.ndarray, k: int) -> np.ndarray:
    """Oracle: the top-k right-singular vectors of A are the top-k eigenvectors of A^T A."""
    _, vectors = np.linalg.eigh(A.T @ A)  # ascending eigenvalues, vectors in columns (in, in)
    return vectors[:, ::-1][:, :k]  # (in, k)


def with_spectrum(rng: np.random.Generator, m: int, n: int, s: np.ndarray) -> np.ndarray:
    """A random m x n matrix whose singular values are exactly s (random orthogonal factors)."""
    k = len(s)
    U, _ = np.linalg.qr(rng.normal(size=(m, k)))  # (m, k) orthonormal columns
    V, _ = np.linalg.qr(rng.normal(size=(n, k)))  # (n, k)
    return (U * s) @ V.T


# --- singular values, Eckart-Young ------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=seeds)
def test_singular_values_match_eigenvalues_of_gram(shape, seed):
    M = np.random.default_rng(seed).normal(size=shape)
    s = singular_values(M)
    assert s.shape == (min(shape),) and s.dtype == np.float64
    # eigvalsh is accurate to ~eps * ||M||^2 in s^2; 1e-10 relative leaves a wide margin
    np.testing.assert_allclose(s**2, squared_singular_values(M), atol=1e-10 * np.sum(M**2))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=seeds, data=st.data())
def test_eckart_young_error_is_norm_of_discarded_singular_values(shape, seed, data):
    M = np.random.default_rng(seed).normal(size=shape)
    r = data.draw(st.integers(0, min(shape)))
    M_r = best_rank_r(M, r)
    assert M_r.shape == M.shape
    assert np.linalg.matrix_rank(M_r) <= r
    discarded = squared_singular_values(M)[r:].sum()
    error_sq = np.sum((M - M_r) ** 2)
    np.testing.assert_allclose(error_sq, discarded, atol=1e-10 * np.sum(M**2))
    np.testing.assert_allclose(energy_captured(M, r), 1.0 - discarded / np.sum(M**2), atol=1e-10)


def test_best_rank_r_ends_are_zero_and_identity():
    M = np.random.default_rng(0).normal(size=(5, 7))
    np.testing.assert_array_equal(best_rank_r(M, 0), np.zeros((5, 7)))
    np.testing.assert_allclose(best_rank_r(M, 5), M, atol=1e-12)


def test_no_rank_r_matrix_beats_best_rank_r():
    """Random rank-r competitors, and small perturbations of the optimum's own factors (which stay
    rank <= r and probe the neighbourhood where a wrong answer would be beaten), never do better."""
    rng = np.random.default_rng(1)
    for _ in range(40):
        m, n = rng.integers(2, 10, size=2)
        r = int(rng.integers(1, min(m, n) + 1))
        M = rng.normal(size=(m, n))
        best_error = np.linalg.norm(M - best_rank_r(M, r))
        # factors of the optimum from the independent eigh route: M_r = (M V_r) V_r^T
        V_r = top_right_vectors(M, r)  # (n, r)
        P, Q = M @ V_r, V_r.T  # (m, r), (r, n)
        for scale in (1.0, 1e-1, 1e-3):
            competitor = rng.normal(size=(m, r)) @ rng.normal(size=(r, n))
            nearby = (P + scale * rng.normal(size=P.shape)) @ (Q + scale * rng.normal(size=Q.shape))
            for X in (competitor, nearby):
                assert np.linalg.norm(M - X) >= best_error - 1e-12


# --- energy, effective and stable rank --------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=seeds, energy=st.floats(0.01, 1.0))
def test_energy_rank_matches_brute_force(shape, seed, energy):
    M = np.random.default_rng(seed).normal(size=shape)
    s2 = squared_singular_values(M)
    # brute force: first r whose top-r share reaches the target (same 1e-12 slack as documented)
    expected = next(r for r in range(1, len(s2) + 1) if s2[:r].sum() >= (energy - 1e-12) * s2.sum())
    got = energy_rank(M, energy)
    # the two routes agree unless the target share falls within round-off of a step
    shares = np.cumsum(s2) / s2.sum()
    if np.min(np.abs(shares - energy)) > 1e-9:
        assert got == expected
    assert isinstance(got, int)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(8, 40),
    n=st.integers(8, 40),
    rank=st.integers(1, 6),
    seed=seeds,
)
def test_energy_rank_recovers_rank_of_low_rank_plus_noise(m, n, rank, seed):
    rng = np.random.default_rng(seed)
    signal = with_spectrum(rng, m, n, rng.uniform(1.0, 2.0, size=rank))
    noise = 1e-4 * rng.normal(size=(m, n))  # energy ~1e-8 * m * n <= 2e-5 of a total >= 1
    # dropping one signal direction loses >= 1 / (4 * 6) of the energy, so 0.99 lands on `rank`
    assert energy_rank(signal + noise, 0.99) == rank
    assert energy_rank(signal, 1.0) == rank  # exactly low rank: energy 1.0 gives the rank


def test_energy_rank_of_identity_counts_directions():
    # the identity spreads energy evenly: k/n of it in the top k directions
    assert energy_rank(np.eye(10), 0.9) == 9
    assert energy_rank(np.eye(10), 0.91) == 10
    assert energy_rank(np.eye(10), 0.1) == 1
    assert energy_rank(np.eye(10), 1.0) == 10


@pytest.mark.parametrize("n", [1, 2, 5, 30])
def test_effective_rank_of_identity_is_n(n):
    assert effective_rank(np.eye(n)) == pytest.approx(n, rel=1e-12)


def test_effective_rank_of_rank_one_is_one():
    rng = np.random.default_rng(2)
    M = np.outer(rng.normal(size=9), rng.normal(size=13))
    # round-off singular values ~1e-16 add ~1e-14 to the entropy
    assert effective_rank(M) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, s=st.lists(st.floats(0.1, 10.0), min_size=1, max_size=6))
def test_effective_and_stable_rank_of_known_spectrum(seed, s):
    rng = np.random.default_rng(seed)
    s = np.sort(np.array(s))[::-1]
    M = with_spectrum(rng, len(s) + 3, len(s) + 5, s)
    p = s / s.sum()
    # oracle: the formulas of Roy & Vetterli and of the stable rank on the spectrum we built
    assert effective_rank(M) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-9)
    assert stable_rank(M) == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-9)
    assert 1.0 - 1e-9 <= effective_rank(M) <= len(s) + 1e-9
    assert 1.0 - 1e-9 <= stable_rank(M) <= len(s) + 1e-9


def test_stable_rank_matches_norms_via_eigenvalues():
    M = np.random.default_rng(3).normal(size=(20, 12))
    spectral_sq = np.linalg.eigvalsh(M.T @ M).max()  # ||M||_2^2
    assert stable_rank(M) == pytest.approx(np.sum(M**2) / spectral_sq, rel=1e-12)


def test_zero_matrix_edge_cases():
    Z = np.zeros((4, 6))
    np.testing.assert_array_equal(singular_values(Z), np.zeros(4))
    np.testing.assert_array_equal(best_rank_r(Z, 2), Z)
    assert energy_rank(Z) == 0
    assert energy_captured(Z, 0) == 1.0
    assert effective_rank(Z) == 0.0
    assert stable_rank(Z) == 0.0
    with pytest.raises(ValueError, match="numerical rank 0"):
        subspace_similarity(Z, np.ones((2, 6)), 1, 1)
    with pytest.raises(ValueError, match="non-zero"):
        subspace_similarity_grid(np.ones((2, 6)), Z)


# --- subspace similarity (LoRA paper, section 7.2) --------------------------------------------


@settings(max_examples=60, deadline=None)
@given(seed=seeds, r1=st.integers(1, 8), r2=st.integers(1, 8), d=st.integers(8, 24), data=st.data())
def test_phi_matches_eigenvector_oracle_and_is_symmetric_in_unit_interval(seed, r1, r2, d, data):
    rng = np.random.default_rng(seed)
    A1, A2 = rng.normal(size=(r1, d)), rng.normal(size=(r2, d))  # LoRA A matrices: [r, in]
    i, j = data.draw(st.integers(1, r1)), data.draw(st.integers(1, r2))
    phi = subspace_similarity(A1, A2, i, j)
    U_i, U_j = top_right_vectors(A1, i), top_right_vectors(A2, j)  # (d, i), (d, j)
    expected = np.sum((U_i.T @ U_j) ** 2) / min(i, j)
    # random Gaussian A have well-separated singular values, so eigh and svd pick the same spans
    assert phi == pytest.approx(expected, abs=1e-9)
    assert phi == pytest.approx(subspace_similarity(A2, A1, j, i), abs=1e-12)
    assert -1e-12 <= phi <= 1.0 + 1e-12


@pytest.mark.parametrize("r", [1, 3, 8])
def test_phi_is_one_for_the_same_span(r):
    rng = np.random.default_rng(r)
    A1 = rng.normal(size=(r, 32))
    R = rng.normal(size=(r, r)) + 3 * np.eye(r)  # invertible: A2 = R A1 has A1's row space
    A2 = R @ A1
    for i in range(1, r + 1):
        assert subspace_similarity(A1, A2, i, r) == pytest.approx(1.0, abs=1e-12)
        assert subspace_similarity(A1, A1, i, i) == pytest.approx(1.0, abs=1e-12)


def test_phi_is_zero_for_orthogonal_row_spaces():
    """This also pins which singular vectors phi uses: A1 and A2 below have orthogonal row spaces
    (phi = 0), while their LEFT singular vectors both span all of R^4 (which would give phi = 1)."""
    rng = np.random.default_rng(4)
    Q, _ = np.linalg.qr(rng.normal(size=(32, 8)))  # 8 orthonormal columns in R^32
    A1 = rng.normal(size=(4, 4)) @ Q[:, :4].T  # rows in span(Q[:, :4])
    A2 = rng.normal(size=(4, 4)) @ Q[:, 4:].T  # rows in the orthogonal span(Q[:, 4:])
    for i in range(1, 5):
        for j in range(1, 5):
            assert subspace_similarity(A1, A2, i, j) == pytest.approx(0.0, abs=1e-12)


def test_phi_of_nested_subspaces():
    """A2's rows span A1's row space and more: every top-i of A1 lies in the top-r2 of A2."""
    rng = np.random.default_rng(5)
    A1 = rng.normal(size=(3, 20))
    A2 = np.vstack([A1, rng.normal(size=(5, 20))])  # (8, 20)
    for i in range(1, 4):
        assert subspace_similarity(A1, A2, i, 8) == pytest.approx(1.0, abs=1e-12)


def test_grid_matches_pointwise_phi():
    rng = np.random.default_rng(6)
    A1, A2 = rng.normal(size=(5, 30)), rng.normal(size=(9, 30))
    grid = subspace_similarity_grid(A1, A2)
    assert grid.shape == (5, 9)
    for i in range(1, 6):
        for j in range(1, 10):
            assert grid[i - 1, j - 1] == pytest.approx(subspace_similarity(A1, A2, i, j), abs=1e-12)


# --- input validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "M, match",
    [
        (np.ones(5), "2-D"),
        (np.ones((2, 2, 2)), "2-D"),
        (np.ones((0, 3)), "empty"),
        (np.array([[1.0, np.nan]]), "NaN or inf"),
        (np.array([[1.0, np.inf]]), "NaN or inf"),
    ],
)
def test_bad_matrices_raise_value_error(M, match):
    for fn in (singular_values, effective_rank, stable_rank, energy_rank):
        with pytest.raises(ValueError, match=match):
            fn(M)


def test_complex_matrix_raises_type_error():
    with pytest.raises(TypeError, match="real numbers"):
        singular_values(np.ones((2, 2), dtype=complex))


def test_bad_arguments_raise():
    M = np.ones((3, 5))
    with pytest.raises(ValueError, match=r"r must be in \[0, 3\]"):
        best_rank_r(M, 4)
    with pytest.raises(ValueError, match=r"r must be in \[0, 3\]"):
        energy_captured(M, -1)
    with pytest.raises(TypeError, match="r must be an int"):
        best_rank_r(M, 2.0)
    for energy in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"energy must be a share in \(0, 1\]"):
            energy_rank(M, energy)
    rng = np.random.default_rng(7)
    A1, A2 = rng.normal(size=(3, 10)), rng.normal(size=(4, 10))
    with pytest.raises(ValueError, match=r"i must be in \[1, 3\]"):
        subspace_similarity(A1, A2, 0, 1)
    with pytest.raises(ValueError, match=r"j must be in \[1, 4\]"):
        subspace_similarity(A1, A2, 1, 5)
    with pytest.raises(ValueError, match="same number of columns"):
        subspace_similarity(A1, rng.normal(size=(3, 11)), 1, 1)
    rank_two = rng.normal(size=(4, 2)) @ rng.normal(size=(2, 10))  # 4 rows, rank 2
    with pytest.raises(ValueError, match="numerical rank 2"):
        subspace_similarity(A1, rank_two, 1, 3)


def test_numpy_analysis_works_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "import numpy as np, lowrank.numpy as ln\n"
        "assert ln.energy_rank(np.eye(4), 1.0) == 4\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

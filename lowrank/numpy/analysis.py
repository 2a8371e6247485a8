"""Spectral analysis of weight matrices and weight updates: how low-rank is a matrix?

LoRA (Hu et al. 2021, arXiv:2106.09685) rests on the hypothesis that the update a fine-tune
makes to a weight matrix, Delta W, has a low "intrinsic rank". Everything here looks at that
through the singular value decomposition M = U diag(s) Vh, s_1 >= s_2 >= ... >= 0:

- `singular_values(M)`: the spectrum s.
- `best_rank_r(M, r)`: keep the top r singular triplets. Eckart-Young: no matrix of rank <= r is
  closer to M in Frobenius norm, and the error is sqrt(s_{r+1}^2 + ... + s_n^2).
- `energy_captured(M, r)`: the share of ||M||_F^2 = sum s_i^2 that the top r directions hold.
- `energy_rank(M, energy)`: the smallest r whose top-r directions hold that share.
- `effective_rank(M)`: exp of the Shannon entropy of p_i = s_i / sum s (Roy & Vetterli 2007,
  "The effective rank: a measure of effective dimensionality"). n for the n x n identity, 1 for
  any rank-1 matrix, and in between it counts "how many directions matter", without a threshold.
- `stable_rank(M)`: ||M||_F^2 / ||M||_2^2 = sum s_i^2 / s_1^2, never above the rank.
- `subspace_similarity(A1, A2, i, j)`: the LoRA paper's phi (section 7.2), how much of the span
  of the top-i right-singular vectors of A1 lies in the span of the top-j of A2.
- `subspace_similarity_grid(A1, A2)`: phi for every (i, j) at once (the paper's Figure 3).

Everything is computed in float64 and returned as float64 arrays or Python numbers.
The zero matrix is allowed where the answer is defined: it has no singular directions, so
`energy_rank` and `effective_rank` and `stable_rank` are 0, `energy_captured` is 1.0 (there is
no energy to miss) and `best_rank_r` returns zeros. `subspace_similarity` refuses it (and any
i or j above the numerical rank) because the singular vectors of zero singular values are
arbitrary, so phi would be too.
"""

import numpy as np

__all__ = [
    "best_rank_r",
    "effective_rank",
    "energy_captured",
    "energy_rank",
    "singular_values",
    "stable_rank",
    "subspace_similarity",
    "subspace_similarity_grid",
]


def _as_matrix(M: np.ndarray, name: str = "M") -> np.ndarray:
    """Check that M is a finite, non-empty, real 2-D array and return it as float64."""
    M = np.asarray(M)
    if M.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {M.dtype}")
    if M.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got {M.ndim} dimension(s) {M.shape}")
    if M.size == 0:
        raise ValueError(f"{name} is empty (shape {M.shape})")
    M = M.astype(np.float64)
    if not np.all(np.isfinite(M)):
        raise ValueError(f"{name} contains NaN or inf")
    return M


def _check_rank_arg(r: int, shape: tuple[int, ...], name: str = "r", low: int = 0) -> None:
    """r must be an int in [low, min(shape)]."""
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(r).__name__}")
    if not low <= r <= min(shape):
        raise ValueError(f"{name} must be in [{low}, {min(shape)}] for shape {shape}, got {r}")


def _numerical_rank(s: np.ndarray, shape: tuple[int, int]) -> int:
    """How many singular values are above round-off (the rule of np.linalg.matrix_rank)."""
    if s[0] == 0.0:
        return 0
    tol = s[0] * max(shape) * np.finfo(np.float64).eps
    return int(np.count_nonzero(s > tol))


def singular_values(M: np.ndarray) -> np.ndarray:
    """The singular values of M, float64, descending, length min(M.shape).

    M: (m, n), any real matrix -> s: (min(m, n),).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import singular_values
        >>> singular_values(np.array([[3.0, 0.0], [0.0, -1.0], [0.0, 0.0]]))
        array([3., 1.])
    """
    return np.linalg.svd(_as_matrix(M), compute_uv=False)


def best_rank_r(M: np.ndarray, r: int) -> np.ndarray:
    """The closest matrix of rank <= r to M (truncated SVD), float64, same shape as M.

    Eckart-Young-Mirsky: ||M - best_rank_r(M, r)||_F = sqrt(sum_{i > r} s_i^2), and no matrix of
    rank <= r does better. r = 0 gives the zero matrix, r = min(M.shape) gives M back.
    M: (m, n) -> (m, n); r: an int in [0, min(m, n)].

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import best_rank_r, singular_values
        >>> M = np.random.default_rng(0).normal(size=(6, 4))
        >>> M2 = best_rank_r(M, 2)
        >>> M2.shape, int(np.linalg.matrix_rank(M2))
        ((6, 4), 2)
        >>> s = singular_values(M)
        >>> bool(np.isclose(np.linalg.norm(M - M2), np.sqrt(s[2] ** 2 + s[3] ** 2)))
        True
    """
    M = _as_matrix(M)
    _check_rank_arg(r, M.shape)
    U, s, Vh = np.linalg.svd(M, full_matrices=False)  # (m, k), (k,), (k, n) with k = min(m, n)
    return (U[:, :r] * s[:r]) @ Vh[:r]  # (m, r) * (r,) @ (r, n) -> (m, n)


def energy_captured(M: np.ndarray, r: int) -> float:
    """Share of the squared Frobenius norm held by the top r singular values: sum_{i<=r} s_i^2 /
    sum_i s_i^2, in [0, 1]. Equals 1 - ||M - best_rank_r(M, r)||_F^2 / ||M||_F^2.

    The zero matrix has no energy to miss: 1.0 for every r. M: (m, n); r in [0, min(m, n)].

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import energy_captured
        >>> round(energy_captured(np.diag([3.0, 1.0]), 1), 4)  # 9 / (9 + 1)
        0.9
    """
    M = _as_matrix(M)
    _check_rank_arg(r, M.shape)
    s = np.linalg.svd(M, compute_uv=False)
    total = float(np.sum(s**2))
    if total == 0.0:
        return 1.0
    return float(np.sum(s[:r] ** 2)) / total


def energy_rank(M: np.ndarray, energy: float = 0.9) -> int:
    """The smallest r whose top-r singular values hold at least `energy` of ||M||_F^2.

    energy is a share in (0, 1]; 0.9 means "90% of the squared Frobenius norm". energy=1.0
    gives the numerical rank (round-off singular values hold ~1e-30 of the energy, which does not
    register). The zero matrix has energy rank 0. M: (m, n); the result is an int in
    [0, min(m, n)].

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import energy_rank
        >>> energy_rank(np.diag([3.0, 1.0]), 0.9)  # the top direction holds 9 / 10
        1
        >>> energy_rank(np.eye(10), 0.9)  # every direction holds 1 / 10
        9
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float, np.floating)):
        raise TypeError(f"energy must be a number in (0, 1], got {type(energy).__name__}")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be a share in (0, 1], got {energy}")
    s = singular_values(M)
    cumulative = np.cumsum(s**2)
    if cumulative[-1] == 0.0:
        return 0
    shares = cumulative / cumulative[-1]  # ascending, the last share exactly 1.0
    # A slack of 1e-12 (far above float64 round-off of ~1e-16, far below any share a reader
    # would ask for) keeps e.g. the identity's 9/10 from landing a hair under 0.9.
    return int(np.count_nonzero(shares < energy - 1e-12)) + 1


def effective_rank(M: np.ndarray) -> float:
    """Roy & Vetterli's effective rank: exp(-sum_i p_i log p_i) with p_i = s_i / sum_j s_j.

    A real number in [1, rank(M)]: n for the n x n identity (all directions equal), 1 for a
    rank-1 matrix. Terms with p_i = 0 contribute 0 (the limit of p log p). The zero matrix: 0.0.
    M: (m, n) -> a float. Roy & Vetterli 2007, "The effective rank: a measure of effective
    dimensionality" (EUSIPCO).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import effective_rank
        >>> round(effective_rank(np.eye(4)), 4)
        4.0
        >>> round(effective_rank(np.outer([1.0, 2.0], [3.0, 4.0, 5.0])), 4)  # rank 1
        1.0
    """
    s = singular_values(M)
    total = float(np.sum(s))
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def stable_rank(M: np.ndarray) -> float:
    """||M||_F^2 / ||M||_2^2 = sum_i s_i^2 / s_1^2: a smooth, never-larger stand-in for the rank.
    The zero matrix: 0.0. M: (m, n) -> a float in [1, rank(M)] (0.0 for zero).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import stable_rank
        >>> stable_rank(np.diag([2.0, 1.0]))  # (4 + 1) / 4
        1.25
    """
    s = singular_values(M)
    if s[0] == 0.0:
        return 0.0
    return float(np.sum(s**2) / s[0] ** 2)


def _top_right_singular_vectors(A: np.ndarray, k: int, name: str, k_name: str) -> np.ndarray:
    """Rows of Vh for the top k singular values of A: (k, in), orthonormal rows."""
    _check_rank_arg(k, A.shape, name=k_name, low=1)
    _, s, Vh = np.linalg.svd(A, full_matrices=False)
    rank = _numerical_rank(s, A.shape)
    if k > rank:
        raise ValueError(
            f"{k_name}={k} but {name} has numerical rank {rank}: the singular vectors of zero "
            f"singular values are arbitrary, so {k_name} must be at most {rank}"
        )
    return Vh[:k]


def _check_pair(A1: np.ndarray, A2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    A1, A2 = _as_matrix(A1, "A1"), _as_matrix(A2, "A2")
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(
            f"A1 and A2 must act on the same input space (same number of columns), got "
            f"{A1.shape} and {A2.shape}"
        )
    return A1, A2


def subspace_similarity(A1: np.ndarray, A2: np.ndarray, i: int, j: int) -> float:
    """The LoRA paper's phi(A1, A2, i, j) = ||V1_i^T V2_j||_F^2 / min(i, j), in [0, 1].

    A1 [r1, in] and A2 [r2, in] are LoRA down-projections (the A matrices, one row per rank);
    V1_i holds the top-i RIGHT-singular vectors of A1 (the first i rows of Vh, as columns: (in, i)),
    V2_j the top-j of A2. These live in the input space both adapters read from, which is why
    the paper compares them. phi = 1 when one span contains the other, 0 when they are
    orthogonal; it is the mean squared cosine of the principal angles between the two spans.
    Section 7.2 (Figure 3) compares A from r=8 and r=64 runs this way.

    i must be in [1, rank(A1)] and j in [1, rank(A2)]. Hu et al. 2021, arXiv:2106.09685.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import subspace_similarity
        >>> rng = np.random.default_rng(0)
        >>> A1 = rng.normal(size=(2, 10))  # (r1, in)
        >>> A2 = np.vstack([A1, rng.normal(size=(2, 10))])  # (r2, in): its span holds A1's
        >>> round(subspace_similarity(A1, A2, 2, 4), 4)
        1.0
        >>> subspace_similarity(np.eye(4)[:2], np.eye(4)[2:], 2, 2)  # orthogonal spans
        0.0
    """
    A1, A2 = _check_pair(A1, A2)
    V1 = _top_right_singular_vectors(A1, i, "A1", "i")  # (i, in)
    V2 = _top_right_singular_vectors(A2, j, "A2", "j")  # (j, in)
    overlap = V1 @ V2.T  # (i, in) @ (in, j) -> (i, j)
    return float(np.sum(overlap**2) / min(i, j))


def subspace_similarity_grid(A1: np.ndarray, A2: np.ndarray) -> np.ndarray:
    """phi(A1, A2, i, j) for all i in 1..rank(A1), j in 1..rank(A2): float64 [rank1, rank2],
    entry [i-1, j-1] = subspace_similarity(A1, A2, i, j). The paper's Figure 3 heat map
    (Hu et al. 2021, arXiv:2106.09685). A1: (r1, in), A2: (r2, in).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import subspace_similarity, subspace_similarity_grid
        >>> rng = np.random.default_rng(0)
        >>> A1, A2 = rng.normal(size=(2, 10)), rng.normal(size=(4, 10))
        >>> grid = subspace_similarity_grid(A1, A2)
        >>> grid.shape
        (2, 4)
        >>> bool(np.isclose(grid[1, 2], subspace_similarity(A1, A2, 2, 3)))
        True
    """
    A1, A2 = _check_pair(A1, A2)
    _, s1, Vh1 = np.linalg.svd(A1, full_matrices=False)
    _, s2, Vh2 = np.linalg.svd(A2, full_matrices=False)
    rank1, rank2 = _numerical_rank(s1, A1.shape), _numerical_rank(s2, A2.shape)
    if rank1 == 0 or rank2 == 0:
        raise ValueError("A1 and A2 must be non-zero: a zero matrix has no singular directions")
    overlap_sq = (Vh1[:rank1] @ Vh2[:rank2].T) ** 2  # (rank1, in) @ (in, rank2) -> (rank1, rank2)
    # ||V1_i^T V2_j||_F^2 is the sum of the top-left i x j block: a 2-D cumulative sum.
    block_sums = overlap_sq.cumsum(axis=0).cumsum(axis=1)
    i = np.arange(1, rank1 + 1)[:, None]
    j = np.arange(1, rank2 + 1)[None, :]
    return block_sums / np.minimum(i, j)

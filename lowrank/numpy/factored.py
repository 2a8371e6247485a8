"""The SVD of a LoRA update from its factors alone, never building the d x k matrix.

A LoRA update is a product Delta W = B @ A with B (out, r) and A (r, in), r much smaller than
out and in (Hu et al. 2021, arXiv:2106.09685). Its spectrum, its best rank-r' approximation
(Eckart-Young) and every spectral number of `analysis.py` follow from an r x r matrix:

    B = Q_B R_B          reduced QR, Q_B (out, k_B) orthonormal columns, R_B (k_B, r)
    A.T = Q_A R_A        reduced QR, Q_A (in, k_A), R_A (k_A, r)
    B @ A = Q_B (R_B @ R_A.T) Q_A.T
    core = R_B @ R_A.T = U_c diag(s) Vh_c      the SVD of a (k_B, k_A) matrix, k <= r
    B @ A = (Q_B U_c) diag(s) (Vh_c Q_A.T)     a thin SVD of the update

Orthonormal factors change no singular value, so `analysis.energy_rank(core)`,
`effective_rank(core)` and `stable_rank(core)` equal those of B @ A. Cost: O((out + in) r^2)
instead of O(out * in * min(out, in)); for a 4096 x 4096 layer at r = 16 that is a few
hundred thousand multiply-adds instead of ~7e10.

- `factored_core(B, A)`: (Q_B, core, Q_A) as above.
- `factored_svd(B, A)`: (U, s, Vh) of B @ A, thin (k = min(k_B, k_A) triplets).
- `factored_best_rank_r(B, A, r)`: factors (B_r, A_r) of the best rank-r approximation of B @ A,
  split evenly: B_r = U_r diag(sqrt(s_r)), A_r = diag(sqrt(s_r)) Vh_r, so neither factor carries
  the scale (both have Frobenius norm sqrt(sum s_r)); this is how `resize` and `extract` write
  adapters.

Everything is float64, as `analysis.py`.
"""

import numpy as np

from .analysis import _as_matrix

__all__ = ["factored_best_rank_r", "factored_core", "factored_svd"]


def _check_factors(B: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """B (out, r) and A (r, in), finite real matrices with the same r, as float64."""
    B = _as_matrix(B, "B")
    A = _as_matrix(A, "A")
    if B.shape[1] != A.shape[0]:
        raise ValueError(
            f"B is {B.shape} and A is {A.shape}: B's columns must equal A's rows (the rank r)"
        )
    return B, A


def factored_core(B: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Q_B, core, Q_A) with B @ A = Q_B @ core @ Q_A.T and orthonormal columns in Q_B, Q_A.

    B: (out, r), A: (r, in) -> Q_B (out, k_B), core (k_B, k_A), Q_A (in, k_A), where
    k_B = min(out, r) and k_A = min(in, r). The core has the singular values of B @ A.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import factored_core
        >>> rng = np.random.default_rng(0)
        >>> B, A = rng.normal(size=(50, 3)), rng.normal(size=(3, 40))
        >>> Q_B, core, Q_A = factored_core(B, A)
        >>> core.shape, bool(np.allclose(Q_B @ core @ Q_A.T, B @ A))
        ((3, 3), True)
    """
    B, A = _check_factors(B, A)
    Q_B, R_B = np.linalg.qr(B)  # (out, k_B), (k_B, r)
    Q_A, R_A = np.linalg.qr(A.T)  # (in, k_A), (k_A, r)
    return Q_B, R_B @ R_A.T, Q_A  # (k_B, r) @ (r, k_A) -> (k_B, k_A)


def factored_svd(B: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A thin SVD (U, s, Vh) of B @ A computed from the factors: s descending, float64.

    B: (out, r), A: (r, in) -> U (out, k), s (k,), Vh (k, in) with k = min(out, in, r);
    U @ diag(s) @ Vh == B @ A. The top singular values equal those of the dense product.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import factored_svd
        >>> B = np.array([[2.0], [0.0]])  # (2, 1)
        >>> A = np.array([[0.0, 3.0, 0.0]])  # (1, 3)
        >>> U, s, Vh = factored_svd(B, A)  # B @ A = 6 e_1 e_2^T
        >>> s
        array([6.])
    """
    Q_B, core, Q_A = factored_core(B, A)
    U_c, s, Vh_c = np.linalg.svd(core, full_matrices=False)  # (k_B, k), (k,), (k, k_A)
    return Q_B @ U_c, s, Vh_c @ Q_A.T  # (out, k), (k,), (k, in)


def factored_best_rank_r(B: np.ndarray, A: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors (B_r (out, r), A_r (r, in)) of the best rank-r approximation of B @ A.

    Eckart-Young: ||B @ A - B_r @ A_r||_F = sqrt(sum_{i > r} s_i^2), and no rank-r matrix is
    closer. The singular values are split evenly between the factors (sqrt(s) on each side).
    r: an int in [1, k], k = min(out, in, rank dimension of B and A).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import factored_best_rank_r
        >>> B = np.diag([3.0, 1.0])
        >>> A = np.eye(2)
        >>> B1, A1 = factored_best_rank_r(B, A, 1)
        >>> B1.shape, A1.shape, float(np.linalg.norm(B @ A - B1 @ A1))  # the error is s_2
        ((2, 1), (1, 2), 1.0)
    """
    U, s, Vh = factored_svd(B, A)
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if not 1 <= r <= len(s):
        raise ValueError(
            f"r must be in [1, {len(s)}] for factors B {B.shape} and A {A.shape}, got {r}"
        )
    root = np.sqrt(s[:r])  # (r,)
    return U[:, :r] * root, root[:, None] * Vh[:r]  # (out, r), (r, in)

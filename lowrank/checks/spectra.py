"""Checks for "What does fine-tuning change?", part 3: the SVD tools that read what a fine-tune
learned — energy rank, and the LoRA paper's subspace similarity phi between two adapters.

LoRA: Hu et al. 2021, arXiv:2106.09685 (phi, section 7.2, Figure 3).

Oracles: matrices built from chosen singular values and chosen orthonormal directions, so the
answer is known by construction (energy shares from the chosen s; phi from the chosen cosines
between directions), never computed by an SVD of the same matrix.

    check_energy_rank(energy_rank, student_id="ada@example.edu")  # None, or CheckFailed
"""

import math

import numpy as np

from ._feedback import (
    as_number,
    call,
    check_callable,
    check_own_work,
    fail,
    fmt,
)
from .finetune import finetune_variant

__all__ = ["check_energy_rank", "check_subspace_similarity"]


def _orthonormal_rows(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, k)))
    return q.T  # (k, n), orthonormal rows


def check_energy_rank(energy_rank, *, student_id: str | None = None) -> None:
    """energy_rank(M, energy=0.9) -> the smallest r whose top-r singular values hold at least
    `energy` of ||M||_F^2 = sum s_i^2 (0 for the zero matrix).

    M is (rows, cols) float64, built from chosen singular values, so every answer is known by
    construction. The tool that reads how low-rank a weight update is (Hu et al. 2021,
    arXiv:2106.09685, section 7).

    Examples:
        >>> def energy_rank(M, energy=0.9):
        ...     s = np.linalg.svd(M, compute_uv=False)
        ...     total = np.sum(s**2)
        ...     if total == 0:
        ...         return 0
        ...     return int(np.searchsorted(np.cumsum(s**2) / total, energy - 1e-12)) + 1
        >>> check_energy_rank(energy_rank, student_id="ada@example.edu")  # silent: right
        >>> def unsquared(M, energy=0.9):
        ...     s = np.linalg.svd(M, compute_uv=False)
        ...     return 0 if s.sum() == 0 else int(np.sum(np.cumsum(s) / s.sum() < energy)) + 1
        >>> check_energy_rank(unsquared)
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_energy_rank: wrong energy rank
          case:     M (24, 22) with s = [6.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1], energy=0.5
          expected: 1
          got:      2
          hint:     energy is the squared Frobenius norm, sum of s_i^2: shares of s itself
                    ([0.418, 0.627, 0.767, 0.871, 0.941, 0.976, 0.993, 1.0]) make the rank look
                    higher than it is
    """
    check = "check_energy_rank"
    check_callable(check, energy_rank)
    check_own_work(check, energy_rank)
    v = finetune_variant(student_id)
    rng = np.random.default_rng(v.seed)
    s = np.array([6.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1])
    M = (_orthonormal_rows(8, v.rows, rng).T * s) @ _orthonormal_rows(8, v.cols, rng)
    share = np.cumsum(s**2) / np.sum(s**2)
    unsquared = np.cumsum(s) / np.sum(s)
    cases = [(M, e, int(np.sum(share < e)) + 1) for e in (0.5, 0.8, 0.9, 0.99, 1.0)]
    cases.append((np.zeros((v.rows, v.cols)), 0.9, 0))
    for matrix, energy, want in cases:
        label = "M = 0" if want == 0 else f"M ({v.rows}, {v.cols}) with s = {s.tolist()}"
        case = f"{label}, energy={energy}"
        got = as_number(
            check, call(check, energy_rank, matrix.copy(), energy, case=case), "the rank", case=case
        )
        if got == want:
            continue
        hint = f"top-r shares of sum s^2 here: {np.round(share, 4).tolist()}"
        if want and got == int(np.sum(unsquared < energy)) + 1:
            hint = (
                "energy is the squared Frobenius norm, sum of s_i^2: shares of s itself "
                f"({np.round(unsquared, 3).tolist()}) make the rank look higher than it is"
            )
        elif want and abs(got - want) == 1:
            hint = "off by one: the smallest r with share(r) >= energy, counting from r = 1"
        elif want == 0:
            hint = "the zero matrix has no energy in any direction: its energy rank is 0"
        fail(check, "wrong energy rank", expected=want, got=fmt(got), hint=hint, case=case)


def check_subspace_similarity(subspace_similarity, *, student_id: str | None = None) -> None:
    """subspace_similarity(A1, A2, i, j) -> phi = ||V1_i^T V2_j||_F^2 / min(i, j), V_k the top-k
    RIGHT singular vectors (rows of Vh) of each A [r, in], as in the LoRA paper (section 7.2).

    Hu et al. 2021, arXiv:2106.09685, Figure 3. The adapters are built from chosen orthonormal
    directions and a chosen angle between them, so phi is known by construction.

    Examples:
        >>> def subspace_similarity(A1, A2, i, j):
        ...     V1 = np.linalg.svd(A1)[2][:i]  # (i, in)
        ...     V2 = np.linalg.svd(A2)[2][:j]  # (j, in)
        ...     return float(np.sum((V1 @ V2.T) ** 2) / min(i, j))
        >>> check_subspace_similarity(subspace_similarity, student_id="ada@example.edu")
        >>> def over_max(A1, A2, i, j):
        ...     V1, V2 = np.linalg.svd(A1)[2][:i], np.linalg.svd(A2)[2][:j]
        ...     return float(np.sum((V1 @ V2.T) ** 2) / max(i, j))
        >>> check_subspace_similarity(over_max)
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_subspace_similarity: wrong phi
          case:     A1 (r=4) and A3 (r=6), i=2, j=6, angle between their second directions
                    1.103 rad
          expected: 0.601484 (by construction)
          got:      0.200495
          hint:     divide by min(i, j), not max(i, j): phi = 1 when one span contains the other
    """
    check = "check_subspace_similarity"
    check_callable(check, subspace_similarity)
    check_own_work(check, subspace_similarity)
    v = finetune_variant(student_id)
    rng = np.random.default_rng(v.seed)
    d = v.cols + 8
    q = _orthonormal_rows(12, d, rng)  # 12 orthonormal directions of the input space
    theta = float(rng.uniform(0.6, 1.2))
    c2 = math.cos(theta) ** 2
    # A1's directions: q0..q3; A2's: q0, cos(t) q1 + sin(t) q4, q5, ... (by construction)
    second = math.cos(theta) * q[1] + math.sin(theta) * q[4]

    def adapter(rows: np.ndarray, s: list[float]) -> np.ndarray:
        mix = _orthonormal_rows(len(s), len(s), rng)  # a random rotation on the left
        return mix @ (np.array(s)[:, None] * rows)  # (r, d)

    A1 = adapter(q[0:4], [4.0, 3.0, 2.0, 1.0])
    A2 = adapter(np.vstack([q[0], second, q[5], q[6]]), [5.0, 3.5, 2.5, 1.5])
    A3 = adapter(np.vstack([q[0], second, q[5], q[6], q[7], q[8]]), [6, 5, 4, 3, 2, 1.0])
    far = adapter(q[8:12], [4.0, 3.0, 2.0, 1.0])
    cases = [
        ("A1 and A2 (both r=4)", A1, A2, 1, 1, 1.0),
        ("A1 and A2 (both r=4)", A1, A2, 2, 2, (1 + c2) / 2),
        ("A1 and A2 (both r=4)", A1, A2, 4, 4, (1 + c2) / 4),
        ("A1 (r=4) and A3 (r=6)", A1, A3, 2, 6, (1 + c2) / 2),
        ("A1 (r=4) and A3 (r=6)", A1, A3, 3, 1, 1.0),
        ("A1 and an adapter in orthogonal directions", A1, far, 2, 3, 0.0),
    ]
    for name, P, Q, i, j, want in cases:
        case = f"{name}, i={i}, j={j}, angle between their second directions {theta:.3f} rad"
        got = as_number(
            check,
            call(check, subspace_similarity, P.copy(), Q.copy(), i, j, case=case),
            "phi",
            case=case,
        )
        if math.isclose(got, want, rel_tol=1e-8, abs_tol=1e-10):
            continue
        hint = "phi = ||Vh1[:i] Vh2[:j]^T||_F^2 / min(i, j), rows of Vh from np.linalg.svd"
        U1, U2 = np.linalg.svd(P)[0], np.linalg.svd(Q)[0]
        if U1.shape == U2.shape:
            left = np.sum((U1[:, :i].T @ U2[:, :j]) ** 2) / min(i, j)
            if math.isclose(got, left, rel_tol=1e-6):
                hint = (
                    "you used the LEFT singular vectors (columns of U, in R^r); phi compares the "
                    "RIGHT singular vectors (rows of Vh), which live in the input space that both "
                    "adapters read"
                )
        if math.isclose(got, want * min(i, j) / max(i, j), rel_tol=1e-6) and i != j:
            hint = "divide by min(i, j), not max(i, j): phi = 1 when one span contains the other"
        elif want and math.isclose(got, math.sqrt(want * min(i, j)) / min(i, j), rel_tol=1e-6):
            hint = "square the Frobenius norm: phi is a mean of squared cosines"
        fail(
            check,
            "wrong phi",
            expected=f"{want:.6f} (by construction)",
            got=f"{got:.6f}",
            hint=hint,
            case=case,
        )

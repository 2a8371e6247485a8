"""The SVD of a LoRA update from its factors alone, on torch tensors (CPU or CUDA).

The mirror of `lowrank.numpy.factored` (read its docstring for the maths; LoRA: Hu et al. 2021,
arXiv:2106.09685): B @ A = Q_B (R_B @ R_A.T) Q_A.T from two reduced QR decompositions, and the
SVD of the small core gives the update's SVD without building the (out, in) matrix. Same names,
same edge cases; inputs of any real dtype (requires_grad or not) are detached and computed in
float64 on their own device, as `analysis.py`.
"""

import torch

from .analysis import _as_matrix

__all__ = ["factored_best_rank_r", "factored_core", "factored_svd"]


def _check_factors(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out, r) and A (r, in), finite real matrices with the same r, as float64."""
    B = _as_matrix(B, "B")
    A = _as_matrix(A, "A")
    if B.shape[1] != A.shape[0]:
        raise ValueError(
            f"B is {tuple(B.shape)} and A is {tuple(A.shape)}: B's columns must equal A's rows "
            "(the rank r)"
        )
    return B, A


def factored_core(
    B: torch.Tensor, A: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q_B, core, Q_A) with B @ A = Q_B @ core @ Q_A.T and orthonormal columns in Q_B, Q_A.

    B: (out, r), A: (r, in) -> Q_B (out, k_B), core (k_B, k_A), Q_A (in, k_A), where
    k_B = min(out, r) and k_A = min(in, r). The core has the singular values of B @ A.

    Examples:
        >>> import torch
        >>> from lowrank.torch import factored_core
        >>> g = torch.Generator().manual_seed(0)
        >>> B, A = torch.randn(50, 3, generator=g), torch.randn(3, 40, generator=g)
        >>> Q_B, core, Q_A = factored_core(B, A)
        >>> tuple(core.shape), torch.allclose(Q_B @ core @ Q_A.T, B.double() @ A.double())
        ((3, 3), True)
    """
    B, A = _check_factors(B, A)
    Q_B, R_B = torch.linalg.qr(B)  # (out, k_B), (k_B, r)
    Q_A, R_A = torch.linalg.qr(A.T)  # (in, k_A), (k_A, r)
    return Q_B, R_B @ R_A.T, Q_A  # (k_B, r) @ (r, k_A) -> (k_B, k_A)


def factored_svd(
    B: torch.Tensor, A: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A thin SVD (U, s, Vh) of B @ A computed from the factors: s descending, float64.

    B: (out, r), A: (r, in) -> U (out, k), s (k,), Vh (k, in) with k = min(out, in, r);
    U @ diag(s) @ Vh == B @ A.

    Examples:
        >>> import torch
        >>> from lowrank.torch import factored_svd
        >>> B = torch.tensor([[2.0], [0.0]])  # (2, 1)
        >>> A = torch.tensor([[0.0, 3.0, 0.0]])  # (1, 3)
        >>> U, s, Vh = factored_svd(B, A)  # B @ A = 6 e_1 e_2^T
        >>> s
        tensor([6.], dtype=torch.float64)
    """
    Q_B, core, Q_A = factored_core(B, A)
    U_c, s, Vh_c = torch.linalg.svd(core, full_matrices=False)  # (k_B, k), (k,), (k, k_A)
    return Q_B @ U_c, s, Vh_c @ Q_A.T  # (out, k), (k,), (k, in)


def factored_best_rank_r(
    B: torch.Tensor, A: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B_r (out, r), A_r (r, in)) of the best rank-r approximation of B @ A, float64.

    Eckart-Young: ||B @ A - B_r @ A_r||_F = sqrt(sum_{i > r} s_i^2). The singular values are
    split evenly between the factors (sqrt(s) on each side). r: an int in [1, k].

    Examples:
        >>> import torch
        >>> from lowrank.torch import factored_best_rank_r
        >>> B, A = torch.diag(torch.tensor([3.0, 1.0])), torch.eye(2)
        >>> B1, A1 = factored_best_rank_r(B, A, 1)
        >>> tuple(B1.shape), tuple(A1.shape), float(torch.linalg.norm(B @ A - B1 @ A1))
        ((2, 1), (1, 2), 1.0)
    """
    U, s, Vh = factored_svd(B, A)
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if not 1 <= r <= len(s):
        raise ValueError(
            f"r must be in [1, {len(s)}] for factors B {tuple(B.shape)} and A {tuple(A.shape)}, "
            f"got {r}"
        )
    root = s[:r].sqrt()  # (r,)
    return U[:, :r] * root, root[:, None] * Vh[:r]  # (out, r), (r, in)

"""Spectral analysis of weight matrices and updates on torch tensors, CPU or CUDA.

The mirror of `lowrank.numpy.analysis` (read that file's docstring for the ideas; LoRA: Hu et
al. 2021, arXiv:2106.09685, section 7): same names, same definitions, same edge cases. Inputs
may be any real tensor (float32 and bfloat16 weights included, requires_grad or not); the maths
runs in float64 on the tensor's own device, without autograd. Matrices come back as float64
tensors on that device, numbers as Python floats and ints, as NumPy's side returns them.

    energy_rank(lora_B @ lora_A, 0.9)   # directions holding 90% of the update's energy
    subspace_similarity(A_r8, A_r64, 1, 1)
"""

import torch

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


def _as_matrix(M: torch.Tensor, name: str = "M") -> torch.Tensor:
    """Check that M is a finite, non-empty, real 2-D tensor and return it detached, in float64."""
    M = torch.as_tensor(M)
    if M.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {M.dtype}")
    if M.dim() != 2:
        raise ValueError(
            f"{name} must be a 2-D matrix, got {M.dim()} dimension(s) {tuple(M.shape)}"
        )
    if M.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(M.shape)})")
    M = M.detach().to(torch.float64)
    if not torch.isfinite(M).all():
        raise ValueError(f"{name} contains NaN or inf")
    return M


def _check_rank_arg(r: int, shape: tuple[int, ...], name: str = "r", low: int = 0) -> None:
    """r must be an int in [low, min(shape)]."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"{name} must be an int, got {type(r).__name__}")
    if not low <= r <= min(shape):
        raise ValueError(f"{name} must be in [{low}, {min(shape)}] for shape {shape}, got {r}")


def _numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """How many singular values are above round-off (the rule of torch.linalg.matrix_rank)."""
    if s[0] == 0.0:
        return 0
    tol = s[0] * max(shape) * torch.finfo(torch.float64).eps
    return int((s > tol).sum())


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """The singular values of M (m, n), float64 (min(m, n),) on M's device, descending.

    Examples:
        >>> singular_values(torch.diag(torch.tensor([3.0, 2.0, 1.0])))
        tensor([3., 2., 1.], dtype=torch.float64)
        >>> singular_values(torch.ones(2, 3, dtype=torch.bfloat16)).shape
        torch.Size([2])
        >>> singular_values(torch.ones(3))
        Traceback (most recent call last):
        ...
        ValueError: M must be a 2-D matrix, got 1 dimension(s) (3,)
    """
    return torch.linalg.svdvals(_as_matrix(M))


def best_rank_r(M: torch.Tensor, r: int) -> torch.Tensor:
    """The closest matrix of rank <= r to M (truncated SVD), float64, M's shape and device.
    Eckart-Young-Mirsky: the error is sqrt(sum_{i > r} s_i^2) in Frobenius norm, the least any
    rank-r matrix achieves. r = 0 gives zeros, r = min(M.shape) gives M back.

    Examples:
        >>> M = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
        >>> best_rank_r(M, 1)
        tensor([[3., 0., 0.],
                [0., 0., 0.],
                [0., 0., 0.]], dtype=torch.float64)
        >>> round(float(torch.linalg.norm(M - best_rank_r(M, 1))), 4)  # sqrt(2^2 + 1^2)
        2.2361
    """
    M = _as_matrix(M)
    _check_rank_arg(r, tuple(M.shape))
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)  # (m, k), (k,), (k, n), k = min(m, n)
    return (U[:, :r] * s[:r]) @ Vh[:r]  # (m, r) * (r,) @ (r, n) -> (m, n)


def energy_captured(M: torch.Tensor, r: int) -> float:
    """Share of ||M||_F^2 held by the top r singular values, in [0, 1]; 1.0 for the zero
    matrix (there is no energy to miss).

    Examples:
        >>> M = torch.diag(torch.tensor([3.0, 2.0, 1.0]))  # energy 9 + 4 + 1 = 14
        >>> round(energy_captured(M, 1), 4), round(energy_captured(M, 2), 4)  # 9/14, 13/14
        (0.6429, 0.9286)
        >>> energy_captured(torch.zeros(2, 2), 1)
        1.0
    """
    M = _as_matrix(M)
    _check_rank_arg(r, tuple(M.shape))
    s = torch.linalg.svdvals(M)
    total = float((s**2).sum())
    if total == 0.0:
        return 1.0
    return float((s[:r] ** 2).sum()) / total


def energy_rank(M: torch.Tensor, energy: float = 0.9) -> int:
    """The smallest r whose top-r singular values hold at least `energy` (a share in (0, 1]) of
    ||M||_F^2. energy=1.0 gives the numerical rank; the zero matrix has energy rank 0.

    Examples:
        >>> M = torch.diag(torch.tensor([3.0, 2.0, 1.0]))  # shares 9/14, 13/14, 1
        >>> energy_rank(M, 0.5), energy_rank(M, 0.9), energy_rank(M, 1.0)
        (1, 2, 3)
        >>> energy_rank(M, 1.5)
        Traceback (most recent call last):
        ...
        ValueError: energy must be a share in (0, 1], got 1.5
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)):
        raise TypeError(f"energy must be a number in (0, 1], got {type(energy).__name__}")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be a share in (0, 1], got {energy}")
    s = singular_values(M)
    cumulative = torch.cumsum(s**2, dim=0)
    if cumulative[-1] == 0.0:
        return 0
    shares = cumulative / cumulative[-1]  # ascending, the last share exactly 1.0
    # the same 1e-12 slack against round-off as the NumPy reference
    return int((shares < energy - 1e-12).sum()) + 1


def effective_rank(M: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank exp(-sum_i p_i log p_i), p_i = s_i / sum_j s_j: n for the
    n x n identity, 1 for rank 1, 0.0 for the zero matrix (Roy & Vetterli 2007, "The
    effective rank: a measure of effective dimensionality").

    Examples:
        >>> round(effective_rank(torch.eye(4)), 4), round(effective_rank(torch.ones(3, 3)), 4)
        (4.0, 1.0)
        >>> round(effective_rank(torch.diag(torch.tensor([3.0, 2.0, 1.0]))), 4)
        2.7495
    """
    s = singular_values(M)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * torch.log(p)).sum()))


def stable_rank(M: torch.Tensor) -> float:
    """||M||_F^2 / ||M||_2^2 = sum_i s_i^2 / s_1^2; 0.0 for the zero matrix.

    Examples:
        >>> round(stable_rank(torch.diag(torch.tensor([3.0, 2.0, 1.0]))), 4)  # 14 / 9
        1.5556
        >>> stable_rank(torch.eye(4)), stable_rank(torch.zeros(2, 2))
        (4.0, 0.0)
    """
    s = singular_values(M)
    if s[0] == 0.0:
        return 0.0
    return float((s**2).sum() / s[0] ** 2)


def _top_right_singular_vectors(A: torch.Tensor, k: int, name: str, k_name: str) -> torch.Tensor:
    """Rows of Vh for the top k singular values of A: (k, in), orthonormal rows."""
    _check_rank_arg(k, tuple(A.shape), name=k_name, low=1)
    _, s, Vh = torch.linalg.svd(A, full_matrices=False)
    rank = _numerical_rank(s, tuple(A.shape))
    if k > rank:
        raise ValueError(
            f"{k_name}={k} but {name} has numerical rank {rank}: the singular vectors of zero "
            f"singular values are arbitrary, so {k_name} must be at most {rank}"
        )
    return Vh[:k]


def _check_pair(A1: torch.Tensor, A2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    A1, A2 = _as_matrix(A1, "A1"), _as_matrix(A2, "A2")
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(
            f"A1 and A2 must act on the same input space (same number of columns), got "
            f"{tuple(A1.shape)} and {tuple(A2.shape)}"
        )
    return A1, A2.to(A1.device)


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """The LoRA paper's phi(A1, A2, i, j) = ||V1_i^T V2_j||_F^2 / min(i, j), in [0, 1], from the
    top-i and top-j RIGHT-singular vectors (rows of Vh) of A1 [r1, in] and A2 [r2, in].
    i must be in [1, rank(A1)] and j in [1, rank(A2)] (Hu et al. 2021, arXiv:2106.09685,
    section 7.2).

    Examples:
        >>> A1 = torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0]])  # (2, 4): directions e0, e1
        >>> A2 = torch.tensor([[3.0, 0, 0, 0], [0, 0, 1.0, 0]])  # (2, 4): directions e0, e2
        >>> subspace_similarity(A1, A2, 1, 1), subspace_similarity(A1, A2, 2, 2)
        (1.0, 0.5)
        >>> subspace_similarity(A1, A2, 3, 1)
        Traceback (most recent call last):
        ...
        ValueError: i must be in [1, 2] for shape (2, 4), got 3
    """
    A1, A2 = _check_pair(A1, A2)
    V1 = _top_right_singular_vectors(A1, i, "A1", "i")  # (i, in)
    V2 = _top_right_singular_vectors(A2, j, "A2", "j")  # (j, in)
    overlap = V1 @ V2.T  # (i, in) @ (in, j) -> (i, j)
    return float((overlap**2).sum() / min(i, j))


def subspace_similarity_grid(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """phi(A1, A2, i, j) for all i in 1..rank(A1), j in 1..rank(A2): float64 [rank1, rank2] on
    A1's device; entry [i-1, j-1] = subspace_similarity(A1, A2, i, j) (the paper's Figure 3;
    Hu et al. 2021, arXiv:2106.09685).

    Examples:
        >>> A1 = torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0]])
        >>> A2 = torch.tensor([[3.0, 0, 0, 0], [0, 0, 1.0, 0]])
        >>> subspace_similarity_grid(A1, A2)
        tensor([[1.0000, 1.0000],
                [1.0000, 0.5000]], dtype=torch.float64)
    """
    A1, A2 = _check_pair(A1, A2)
    _, s1, Vh1 = torch.linalg.svd(A1, full_matrices=False)
    _, s2, Vh2 = torch.linalg.svd(A2, full_matrices=False)
    rank1 = _numerical_rank(s1, tuple(A1.shape))
    rank2 = _numerical_rank(s2, tuple(A2.shape))
    if rank1 == 0 or rank2 == 0:
        raise ValueError("A1 and A2 must be non-zero: a zero matrix has no singular directions")
    overlap_sq = (Vh1[:rank1] @ Vh2[:rank2].T) ** 2  # (rank1, in) @ (in, rank2) -> (rank1, rank2)
    block_sums = overlap_sq.cumsum(dim=0).cumsum(dim=1)  # sum of the top-left i x j block
    i = torch.arange(1, rank1 + 1, device=A1.device)[:, None]
    j = torch.arange(1, rank2 + 1, device=A1.device)[None, :]
    return block_sums / torch.minimum(i, j)

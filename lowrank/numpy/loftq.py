"""LoftQ in NumPy: a 4-bit base and a LoRA adapter fitted together (the mirror of
`lowrank.torch.loftq`).

LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
arXiv:2310.08659, Algorithm 1). QLoRA starts from deq(Q(W)) with B = 0, so the model begins
with the whole quantization error W - deq(Q(W)). LoftQ alternates, for t = 1..T,

    Q_t = quantize(W - s B_{t-1} A_{t-1})           (B_0 A_0 = 0: Q_1 is plain NF4)
    (B_t, A_t) = best rank-r of (W - deq(Q_t)) / s  (truncated SVD, sqrt(S) on each side)

so deq(Q_T) + s B_T A_T is the starting weight, closer to W than deq(Q(W)) alone. The SVD step
is the Eckart-Young optimum for its Q, so every step's error is at most plain NF4's.

The scale: PEFT's `loftq_init` (peft/utils/loftq_utils.py) sets lora_B @ lora_A to the best
rank-r part of the residual and ignores the LoRA scale s = alpha / r, which is exact only for
alpha = r. Here both factors are divided by sqrt(s), so s B A is the fitted correction for any
alpha (with alpha = r the two agree). The factors are float64, as `analysis.best_rank_r`.
"""

import numpy as np

from lowrank._validate import check_int, check_positive_number

from .quant import dequantize_4bit, quantize_4bit
from .quantized import Quantized4bit

__all__ = ["loftq"]


def _check_weight(W: np.ndarray) -> np.ndarray:
    W = np.asarray(W)
    if not np.issubdtype(W.dtype, np.floating):
        raise TypeError(f"W must be a floating-point array, got dtype {W.dtype}")
    if W.ndim != 2 or W.size == 0:
        raise ValueError(f"W must be a non-empty 2-D matrix (out, in), got shape {W.shape}")
    if not np.all(np.isfinite(W)):
        raise ValueError("W contains NaN or inf")
    return W


def loftq(
    W: np.ndarray,
    r: int,
    *,
    scale: float,
    num_iters: int = 1,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> tuple[Quantized4bit, np.ndarray, np.ndarray]:
    """LoftQ: a 4-bit Q and LoRA factors with deq(Q) + scale * B @ A close to W (out, in).

    Alternates `num_iters` times: Q = quantize_4bit(W - scale * B @ A) (B @ A = 0 the first
    time), then B @ A = the best rank-r approximation of (W - deq(Q)) / scale, split as
    A = sqrt(S_r) V_r^T (r, in), B = U_r sqrt(S_r) (out, r). Li et al. 2023, arXiv:2310.08659.

    Args:
        W: the full-precision weight (out, in), finite.
        r: the adapter rank, an int in [1, min(out, in)].
        scale: the LoRA scale s (alpha / r), > 0.
        num_iters: T, the number of alternations, >= 1 (T = 1: quantize W, fit its error).
        quant_type: the 4-bit type, as `quant.quantize_4bit`.
        blocksize: elements per block, as `quant.quantize_4bit`.
        double_quant: quantize the block scales too, as `quant.quantize_4bit`.

    Returns:
        (Q, A, B): Q a `Quantized4bit` of dtype W.dtype; A (r, in), B (out, r) float64.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import dequantize_4bit, quantize_4bit
        >>> from lowrank.numpy.loftq import loftq
        >>> W = np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32)
        >>> q, A, B = loftq(W, 4, scale=2.0)
        >>> A.shape, B.shape
        ((4, 64), (32, 4))
        >>> nf4 = np.linalg.norm(W - dequantize_4bit(quantize_4bit(W)))
        >>> bool(np.linalg.norm(W - (dequantize_4bit(q) + 2.0 * B @ A)) < nf4)
        True
    """
    W = _check_weight(W)
    r = check_int("r", r, low=1, high=min(W.shape))
    scale = check_positive_number("scale", scale)
    num_iters = check_int("num_iters", num_iters, low=1)
    target = W.astype(np.float64)  # (out, in)
    correction = np.zeros_like(target)  # s B A, (out, in)
    for _ in range(num_iters):
        q = quantize_4bit(
            (target - correction).astype(W.dtype),
            blocksize=blocksize,
            quant_type=quant_type,
            double_quant=double_quant,
        )
        residual = (target - dequantize_4bit(q)) / scale  # (out, in)
        U, S, Vh = np.linalg.svd(residual, full_matrices=False)  # (out, k), (k,), (k, in)
        root = np.sqrt(S[:r])  # (r,)
        A, B = root[:, None] * Vh[:r], U[:, :r] * root  # (r, in), (out, r)
        correction = scale * B @ A  # (out, r) @ (r, in) -> (out, in)
    return q, A, B

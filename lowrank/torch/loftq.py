"""LoftQ: a 4-bit base and a LoRA adapter fitted together, so QLoRA starts closer to W.

LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
arXiv:2310.08659, Algorithm 1). QLoRA starts from deq(Q(W)) with B = 0, so the model begins
with the whole quantization error W - deq(Q(W)). LoftQ alternates, for t = 1..T,

    Q_t = quantize(W - s B_{t-1} A_{t-1})           (B_0 A_0 = 0: Q_1 is plain NF4)
    (B_t, A_t) = best rank-r of (W - deq(Q_t)) / s  (truncated SVD, sqrt(S) on each side)

and deq(Q_T) + s B_T A_T is the starting weight. The SVD step is the Eckart-Young optimum for
its Q, so T = 1 never does worse than plain NF4; later steps re-quantize around the fit.

The scale: PEFT's `loftq_init` (peft/utils/loftq_utils.py, used by `LoraLayer.loftq_init` in
peft/tuners/lora/layer.py) sets lora_B @ lora_A to the best rank-r part of the residual and
ignores the LoRA scale s = alpha / r, which is exact only for alpha = r. Here both factors are
divided by sqrt(s), so s B A is the fitted correction for any alpha (with alpha = r the two
agree). PEFT also quantizes without double quantization; here it is an argument (on by
default, as QLoRA and `model.add_lora(quant_type=...)`). The factors are float64, as
`analysis.best_rank_r`. The NumPy mirror is `lowrank.numpy.loftq`; both give the same codes.

    q, A, B = loftq(W, 8, scale=2.0)                      # one matrix
    loftq_init(model, ["query", "value"], r=8, alpha=16)  # a QLoRA model started by LoftQ
"""

import torch
from torch import nn

from lowrank._validate import check_int, check_positive_number, check_quant_type
from lowrank.torch.model import add_lora, is_conv1d, lora_layers, match_targets
from lowrank.torch.qlora import Linear4bit
from lowrank.torch.quant import dequantize_4bit, quantize_4bit
from lowrank.torch.quantized import Quantized4bit

__all__ = ["loftq", "loftq_init"]


def _check_weight(W: torch.Tensor, name: str = "W") -> torch.Tensor:
    if not isinstance(W, torch.Tensor) or not W.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {type(W).__name__}")
    if W.dim() != 2 or W.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D matrix (out, in), got {tuple(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return W.detach()


@torch.no_grad()
def loftq(
    W: torch.Tensor,
    r: int,
    *,
    scale: float,
    num_iters: int = 1,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> tuple[Quantized4bit, torch.Tensor, torch.Tensor]:
    """LoftQ: a 4-bit Q and LoRA factors with deq(Q) + scale * B @ A close to W (out, in).

    Alternates `num_iters` times: Q = quantize_4bit(W - scale * B @ A) (B @ A = 0 the first
    time), then B @ A = the best rank-r approximation of (W - deq(Q)) / scale, split as
    A = sqrt(S_r) V_r^T (r, in), B = U_r sqrt(S_r) (out, r). Li et al. 2023, arXiv:2310.08659.

    Args:
        W: the full-precision weight (out, in), finite, on any device.
        r: the adapter rank, an int in [1, min(out, in)].
        scale: the LoRA scale s (alpha / r), > 0.
        num_iters: T, the number of alternations, >= 1 (T = 1: quantize W, fit its error).
        quant_type: the 4-bit type, as `quant.quantize_4bit`.
        blocksize: elements per block, as `quant.quantize_4bit`.
        double_quant: quantize the block scales too, as `quant.quantize_4bit`.

    Returns:
        (Q, A, B): Q a `Quantized4bit` of dtype W.dtype; A (r, in), B (out, r) float64, on
        W's device.

    Examples:
        >>> import torch
        >>> from lowrank.torch.loftq import loftq
        >>> from lowrank.torch.quant import dequantize_4bit, quantize_4bit
        >>> _ = torch.manual_seed(0)
        >>> W = torch.randn(32, 64)
        >>> q, A, B = loftq(W, 4, scale=2.0)
        >>> A.shape, B.shape
        (torch.Size([4, 64]), torch.Size([32, 4]))
        >>> nf4 = torch.linalg.norm(W - dequantize_4bit(quantize_4bit(W)))
        >>> bool(torch.linalg.norm(W - (dequantize_4bit(q) + 2.0 * B @ A)) < nf4)
        True
    """
    W = _check_weight(W)
    r = check_int("r", r, low=1, high=min(W.shape))
    scale = check_positive_number("scale", scale)
    num_iters = check_int("num_iters", num_iters, low=1)
    target = W.to(torch.float64)  # (out, in)
    correction = torch.zeros_like(target)  # s B A, (out, in)
    for _ in range(num_iters):
        q = quantize_4bit(
            (target - correction).to(W.dtype),
            blocksize=blocksize,
            quant_type=quant_type,
            double_quant=double_quant,
        )
        residual = (target - dequantize_4bit(q).to(torch.float64)) / scale  # (out, in)
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)  # (out, k), (k,), (k, in)
        root = torch.sqrt(S[:r])  # (r,)
        A, B = root[:, None] * Vh[:r], U[:, :r] * root  # (r, in), (out, r)
        correction = scale * B @ A  # (out, r) @ (r, in) -> (out, in)
    return q, A, B


def _load_quantized(layer: Linear4bit, q: Quantized4bit) -> None:
    """Put `q` into `layer` as its weight (Linear4bit has no public constructor from one)."""
    layout = (layer.out_features, layer.in_features), layer.blocksize, layer.quant_type
    if (tuple(q.shape), q.blocksize, q.quant_type) != layout or q.double_quant != (
        layer.double_quant
    ):
        raise ValueError(f"quantized weight {q.shape} does not fit the layer {layer!r}")
    layer.weight_packed = q.packed
    layer.weight_absmax = q.absmax
    layer.weight_offset = q.offset
    layer.weight_absmax2 = q.absmax2
    layer.weight_dtype = q.dtype


def _full_precision_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The (out, in) weight of the Linear or Conv1D `name` (Conv1D stores W^T)."""
    module = model.get_submodule(name)
    if is_conv1d(module):
        return _check_weight(module.weight, f"layer {name!r} weight").T
    if type(module) is nn.Linear:
        return _check_weight(module.weight, f"layer {name!r} weight")
    raise ValueError(
        f"layer {name!r} is a {type(module).__name__}; LoftQ needs a full-precision "
        "nn.Linear or Conv1D"
    )


def loftq_init(
    model: nn.Module,
    targets: str | list[str],
    *,
    r: int,
    alpha: float,
    num_iters: int = 1,
    quant_type: str = "nf4",
) -> nn.Module:
    """Make `model` (full-precision layers) a QLoRA model started by LoftQ, in place.

    Each layer `targets` selects (as `model.add_lora`) becomes a LoRA layer over a 4-bit
    `Linear4bit` (blocksize 64, double quantization) whose Q and factors come from `loftq`
    with scale alpha / r: the layer computes deq(Q) + (alpha / r) B @ A, not deq(Q(W)).
    Everything is computed before the model changes. Li et al. 2023, arXiv:2310.08659.

    Args:
        model: the model, changed in place; the targets must be nn.Linear or GPT-2 Conv1D.
        targets: a list of names or dotted suffixes, or a regex, as `add_lora`.
        r: the adapter rank, in [1, min(out, in)] of every target.
        alpha: the LoRA alpha (> 0); the scale is alpha / r.
        num_iters: T, LoftQ's alternations (>= 1).
        quant_type: "nf4", "fp4" or "int4".

    Returns:
        `model`, with LoRA adapter "default" on every target.

    Examples:
        >>> from collections import OrderedDict
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.loftq import loftq_init
        >>> from lowrank.torch.quant import dequantize_4bit, quantize_4bit
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(OrderedDict(fc=nn.Linear(64, 32)))
        >>> W = model.fc.weight.detach().clone()
        >>> model = loftq_init(model, ["fc"], r=4, alpha=8)
        >>> type(model.fc.base_layer).__name__
        'Linear4bit'
        >>> start = model.fc.base_weight() + model.fc.delta_weight()  # deq(Q) + s B A
        >>> nf4 = dequantize_4bit(quantize_4bit(W))  # plain QLoRA's start
        >>> bool(torch.linalg.norm(W - start) < torch.linalg.norm(W - nf4))
        True
    """
    check_int("r", r, low=1)
    scale = check_positive_number("alpha", alpha) / r
    check_int("num_iters", num_iters, low=1)
    check_quant_type(quant_type)
    names = match_targets(model, targets)
    plans = {}
    for name in names:
        W = _full_precision_weight(model, name)  # (out, in)
        try:
            plans[name] = loftq(
                W, r, scale=scale, num_iters=num_iters, quant_type=quant_type, blocksize=64
            )
        except ValueError as error:
            raise ValueError(f"layer {name!r}: {error}") from None
    add_lora(model, names, r=r, alpha=alpha, quant_type=quant_type)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            if name in plans:
                q, A, B = plans[name]
                _load_quantized(layer.base_layer, q)
                layer.A["default"].copy_(A)
                layer.B["default"].copy_(B)
    return model

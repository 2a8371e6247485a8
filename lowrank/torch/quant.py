"""4-bit blockwise quantization on tensors (CPU and CUDA): the mirror of `lowrank.numpy.quant`.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
The steps (blockwise absmax, nearest of 16 levels, two codes per byte, double quantization of
the scales) are explained in `lowrank/numpy/quant.py`, the code tables in `codebooks.py`;
this file does the same float32 arithmetic with whole-tensor operations, so both give identical
codes and identical float32 dequantized values, and both are bit-identical to
`bitsandbytes.functional.quantize_4bit`. The container `Quantized4bit` and its checks are in
`quantized.py`; reading and writing bitsandbytes' serialized 4-bit format is in `bnb_format.py`.

Devices: `quantize_4bit` and `dequantize_4bit` each decide once where the block work runs,
and every choice gives exactly the codes and values of the plain tensor path below (blockwise
absmax, a bucketize over the midpoints, a pair-table decode). On CUDA with triton installed:
`quant_triton`, one Triton kernel for each (tests/torch/test_quant_triton.py checks them, on CPU
through Triton's interpreter). On CPU, where PyTorch's per-element gathers and its binary search
are slow: `quant_cpu`, compiled loops (C++ on torch's threads, or numba) on the same memory. On
CUDA without triton, on other devices, and while torch.compile traces: the tensor path, the
readable fallback. On CUDA the Python side reads back one value only: "does w hold NaN or
inf?", which quantize's ValueError needs (a NaN or inf makes its block's absmax NaN or inf, so
only the scales are checked). That is quantize's one host sync; dequantize never waits.
Everything else here is plain tensor code on any device.

The two float32 corners of `lowrank.numpy.quant` are handled the same way here, in both paths: a
block whose absmax is below 1e-38 (no float32 reciprocal exists) is first multiplied by 2 ** 64,
exactly, and then scaled like any block; every
decoded scale is clamped to the largest finite value of float32 and of `q.dtype` (a rebuilt
double-quantized scale may lie above the true absmax, which near float16's 65504 or float32's
3.4e38 overflowed to inf; the true absmax is below the limit, so the clamp only brings the
scale closer to it). Ordinary weights meet neither corner: bit-identity with bitsandbytes holds.

`dequantize_4bit` checks its `Quantized4bit` first (`quantized.check_quantized`, which reads
no values on CUDA: decoding there still never waits for the device).

Under `torch.compile`, `dequantize_4bit` takes the plain tensor path even on CPU: Dynamo cannot
trace NumPy code that works on a tensor's memory (it failed with a TorchRuntimeError, not a
graph break), while it traces the tensor path whole (`fullgraph=True` works), and inductor can
fuse the decode into the kernels around it; the code tables enter the graph as constants
(`assume_constant_result`, in `codebooks.py`). A custom operator (`torch.library.custom_op`)
wrapping quant_cpu was the other choice; it needs torch >= 2.4 (lowrank supports 2.1) and a
second, fake kernel to keep in step, and it would hide the decode from inductor.

    q = quantize_4bit(w)           # w (out, in) -> Quantized4bit, ~4.13 bits per weight
    w_hat = dequantize_4bit(q)     # (out, in) in w's dtype
"""

import torch
import torch.nn.functional as F

from lowrank._validate import check_blocksize, check_bool, check_quant_type
from lowrank.numpy import quant as reference
from lowrank.torch import quant_cpu, quant_triton
from lowrank.torch.codebooks import _pair_table, _search_table
from lowrank.torch.quant_cpu import scale_limit
from lowrank.torch.quantized import (
    DOUBLE_QUANT_BLOCKSIZE,
    FLOAT32_MAX,
    FLOAT_DTYPES,
    Quantized4bit,
    _absmax_float32,
    _is_compiling,
    check_quantized,
)

__all__ = ["dequantize_4bit", "pack_4bit", "quantize_4bit", "unpack_4bit"]

_TINY = 1e-38  # stands in for an all-zero block's absmax when dividing (0 * 1e38 = 0)
_LIFT = float(reference._LIFT)  # 2 ** 64: blocks below _TINY are multiplied by it first


def quantize_4bit(
    w: torch.Tensor, *, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True
) -> Quantized4bit:
    """Quantize `w` (float32, bfloat16, float16 or float64; any shape) to 4 bits, blockwise.

    Flattened row-major, blocks of `blocksize`, each scaled by its absmax in float32 and mapped
    to the nearest level (ties to the lower); see `lowrank.numpy.quant` for the whole story.
    QLoRA's NF4 with double quantization (Dettmers et al. 2023, arXiv:2305.14314) by default;
    the codes and scales are bit-identical to `bitsandbytes.functional.quantize_4bit`.

    Args:
        w: the tensor to quantize, any shape (n elements), on CPU or CUDA.
        blocksize: elements per block, each with its own absmax scale.
        quant_type: "nf4", "fp4" or "int4", the 16 levels (`codebooks.code_for`).
        double_quant: quantize the block scales to 8 bits (blocks of 256, the dynamic map).

    Returns:
        A `Quantized4bit` on w's device: packed uint8 [ceil(n / 2)], absmax [n_blocks].

    Raises:
        TypeError: w is not a floating tensor of one of those dtypes.
        ValueError: w is empty or holds NaN or inf; a bad blocksize or quant_type.

    Examples:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> w = torch.randn(16, 64)  # (out, in)
        >>> q = quantize_4bit(w)
        >>> q.packed.shape, q.absmax.shape, q.absmax.dtype  # two codes a byte, 16 blocks
        (torch.Size([512]), torch.Size([16]), torch.uint8)
        >>> q = quantize_4bit(torch.tensor([1.0, -1.0, 0.0, 0.5]), double_quant=False)
        >>> unpack_4bit(q.packed, 4), q.absmax  # NF4 codes: 1 -> 15, -1 -> 0, 0 -> 7
        (tensor([15,  0,  7, 12], dtype=torch.uint8), tensor([1.]))
        >>> quantize_4bit(torch.tensor([1.0, float("nan")]))
        Traceback (most recent call last):
        ...
        ValueError: w contains NaN or inf (or values beyond the float32 range)
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    check_bool("double_quant", double_quant)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w must be float32, bfloat16, float16 or float64, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    x = w.detach().reshape(-1)  # [n]
    # quantize's one decision: Triton kernels on CUDA, NumPy kernels on CPU, else the tensor
    # path (also while torch.compile traces); the same codes on every one
    if not _is_compiling() and quant_triton.handles(x.device, blocksize):
        quantize_blocks = quant_triton.quantize_blocks
    elif x.device.type == "cpu":
        quantize_blocks = quant_cpu.quantize_blocks
    else:
        quantize_blocks = _quantize_blocks
    packed, absmax = quantize_blocks(x, blocksize, quant_type, pack=True)  # [ceil(n/2)], [n_blocks]
    # NaN or inf anywhere makes its block's absmax NaN or inf, so checking the scales is enough
    # (quant_cpu has already checked each chunk's). On CUDA this is quantize's one host sync:
    # the contract's ValueError needs the answer on the host.
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("w contains NaN or inf (or values beyond the float32 range)")
    offset, absmax2 = None, None
    if double_quant:
        offset = absmax.mean(dtype=torch.float64).float()  # float64 sum, rounded once (as NumPy)
        absmax, absmax2 = quantize_blocks(absmax - offset, DOUBLE_QUANT_BLOCKSIZE, "dynamic")
    return Quantized4bit(
        packed=packed,
        absmax=absmax,
        offset=offset,
        absmax2=absmax2,
        shape=tuple(w.shape),
        dtype=w.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        double_quant=double_quant,
    )


def dequantize_4bit(q: Quantized4bit) -> torch.Tensor:
    """Rebuild the tensor: `code[c] * absmax[block]` in float32, returned as `q.dtype`.

    `q` is checked first (`check_quantized`; on CUDA, and while compiling, without reading the
    values: no host sync). Each scale is clamped to the largest finite value of `q.dtype` and
    of float32, so a quantization of finite input decodes to finite values of its dtype.
    Returns a tensor of `q.shape` and `q.dtype` on q's device; bit-identical to
    `bitsandbytes.functional.dequantize_4bit` (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

    Examples:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> w = torch.randn(16, 64)
        >>> w_hat = dequantize_4bit(quantize_4bit(w))
        >>> w_hat.shape, w_hat.dtype
        (torch.Size([16, 64]), torch.float32)
        >>> bool((w_hat - w).abs().max() <= 0.152 * w.abs().max())  # half the widest NF4 gap
        True
        >>> dequantize_4bit(quantize_4bit(torch.tensor([1.0, -1.0, 0.0, 0.5])))
        tensor([ 1.0000, -1.0000,  0.0000,  0.4407])
        >>> dequantize_4bit(quantize_4bit(w.half())).dtype
        torch.float16
    """
    check_quantized(q)
    # dequantize's one decision (the same values): Triton kernels on CUDA, NumPy kernels on
    # CPU, else the tensor path, which Dynamo traces
    if _is_compiling():
        return _dequantize(q)
    if quant_triton.handles(q.device, q.blocksize):
        kernels = quant_triton
    elif q.device.type == "cpu":
        kernels = quant_cpu
    else:
        return _dequantize(q)
    return kernels.dequantize(
        q.packed,
        q.absmax,
        q.offset,
        q.absmax2,
        shape=q.shape,
        dtype=q.dtype,
        blocksize=q.blocksize,
        quant_type=q.quant_type,
        double_quant=q.double_quant,
    )


def pack_4bit(codes: torch.Tensor, pad_code: int = 0) -> torch.Tensor:
    """Pack uint8 codes (0..15) [n] into uint8 [ceil(n / 2)], high nibble first; an odd n is
    padded with `pad_code`. bitsandbytes' byte layout: byte j = (codes[2j] << 4) | codes[2j+1].

    Examples:
        >>> pack_4bit(torch.tensor([1, 2, 3], dtype=torch.uint8), pad_code=7)  # 0x12, 0x37
        tensor([18, 55], dtype=torch.uint8)
        >>> pack_4bit(torch.tensor([1, 2]))
        Traceback (most recent call last):
        ...
        ValueError: codes must be a 1-D uint8 tensor of values 0..15
    """
    if codes.dim() != 1 or codes.dtype != torch.uint8:
        raise ValueError("codes must be a 1-D uint8 tensor of values 0..15")
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad_code)])
    pairs = codes.view(-1, 2)  # [ceil(n / 2), 2]
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` codes (uint8 [n]) held in `packed` uint8 [m], n <= 2m (inverse of
    `pack_4bit`).

    Examples:
        >>> unpack_4bit(torch.tensor([0x12, 0x37], dtype=torch.uint8), 3)
        tensor([1, 2, 3], dtype=torch.uint8)
        >>> codes = torch.tensor([15, 0, 7, 12, 3], dtype=torch.uint8)
        >>> torch.equal(unpack_4bit(pack_4bit(codes), 5), codes)
        True
    """
    if packed.dim() != 1 or packed.dtype != torch.uint8 or not 0 <= n <= 2 * packed.numel():
        raise ValueError(f"packed must be a 1-D uint8 tensor holding at least {n} codes")
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]


# ---- the plain tensor path (what CUDA runs; quant_cpu gives the same on CPU) -----------------


def _quantize_blocks(
    x: torch.Tensor, blocksize: int, table: str, pack: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of x [n] (any float dtype, any device) in float32 to the
    nearest level of `table` ("nf4", "fp4", "int4" or "dynamic"; ties to the lower).

    Returns (codes uint8 [n], absmax float32 [n_blocks]); with `pack` the codes come back
    packed, uint8 [ceil(n / 2)] (`pack_4bit`, an odd n padded with the code of 0.0).
    """
    x = x.float()  # float32 like bitsandbytes
    n = x.numel()
    n_blocks = -(-n // blocksize)
    if n != n_blocks * blocksize:
        x = F.pad(x, (0, n_blocks * blocksize - n))  # zeros leave every absmax as is
    blocks = x.view(n_blocks, blocksize)
    low, high = torch.aminmax(blocks, dim=1)  # one pass instead of abs() then amax()
    absmax = torch.maximum(low.abs(), high.abs())  # [n_blocks]
    # below 1e-38 (subnormal values) 1 / absmax has no float32 value: such a block is scaled up
    # by 2 ** 64 first (exact; lowrank.numpy.quant._LIFT), the others by 1 (x * 1 is x, so
    # their codes are bitsandbytes'). A per-block factor, not a test on the host: no sync.
    lift = torch.where((absmax > 0) & (absmax < _TINY), _LIFT, 1.0)  # [n_blocks]
    inverse = 1.0 / (absmax * lift).clamp(min=_TINY)
    scaled = (blocks * lift[:, None]).mul_(inverse[:, None]).view(-1)[:n]  # [n]
    full = n - n % blocksize
    if full < n:  # bitsandbytes divides a short last block (see lowrank/numpy/quant.py)
        scaled[full:] = x[full:n] / torch.where(absmax[-1] > 0, absmax[-1], _TINY)
    codes = _nearest_code(scaled, table)  # [n]
    if pack:
        codes = pack_4bit(codes, pad_code=_search_table(table, x.device).pad_code)
    return codes, absmax


def _nearest_code(scaled: torch.Tensor, table: str) -> torch.Tensor:
    """Code of the nearest level: bucketize counts the float32 midpoints strictly below each
    value, which is the sorted position of the nearest level (ties go to the lower one)."""
    search = _search_table(table, scaled.device)
    position = torch.bucketize(scaled, search.midpoints)
    if search.order is None:  # levels already sorted: the position is the code
        return position.to(torch.uint8)
    return search.order[position]


def _dequantize(q: Quantized4bit) -> torch.Tensor:
    """`dequantize_4bit` in tensor operations, for any device (what CUDA runs), for a checked q."""
    n = _numel(q.shape)
    absmax = _absmax_float32(q)  # [n_blocks], within +-float32 max
    limit = scale_limit(q.dtype)
    if limit < FLOAT32_MAX:  # float16 and bfloat16: level * scale must fit the dtype
        absmax = absmax.clamp(-limit, limit)
    values = _levels(q.packed, q.quant_type)  # [2 * ceil(n / 2)] float32
    n_blocks = absmax.numel()
    if values.numel() != n_blocks * q.blocksize:  # a short last block or an odd pad nibble
        values = F.pad(values[:n], (0, n_blocks * q.blocksize - n))
    blocks = values.view(n_blocks, q.blocksize)  # [n_blocks, blocksize], a fresh buffer
    blocks.mul_(absmax[:, None])
    return blocks.reshape(-1)[:n].reshape(q.shape).to(q.dtype)


def _levels(packed: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The level of every nibble in `packed` [m], in order (high nibble first), float32 [2 * m]."""
    table = _pair_table(quant_type, packed.device)  # [256, 2]
    return table[packed.long()].reshape(-1)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n

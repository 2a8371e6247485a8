"""4-bit blockwise quantization, the storage format of QLoRA: blockwise absmax scaling to the
nearest level of a 4-bit codebook (NF4, FP4 or int4), double quantization of the scales, and
two-codes-per-byte packing.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
Layout and codes are bit-identical to `bitsandbytes.functional.quantize_4bit`.

How a weight becomes 4 bits:

1. flatten it row-major and cut it into blocks of `blocksize` (64) values; the last may be short;
2. divide each block by its absmax (largest magnitude), so every value lies in [-1, 1];
3. replace each scaled value by the index (0..15) of the nearest of 16 levels (the "code");
   an exact tie takes the lower level;
4. pack two codes per byte, the first of each pair in the high nibble;
5. (double quantization) the float32 absmax costs 32 / 64 = 0.5 bits per weight; QLoRA stores
   absmax - mean(absmax) as 8-bit codes of the dynamic map instead, in blocks of 256 with their
   own float32 absmax, which costs 8 / 64 + 32 / (64 * 256) = 0.127 bits per weight.

Decoding is a table lookup and one multiply: `w ~= code[c] * absmax[block]`.

Two corners of the float32 range, neither met by ordinary weights (whose codes and scales stay
bit-identical to bitsandbytes'):

- a block whose absmax is below 1e-38 (subnormal values) has no float32 reciprocal, so it is
  first multiplied by 2 ** 64 (exact: a power of two, and the results stay tiny), then scaled
  like any block (bitsandbytes' 1e-38 guard would scale it by 1e38 and round it all to zero);
- the scale rebuilt from double quantization, `dynamic_map()[c] * absmax2 + offset`, is the
  nearest 8-bit level, which may lie above the true absmax; near the top of the range that
  rounds to inf. Decoding clamps each scale to the largest finite value of float32 and of the
  dtype the weight had (float16: 65504). The true absmax never exceeds that limit, so the
  clamp only moves a scale closer to it, and the error bound still holds.

`dequantize_4bit` checks its `Quantized4bit` first (`quantized.check_quantized`). The code
tables are in `codebooks.py`; the container and the rules its fields follow in `quantized.py`.
"""

import math

import numpy as np

from lowrank._validate import check_blocksize, check_bool, check_quant_type

from .codebooks import code_for, dynamic_map
from .quantized import (
    DOUBLE_QUANT_BLOCKSIZE,
    FLOAT32_MAX,
    Quantized4bit,
    _absmax_float32,
    _block_scales,
    check_quantized,
)

__all__ = ["dequantize_4bit", "pack_4bit", "quantize_4bit", "scale_limit", "unpack_4bit"]

_TINY = np.float32(1e-38)  # stands in for an all-zero block's absmax when dividing (0 * 1e38 = 0)
# a block whose absmax is below _TINY is multiplied by this first: exact (a power of two), and
# it brings every such absmax (>= 2 ** -149) to >= 2 ** -85, whose reciprocal float32 holds
_LIFT = np.float32(2.0**64)


def quantize_4bit(
    w: np.ndarray, *, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True
) -> Quantized4bit:
    """Quantize `w` to 4 bits, blockwise by absmax (see the module docstring for the steps).

    The arithmetic is float32, as in bitsandbytes: scaled = w * (1 / absmax). Dettmers et al.
    2023 (QLoRA), arXiv:2305.14314, sections 2-3.

    Args:
        w: a floating-point array of any shape (n elements in all), finite in float32.
        blocksize: values per absmax block (bitsandbytes: 64 for QLoRA).
        quant_type: the 4-bit code, "nf4", "fp4" or "int4" (`codebooks.code_for`).
        double_quant: store the block scales as 8-bit codes of the dynamic map.

    Returns:
        A `Quantized4bit`: packed (ceil(n / 2),) uint8, absmax (ceil(n / blocksize),), and the
        double-quantization fields.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import dequantize_4bit, quantize_4bit
        >>> w = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
        >>> q = quantize_4bit(w)  # NF4, blocksize 64, double quantization
        >>> q.packed.shape, q.absmax.shape, q.absmax.dtype, q.absmax2.shape
        ((128,), (4,), dtype('uint8'), (1,))
        >>> q.nbytes  # 128 bytes of codes + 4 scale codes + 1 float32 absmax2 + the offset
        140
        >>> w_hat = dequantize_4bit(q)
        >>> round(float(np.abs(w_hat - w).mean() / np.abs(w).mean()), 2)  # mean relative error
        0.08
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    check_bool("double_quant", double_quant)
    w = np.asarray(w)
    if not np.issubdtype(w.dtype, np.floating):
        raise TypeError(f"w must be a floating-point array, got dtype {w.dtype}")
    if w.size == 0:
        raise ValueError("cannot quantize an empty array")
    with np.errstate(over="ignore"):  # values beyond float32 become inf: reported just below
        x = w.reshape(-1).astype(np.float32)  # (n,)
    if not np.all(np.isfinite(x)):
        raise ValueError("w contains NaN or inf (or values beyond the float32 range)")

    code = code_for(quant_type)
    codes, absmax = _quantize_blocks(x, blocksize, code)
    packed = pack_4bit(codes, pad_code=int(_nearest_code(np.zeros(1, np.float32), code)[0]))
    offset, absmax2 = None, None
    if double_quant:
        offset = np.float32(absmax.mean(dtype=np.float64))  # float64 sum, rounded once
        absmax, absmax2 = _quantize_blocks(absmax - offset, DOUBLE_QUANT_BLOCKSIZE, dynamic_map())
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


def dequantize_4bit(q: Quantized4bit) -> np.ndarray:
    """Rebuild the array from `q`: float32 of shape `q.shape`, `code[c] * absmax[block]`.

    `q` is checked first (`check_quantized`). Each scale is clamped to the largest finite value
    of `q.dtype` (and of float32), so a quantization of finite input decodes to finite values
    that also fit the dtype it came from.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import dequantize_4bit, quantize_4bit
        >>> w = np.array([[0.5, -1.0], [0.25, 1.0]])
        >>> dequantize_4bit(quantize_4bit(w, double_quant=False))  # the nearest NF4 levels
        array([[ 0.4407, -1.    ],
               [ 0.2461,  1.    ]], dtype=float32)
    """
    check_quantized(q)
    n = math.prod(q.shape)
    codes = unpack_4bit(q.packed, n)  # (n,)
    scales = _absmax_float32(q)  # (n_blocks,), within +-float32 max
    limit = scale_limit(q.dtype)
    if limit < FLOAT32_MAX:  # float16: 65504
        scales = np.clip(scales, -limit, limit)
    values = code_for(q.quant_type)[codes] * _block_scales(scales, q.blocksize, n)
    return values.reshape(q.shape)


def scale_limit(dtype: np.dtype) -> np.float32:
    """The largest scale a decode into `dtype` may use: its largest finite value, or float32's
    if that is smaller (decoding is float32 arithmetic). A level is at most 1 in magnitude, so
    level * scale then fits the dtype too.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy.quant import scale_limit
        >>> float(scale_limit(np.float16)), float(scale_limit(np.float64))
        (65504.0, 3.4028234663852886e+38)
    """
    return np.float32(min(float(np.finfo(dtype).max), float(FLOAT32_MAX)))


def pack_4bit(codes: np.ndarray, pad_code: int = 0) -> np.ndarray:
    """Pack 4-bit codes (uint8 values 0..15, length n) into ceil(n / 2) bytes, high nibble first;
    an odd n is padded with `pad_code` in the last low nibble.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy.quant import pack_4bit
        >>> pack_4bit(np.array([1, 2, 15], dtype=np.uint8))  # 0x12, then 0xF0 (padded with 0)
        array([ 18, 240], dtype=uint8)
    """
    codes = np.asarray(codes)
    if codes.ndim != 1 or codes.dtype != np.uint8 or np.any(codes > 15):
        raise ValueError("codes must be a 1-D uint8 array of values 0..15")
    if codes.size % 2:
        codes = np.append(codes, np.uint8(pad_code))
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: np.ndarray, n: int) -> np.ndarray:
    """The first `n` 4-bit codes (uint8) held in `packed` (inverse of `pack_4bit`):
    packed (m,) -> codes (n,), n <= 2 * m.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy.quant import unpack_4bit
        >>> unpack_4bit(np.array([18, 240], dtype=np.uint8), 3)
        array([ 1,  2, 15], dtype=uint8)
    """
    packed = np.asarray(packed)
    if packed.ndim != 1 or packed.dtype != np.uint8 or not 0 <= n <= 2 * packed.size:
        raise ValueError(f"packed must be a 1-D uint8 array holding at least {n} codes")
    codes = np.empty(2 * packed.size, dtype=np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    return codes[:n]


def _quantize_blocks(x: np.ndarray, blocksize: int, code: np.ndarray):
    """Blockwise absmax quantization of float32 x (n,) to the nearest level of `code`.
    Returns (codes uint8 (n,), absmax float32 (n_blocks,))."""
    n = x.size
    n_blocks = -(-n // blocksize)
    padded = np.zeros(n_blocks * blocksize, dtype=np.float32)  # zeros leave every absmax as is
    padded[:n] = x
    blocks = padded.reshape(n_blocks, blocksize)
    absmax = np.abs(blocks).max(axis=1)  # (n_blocks,)
    inverse = np.float32(1.0) / np.maximum(absmax, _TINY)
    # the rounding of 1 / absmax can leave |scaled| a hair above 1; it still takes the end level
    product = blocks * inverse[:, None]  # (n_blocks, blocksize)
    # below 1e-38 (subnormal values) 1 / absmax has no float32 value: such a block is scaled up
    # by 2 ** 64 first, exactly, and then like any block (`_LIFT`)
    tiny = np.flatnonzero((absmax > 0) & (absmax < _TINY))
    if tiny.size:
        lifted_inverse = np.float32(1.0) / (absmax[tiny] * _LIFT)
        product[tiny] = (blocks[tiny] * _LIFT) * lifted_inverse[:, None]
    scaled = product.reshape(-1)[:n]
    full = n - n % blocksize
    # bitsandbytes divides a short last block instead (x / absmax can round differently from
    # x * (1 / absmax), which moves a value sitting on a midpoint): we do the same
    scaled[full:] = x[full:] / (absmax[-1] if absmax[-1] > 0 else _TINY)
    return _nearest_code(scaled, code), absmax


def _nearest_code(scaled: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index into `code` of the level nearest to each scaled value; an exact tie (a value on a
    float32 midpoint) takes the lower level.

    Sorting the levels makes "nearest" a search among the midpoints between neighbours:
    `searchsorted(side="left")` counts the midpoints strictly below the value. FP4 is not sorted
    by code and has two codes for zero (0 and 8), so it gets a search table of its own; a stable
    sort puts code 0 first, so scaled values in [-0.0026, 0] take code 0 and those in
    (0, 0.0026] take code 8 (both decode to 0), as in bitsandbytes.
    """
    order = np.argsort(code, kind="stable")
    levels = code[order]
    midpoints = (levels[:-1] + levels[1:]) / np.float32(2.0)  # float32, like bitsandbytes
    position = np.searchsorted(midpoints, scaled, side="left")
    return order[position].astype(np.uint8)

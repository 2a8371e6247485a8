"""4-bit blockwise quantization, the storage format of QLoRA: NF4, FP4 and int4 codebooks,
double quantization of the scales, and two-codes-per-byte packing.

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

`dequantize_4bit` trusts nothing: `check_quantized` refuses a `Quantized4bit` whose fields
contradict each other (lengths, dtypes, shape, flags, non-finite scales) before decoding.

The file is longer than the codebase's ~300-line norm because of its two data tables (the 16
NF4 levels and the 127 positive levels of the dynamic map), written out one number a line, and
`check_quantized`, which spells out each field's rule so that its errors can name it.
"""

import math
import numbers
import statistics
from dataclasses import dataclass

import numpy as np

from lowrank._validate import ArgumentTypeError, check_blocksize, check_bool, check_quant_type

DOUBLE_QUANT_BLOCKSIZE = 256  # block of absmax values that share one float32 scale
_TINY = np.float32(1e-38)  # stands in for an all-zero block's absmax when dividing (0 * 1e38 = 0)
FLOAT32_MAX = np.float32(np.finfo(np.float32).max)  # no decoded scale goes beyond it
# a block whose absmax is below _TINY is multiplied by this first: exact (a power of two), and
# it brings every such absmax (>= 2 ** -149) to >= 2 ** -85, whose reciprocal float32 holds
_LIFT = np.float32(2.0**64)

# bitsandbytes' NF4 table, float32 (index = 4-bit code); `derive_nf4_code` rebuilds it.
_NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

# The 127 positive levels of bitsandbytes' dynamic map below 1.0, float32, as it builds them with
# float32 `torch.linspace` (whose last-bit rounding no closed formula reproduces; see
# `derive_dynamic_map` for the float64 formula, which agrees to 2 units in the last place).
_DYNAMIC_POSITIVE = np.array(
    [
        # 1e-6 x (1 means of linspace(0.1, 1, 2))
        5.5000004e-07,
        # 1e-5 x (2 means of linspace(0.1, 1, 3))
        3.2500002e-06,
        7.75e-06,
        # 1e-4 x (4 means of linspace(0.1, 1, 5))
        2.1249998e-05,
        4.375e-05,
        6.625e-05,
        8.875e-05,
        # 1e-3 x (8 means of linspace(0.1, 1, 9))
        1.5625001e-04,
        2.6875004e-04,
        3.8125002e-04,
        4.9375003e-04,
        6.062501e-04,
        7.1875006e-04,
        8.3125e-04,
        9.437501e-04,
        # 1e-2 x (16 means of linspace(0.1, 1, 17))
        1.2812499e-03,
        1.84375e-03,
        2.40625e-03,
        2.96875e-03,
        3.5312497e-03,
        4.09375e-03,
        4.6562497e-03,
        5.2187503e-03,
        5.78125e-03,
        6.34375e-03,
        6.90625e-03,
        7.46875e-03,
        8.03125e-03,
        8.59375e-03,
        9.156249e-03,
        9.71875e-03,
        # 1e-1 x (32 means of linspace(0.1, 1, 33))
        1.140625e-02,
        1.421875e-02,
        1.703125e-02,
        1.9843752e-02,
        2.265625e-02,
        2.546875e-02,
        2.8281251e-02,
        3.109375e-02,
        3.390625e-02,
        3.6718752e-02,
        3.953125e-02,
        4.2343747e-02,
        4.515625e-02,
        4.796875e-02,
        5.078125e-02,
        5.359375e-02,
        5.640625e-02,
        5.9218753e-02,
        6.203125e-02,
        6.484375e-02,
        6.7656256e-02,
        7.0468746e-02,
        7.328125e-02,
        7.609375e-02,
        7.890625e-02,
        8.171876e-02,
        8.453125e-02,
        8.734375e-02,
        9.015625e-02,
        9.2968754e-02,
        9.578126e-02,
        9.859375e-02,
        # 1e0 x (64 means of linspace(0.1, 1, 65))
        1.07031256e-01,
        1.2109375e-01,
        1.3515624e-01,
        1.4921875e-01,
        1.6328125e-01,
        1.7734376e-01,
        1.9140625e-01,
        2.0546874e-01,
        2.1953125e-01,
        2.3359375e-01,
        2.4765624e-01,
        2.6171875e-01,
        2.7578127e-01,
        2.8984374e-01,
        3.0390626e-01,
        3.1796873e-01,
        3.3203125e-01,
        3.4609374e-01,
        3.6015624e-01,
        3.7421876e-01,
        3.8828123e-01,
        4.0234375e-01,
        4.1640624e-01,
        4.3046874e-01,
        4.4453126e-01,
        4.5859373e-01,
        4.7265625e-01,
        4.867187e-01,
        5.0078124e-01,
        5.148437e-01,
        5.289062e-01,
        5.4296875e-01,
        5.570313e-01,
        5.710938e-01,
        5.8515626e-01,
        5.992187e-01,
        6.1328125e-01,
        6.273438e-01,
        6.414063e-01,
        6.5546876e-01,
        6.695312e-01,
        6.8359375e-01,
        6.976563e-01,
        7.117188e-01,
        7.2578126e-01,
        7.398437e-01,
        7.5390625e-01,
        7.679688e-01,
        7.8203124e-01,
        7.9609376e-01,
        8.101562e-01,
        8.2421875e-01,
        8.382813e-01,
        8.5234374e-01,
        8.6640626e-01,
        8.804687e-01,
        8.9453125e-01,
        9.085938e-01,
        9.2265624e-01,
        9.3671876e-01,
        9.507812e-01,
        9.6484375e-01,
        9.789063e-01,
        9.9296874e-01,
    ],
    dtype=np.float32,
)


def nf4_code() -> np.ndarray:
    """The 16 NF4 levels (float32, ascending, index = code): bitsandbytes' table.

    NormalFloat puts the levels at quantiles of N(0, 1), so that a normally distributed weight
    falls into each level's bin about equally often; 7 negative levels, an exact 0, 8 positive,
    scaled so the extremes are -1 and 1. `derive_nf4_code()` shows where the numbers come from.
    """
    return _NF4.copy()


def derive_nf4_code(offset: float = 0.9677083) -> np.ndarray:
    """Rebuild NF4 from normal quantiles (float64), the QLoRA paper's construction.

    Positive half: the quantiles at 8 probabilities evenly spaced from `offset` down to 0.5 (0.5
    itself dropped); negative half: the same with 7. Zero is added so that it is exact, and the
    whole set is divided by its largest value. `offset`, bitsandbytes' choice, is the mean of
    1 - 1/(2*15) and 1 - 1/(2*16): it keeps the outermost quantile finite (the 1.0 quantile is
    infinite). The probabilities are float32 as in bitsandbytes' script; the result matches
    `nf4_code()` to 1e-7.
    """
    normal = statistics.NormalDist()
    positive = [normal.inv_cdf(p) for p in _linspace_float32(offset, 0.5, 9)[:-1]]
    negative = [-normal.inv_cdf(p) for p in _linspace_float32(offset, 0.5, 8)[:-1]]
    levels = np.sort(np.array(positive + [0.0] + negative))
    return levels / levels.max()


def _linspace_float32(start: float, stop: float, num: int) -> np.ndarray:
    """`torch.linspace(start, stop, num)` in float32, as bitsandbytes' script drew the NF4
    probabilities: each point is start + i * step (or stop - (num - 1 - i) * step in the second
    half) rounded once. Their last bits move the NF4 levels by ~1e-7."""
    start, stop = np.float32(start), np.float32(stop)
    step = np.float32((stop - start) / np.float32(num - 1))
    i = np.arange(num)
    from_start = np.float64(start) + np.float64(step) * i  # exact product, one rounding below
    from_stop = np.float64(stop) - np.float64(step) * (num - 1 - i)
    return np.where(i < num // 2, from_start, from_stop).astype(np.float32)


def fp4_code() -> np.ndarray:
    """bitsandbytes' FP4 table (float32, index = bit pattern; bit 3 is the sign).

    The three low bits (2 exponent bits, 1 mantissa bit) select the magnitudes
    0, 0.0625, 8, 12, 4, 6, 2, 3, divided by 12 so the largest is 1. Codes 0 and 8 both decode
    to zero ("-0"; bitsandbytes stores it as +0.0, and so do we).
    """
    magnitudes = np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=np.float32)
    signed = np.concatenate([magnitudes, np.where(magnitudes > 0, -magnitudes, 0.0)])
    return (signed / np.float32(12.0)).astype(np.float32)


def int4_code() -> np.ndarray:
    """Symmetric absmax int4, for comparison: code c holds (c - 8) / 7 (float32).

    Values k / 7 for k = -7..7 use 15 of the 16 codes; code 0 (-8/7) is never chosen because
    scaled values lie in [-1, 1]. Evenly spaced levels waste resolution on the tails where
    normally distributed weights are rare; that is what NF4 fixes.
    """
    return (np.arange(16, dtype=np.float32) - np.float32(8.0)) / np.float32(7.0)


def dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic map (256 float32 levels, ascending) used for double quantization.

    A floating-point-like 8-bit type (Dettmers 2015, arXiv:1511.04561): for each decade
    10^-6 .. 10^0 it holds the midpoints of an even split of [0.1, 1] into 1, 2, 4, .., 64 parts,
    times that decade, with both signs; plus 0 and 1. Small magnitudes get few, finely spaced
    levels and large magnitudes more, coarser ones: relative precision, like an exponent and a
    mantissa. Bit-identical to `bitsandbytes.functional.create_dynamic_map(signed=True)`.
    """
    levels = np.concatenate([-_DYNAMIC_POSITIVE, [0.0, 1.0], _DYNAMIC_POSITIVE])
    return np.sort(levels.astype(np.float32))


def derive_dynamic_map() -> np.ndarray:
    """The dynamic map from its formula, in float64 (see `dynamic_map`)."""
    levels = [0.0, 1.0]
    for decade in range(7):
        edges = np.linspace(0.1, 1.0, 2**decade + 1)
        means = 10.0 ** (decade - 6) * (edges[:-1] + edges[1:]) / 2
        levels += list(means) + list(-means)
    return np.sort(np.array(levels))


def code_for(quant_type: str) -> np.ndarray:
    """The 16-level table of `quant_type` ("nf4", "fp4" or "int4"), index = 4-bit code."""
    check_quant_type(quant_type)
    return {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}[quant_type]()


@dataclass(frozen=True, eq=False)
class Quantized4bit:
    """A 4-bit blockwise-quantized array: everything needed to rebuild it, nothing more.

    packed:  uint8 (ceil(n / 2),), two codes per byte, element 2j in the high nibble.
    absmax:  float32 (n_blocks,) block scales; with double quantization uint8 codes of
             `dynamic_map()` for (absmax - offset), in blocks of 256.
    offset:  float32 mean of the block scales (double quantization), else None.
    absmax2: float32 (ceil(n_blocks / 256),) scales of the absmax codes, else None.
    """

    packed: np.ndarray
    absmax: np.ndarray
    offset: np.float32 | None
    absmax2: np.ndarray | None
    shape: tuple[int, ...]
    dtype: np.dtype
    blocksize: int
    quant_type: str
    double_quant: bool

    def absmax_float32(self) -> np.ndarray:
        """The block scales as float32 (n_blocks,), decoding double quantization if used:
        `dynamic_map()[code] * absmax2[j // 256] + offset`, clamped to +-float32 max."""
        check_quantized(self)
        return _absmax_float32(self)

    @property
    def nbytes(self) -> int:
        """Bytes that must be stored: codes, scales and, with double quantization, their scales
        and the offset (the code tables are constants)."""
        check_quantized(self, values=False)  # sizes only: the values do not change the count
        total = self.packed.nbytes + self.absmax.nbytes
        if self.double_quant:
            total += self.absmax2.nbytes + 4  # float32 offset
        return total


def quantize_4bit(
    w: np.ndarray, *, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True
) -> Quantized4bit:
    """Quantize `w` to 4 bits, blockwise by absmax (see the module docstring for the steps).

    The arithmetic is float32, as in bitsandbytes: scaled = w * (1 / absmax).
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
    level * scale then fits the dtype too."""
    return np.float32(min(float(np.finfo(dtype).max), float(FLOAT32_MAX)))


def check_quantized(q: Quantized4bit, *, values: bool = True) -> None:
    """Refuse a `Quantized4bit` whose fields do not describe one quantized array.

    Checks, naming the field and what was expected: `quant_type`, `blocksize` and
    `double_quant` are valid; `shape` is a tuple of non-negative ints holding at least one
    element (n); `dtype` is a floating-point dtype; `packed` is a 1-D uint8 array of exactly
    ceil(n / 2) bytes (a shape that needs fewer codes is refused too, never truncated);
    `absmax` is 1-D with ceil(n / blocksize) entries, float32, or uint8 codes with double
    quantization, which also needs a float32 scalar `offset` and a 1-D float32 `absmax2` of
    ceil(n_blocks / 256) entries (both None without it). With `values`, the float32 scales and
    the offset must be finite: O(n_blocks) work; `packed` is never read (every byte is a
    valid pair of codes). Wrong types raise `ArgumentTypeError` (a TypeError and a
    ValueError), inconsistent values `ValueError`.
    """
    if not isinstance(q, Quantized4bit):
        raise ArgumentTypeError(f"expected a Quantized4bit, got {type(q).__name__}")
    check_quant_type(q.quant_type)
    check_blocksize(q.blocksize)
    check_bool("Quantized4bit.double_quant", q.double_quant)
    n = _check_shape(q.shape)
    dtype = q.dtype
    if not (
        (isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)))
        and np.issubdtype(dtype, np.floating)
    ):
        raise ArgumentTypeError(
            f"Quantized4bit.dtype must be the floating-point dtype of the quantized array, "
            f"got {dtype!r}"
        )
    n_blocks = -(-n // q.blocksize)
    where = f"for shape {q.shape} (n = {n})"
    _check_array("packed", q.packed, np.uint8, -(-n // 2), f"ceil(n / 2) bytes {where}")
    blocks = f"ceil(n / blocksize) = ceil({n} / {q.blocksize}) entries {where}"
    if not q.double_quant:
        _check_array("absmax", q.absmax, np.float32, n_blocks, f"{blocks}, as double_quant=False")
        for name in ("offset", "absmax2"):
            if getattr(q, name) is not None:
                raise ValueError(f"Quantized4bit.{name} must be None without double quantization")
        if values and not np.all(np.isfinite(q.absmax)):
            raise ValueError("Quantized4bit.absmax must be finite (it holds NaN or inf)")
        return
    _check_array("absmax", q.absmax, np.uint8, n_blocks, f"{blocks}, codes as double_quant=True")
    n_blocks2 = -(-n_blocks // DOUBLE_QUANT_BLOCKSIZE)
    _check_array(
        "absmax2", q.absmax2, np.float32, n_blocks2, f"ceil(n_blocks / 256) = {n_blocks2} entries"
    )
    offset = q.offset
    if offset is None:
        raise ValueError("Quantized4bit.offset is missing: double quantization needs it")
    if not isinstance(offset, (np.ndarray, np.generic)) or offset.dtype != np.float32:
        raise ArgumentTypeError(
            f"Quantized4bit.offset must be a float32 scalar, got {offset!r} "
            f"({type(offset).__name__})"
        )
    if offset.shape != ():
        raise ValueError(f"Quantized4bit.offset must be a scalar, got shape {offset.shape}")
    for name, scales in (("absmax2", q.absmax2), ("offset", offset)):
        if values and not np.all(np.isfinite(scales)):
            raise ValueError(f"Quantized4bit.{name} must be finite (it holds NaN or inf)")


def _check_shape(shape: object) -> int:
    """The number of elements of a valid `Quantized4bit.shape`."""
    if not isinstance(shape, tuple) or not all(
        isinstance(size, numbers.Integral) and not isinstance(size, bool) for size in shape
    ):
        raise ArgumentTypeError(f"Quantized4bit.shape must be a tuple of ints, got {shape!r}")
    if any(size < 0 for size in shape) or math.prod(shape) == 0:
        raise ValueError(
            f"Quantized4bit.shape must be non-negative sizes holding at least one element, "
            f"got {shape}"
        )
    return math.prod(int(size) for size in shape)


def _check_array(name: str, a: object, dtype: type, size: int, what: str) -> None:
    """`Quantized4bit.<name>` must be a 1-D `dtype` array of `size` entries."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        got = f"{a.dtype} array" if isinstance(a, np.ndarray) else type(a).__name__
        raise ArgumentTypeError(
            f"Quantized4bit.{name} must be a {np.dtype(dtype).name} array ({what}), got {got}"
        )
    if a.shape != (size,):
        raise ValueError(
            f"Quantized4bit.{name} must be 1-D with {size} entries ({what}), got shape {a.shape}"
        )


def _absmax_float32(q: Quantized4bit) -> np.ndarray:
    """`Quantized4bit.absmax_float32` for a checked `q`.

    The rebuilt scale is the nearest 8-bit level times absmax2, plus offset: it can lie above
    the block's true absmax by up to half a level's gap (times absmax2), which near float32's
    top rounds to inf. The clamp to +-float32 max only moves such a scale closer to the true
    absmax (which is finite), and leaves every other scale, so every ordinary one, as it is.
    """
    if not q.double_quant:
        return q.absmax
    scales = _block_scales(q.absmax2, DOUBLE_QUANT_BLOCKSIZE, q.absmax.size)
    with np.errstate(over="ignore"):  # a rebuilt scale beyond float32: clamped just below
        rebuilt = dynamic_map()[q.absmax] * scales + q.offset
    return np.clip(rebuilt, -FLOAT32_MAX, FLOAT32_MAX, out=rebuilt)


def pack_4bit(codes: np.ndarray, pad_code: int = 0) -> np.ndarray:
    """Pack 4-bit codes (uint8 values 0..15, length n) into ceil(n / 2) bytes, high nibble first;
    an odd n is padded with `pad_code` in the last low nibble."""
    codes = np.asarray(codes)
    if codes.ndim != 1 or codes.dtype != np.uint8 or np.any(codes > 15):
        raise ValueError("codes must be a 1-D uint8 array of values 0..15")
    if codes.size % 2:
        codes = np.append(codes, np.uint8(pad_code))
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: np.ndarray, n: int) -> np.ndarray:
    """The first `n` 4-bit codes (uint8) held in `packed` (inverse of `pack_4bit`)."""
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


def _block_scales(absmax: np.ndarray, blocksize: int, n: int) -> np.ndarray:
    """Each element's block scale, (n,)."""
    return np.repeat(absmax, blocksize)[:n]

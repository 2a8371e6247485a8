"""The code tables of QLoRA's storage format: the 16 levels of NF4, FP4 and int4 that a 4-bit
code indexes, and the 256-level 8-bit dynamic map that double quantization stores the block
scales in. Every table is float32, index = code, and bit-identical to bitsandbytes'.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).

A weight decodes as `level[code] * absmax` of its block (`quant.py`), so the levels lie in
[-1, 1]; the tables differ in where they put their 16 levels:

- NormalFloat (NF4, the paper's type) puts them at quantiles of N(0, 1), so that a normally
  distributed weight, scaled by its block's absmax, falls into each level's bin about equally
  often: 7 negative levels, an exact 0 and 8 positive, scaled so the extremes are -1 and 1.
  `nf4_code()` is bitsandbytes' table; `derive_nf4_code()` rebuilds it from normal quantiles.
- FP4 is a 4-bit float: a sign bit and three bits (2 exponent, 1 mantissa) selecting one of
  8 magnitudes, divided by 12 so the largest is 1; codes 0 and 8 both decode to zero.
- int4, for comparison, is symmetric absmax integers, k / 7 for k = -7..7. Evenly spaced
  levels waste resolution on the tails where normally distributed weights are rare; that is
  what NF4 fixes.
- The dynamic map (Dettmers 2015, arXiv:1511.04561) is a floating-point-like signed 8-bit
  type: for each decade 10^-6 .. 10^0 the midpoints of an even split of [0.1, 1] into
  1, 2, 4, .., 64 parts, both signs, plus 0 and 1. Small magnitudes get few, finely spaced
  levels and large ones more, coarser ones: relative precision, like an exponent and a
  mantissa. `derive_dynamic_map()` gives its float64 formula.

Most of the file is its two data tables (the 16 NF4 levels and the 127 positive levels of the
dynamic map), written out one number a line.
"""

import statistics

import numpy as np

from lowrank._validate import check_quant_type

__all__ = [
    "code_for",
    "derive_dynamic_map",
    "derive_nf4_code",
    "dynamic_map",
    "fp4_code",
    "int4_code",
    "nf4_code",
]

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
    Dettmers et al. 2023 (QLoRA), arXiv:2305.14314, section 3. Returns (16,), a fresh copy.

    Examples:
        >>> from lowrank.numpy import nf4_code
        >>> code = nf4_code()
        >>> code.shape, code.dtype
        ((16,), dtype('float32'))
        >>> code[[0, 7, 15]]  # the extremes and the exact zero
        array([-1.,  0.,  1.], dtype=float32)
    """
    return _NF4.copy()


def derive_nf4_code(offset: float = 0.9677083) -> np.ndarray:
    """Rebuild NF4 from normal quantiles (float64), the QLoRA paper's construction.

    Positive half: the quantiles at 8 probabilities evenly spaced from `offset` down to 0.5 (0.5
    itself dropped); negative half: the same with 7. Zero is added so that it is exact, and the
    whole set is divided by its largest value. `offset`, bitsandbytes' choice, is the mean of
    1 - 1/(2*15) and 1 - 1/(2*16): it keeps the outermost quantile finite (the 1.0 quantile is
    infinite). The probabilities are float32 as in bitsandbytes' script; the result matches
    `nf4_code()` to 1e-7. Dettmers et al. 2023 (QLoRA), arXiv:2305.14314, section 3.
    Returns (16,), ascending.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy.codebooks import derive_nf4_code, nf4_code
        >>> bool(np.allclose(derive_nf4_code(), nf4_code(), rtol=0, atol=1e-7))
        True
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
    to zero ("-0"; bitsandbytes stores it as +0.0, and so do we). Returns (16,). QLoRA
    (Dettmers et al. 2023, arXiv:2305.14314) compares it with NF4.

    Examples:
        >>> from lowrank.numpy import fp4_code
        >>> fp4_code()[:8] * 12  # the positive half, in units of 1/12
        array([ 0.    ,  0.0625,  8.    , 12.    ,  4.    ,  6.    ,  2.    ,  3.    ],
              dtype=float32)
    """
    magnitudes = np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=np.float32)
    signed = np.concatenate([magnitudes, np.where(magnitudes > 0, -magnitudes, 0.0)])
    return (signed / np.float32(12.0)).astype(np.float32)


def int4_code() -> np.ndarray:
    """Symmetric absmax int4, for comparison: code c holds (c - 8) / 7 (float32).

    Values k / 7 for k = -7..7 use 15 of the 16 codes; code 0 (-8/7) is never chosen because
    scaled values lie in [-1, 1]. Evenly spaced levels waste resolution on the tails where
    normally distributed weights are rare; that is what NF4 fixes. Returns (16,), ascending.

    Examples:
        >>> from lowrank.numpy import int4_code
        >>> int4_code()[[0, 1, 8, 15]] * 7  # code c holds (c - 8) / 7
        array([-8., -7.,  0.,  7.], dtype=float32)
    """
    return (np.arange(16, dtype=np.float32) - np.float32(8.0)) / np.float32(7.0)


def dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic map (256 float32 levels, ascending) used for double quantization.

    A floating-point-like 8-bit type (Dettmers 2015, arXiv:1511.04561): for each decade
    10^-6 .. 10^0 it holds the midpoints of an even split of [0.1, 1] into 1, 2, 4, .., 64 parts,
    times that decade, with both signs; plus 0 and 1. Small magnitudes get few, finely spaced
    levels and large magnitudes more, coarser ones: relative precision, like an exponent and a
    mantissa. Bit-identical to `bitsandbytes.functional.create_dynamic_map(signed=True)`.
    QLoRA stores its block scales in it (Dettmers et al. 2023, arXiv:2305.14314); it is also
    the map of 8-bit optimizers (Dettmers et al. 2022, arXiv:2110.02861). Returns (256,).

    Examples:
        >>> from lowrank.numpy import dynamic_map
        >>> levels = dynamic_map()
        >>> levels.shape, levels.dtype, float(levels.max())
        ((256,), dtype('float32'), 1.0)
        >>> print(levels[levels > 0].min())  # the smallest positive level: 1e-6 * (0.1 + 1) / 2
        5.5000004e-07
    """
    levels = np.concatenate([-_DYNAMIC_POSITIVE, [0.0, 1.0], _DYNAMIC_POSITIVE])
    return np.sort(levels.astype(np.float32))


def derive_dynamic_map() -> np.ndarray:
    """The dynamic map from its formula, in float64 (see `dynamic_map`): (256,), ascending.

    It agrees with the float32 table to 2 units in the last place (bitsandbytes builds the
    table with float32 `torch.linspace`, whose rounding no closed formula reproduces).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy.codebooks import derive_dynamic_map, dynamic_map
        >>> bool(np.allclose(derive_dynamic_map(), dynamic_map(), rtol=1e-6, atol=0))
        True
    """
    levels = [0.0, 1.0]
    for decade in range(7):
        edges = np.linspace(0.1, 1.0, 2**decade + 1)
        means = 10.0 ** (decade - 6) * (edges[:-1] + edges[1:]) / 2
        levels += list(means) + list(-means)
    return np.sort(np.array(levels))


def code_for(quant_type: str) -> np.ndarray:
    """The 16-level table of `quant_type` ("nf4", "fp4" or "int4"), index = 4-bit code: (16,).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy.codebooks import code_for, nf4_code
        >>> bool(np.array_equal(code_for("nf4"), nf4_code()))
        True
        >>> code_for("nf5")
        Traceback (most recent call last):
            ...
        ValueError: unknown quant_type 'nf5'; expected one of ('nf4', 'fp4', 'int4')
    """
    check_quant_type(quant_type)
    return {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}[quant_type]()

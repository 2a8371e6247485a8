"""The error bound of 4-bit blockwise quantization and values at the edges of float32, shared by
the NumPy and torch quantization tests (tests/numpy/test_quant.py, tests/torch/test_quant.py).

The bound is derived here in float64 from the definition of the format, not from lowrank's
code: only the level tables are passed in (they are checked against their formulas elsewhere).
"""

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)  # 3.4028235e38
FLOAT16_MAX = 65504.0
BFLOAT16_MAX = 3.3895313892515355e38  # 0x7F7F: the largest finite bfloat16, exact in float32
SMALLEST_SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)  # 1.4e-45, 2 ** -149
SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)  # 1.18e-38

# values a property test should meet often, not only when a random float happens to be one
EDGE_VALUES = [
    FLOAT32_MAX,
    -FLOAT32_MAX,
    float(np.nextafter(np.float32(FLOAT32_MAX), np.float32(0))),
    BFLOAT16_MAX,
    3e38,
    1e38,
    FLOAT16_MAX,
    SMALLEST_NORMAL,
    1e-38,
    1e-40,
    -1e-40,
    SMALLEST_SUBNORMAL,
    -SMALLEST_SUBNORMAL,
    0.0,
    1.0,
]


def worst_rounding(table: np.ndarray) -> float:
    """The largest distance from a point of [-1, 1] to its nearest level: half the widest gap
    between neighbouring levels, or the distance from an end of [-1, 1] to the outermost level."""
    levels = np.sort(np.asarray(table, dtype=np.float64))
    return max(np.diff(levels).max() / 2, levels[0] + 1, 1 - levels[-1])


def error_bound(
    w: np.ndarray, blocksize: int, table: np.ndarray, dynamic: np.ndarray, double_quant: bool
) -> np.ndarray:
    """Per element of w (flattened, as float32 values), the largest |w - dequantized| allowed.

    Each scaled value w / a (a = its block's absmax) takes the nearest of the 16 levels, so
    |w - level * a| <= e4 * a (e4 = worst_rounding(table)). With double quantization the scale
    itself is a rebuilt a' with |a' - a| <= e8 * a2 (e8 = worst_rounding(dynamic), a2 = the
    largest |absmax - offset| among the 256 scales sharing a's absmax2, offset = their mean),
    and |level| <= 1 carries that error into the weight unchanged. On top: float32 rounding of
    the few operations, 4 units in the last place of the terms, where a unit is 2 ** -23 of the
    value or, for subnormal values, 2 ** -149 (the spacing of float32 below 2 ** -126).
    """
    x = np.asarray(w).astype(np.float32).astype(np.float64).reshape(-1)
    n_blocks = -(-x.size // blocksize)
    padded = np.zeros(n_blocks * blocksize)
    padded[: x.size] = np.abs(x)
    a = padded.reshape(n_blocks, blocksize).max(axis=1)  # true block absmax
    bound = worst_rounding(table) * a + 4 * (2.0**-23 * a + 2.0**-149)
    if double_quant:
        offset = a.mean()
        groups = -(-n_blocks // 256)
        centred = np.zeros(groups * 256)
        centred[:n_blocks] = np.abs(a - offset)
        a2 = np.repeat(centred.reshape(groups, 256).max(axis=1), 256)[:n_blocks]
        bound += worst_rounding(dynamic) * a2 + 4 * (2.0**-23 * (a2 + abs(offset)) + 2.0**-149)
    return np.repeat(bound, blocksize)[: x.size]


def extreme_weights() -> dict[str, np.ndarray]:
    """float32 weights (flat, blocksize 64 in mind) at the edges of the float32 range."""
    rng = np.random.default_rng(0)
    signs = rng.choice([-1.0, 1.0], 64 * 24)
    top = np.full(64 * 21, FLOAT32_MAX)
    top[-64:] = 0  # 20 blocks at the max, one of zeros: each rebuilt scale overshoots by 1.6%
    near_top = np.abs(rng.standard_normal(64 * 24)) * 1e38
    near_top[::64] = FLOAT32_MAX
    mixed = np.where(np.arange(64 * 24) // 64 % 3 == 0, FLOAT32_MAX, 1e-40) * signs
    mixed[128:192] = 0
    return {
        "float32 max": top * signs[: top.size],
        "float32 max, one block": np.full(64, FLOAT32_MAX),
        "near float32 max": near_top * signs,
        "subnormal": rng.uniform(-1, 1, 64 * 8) * 1e-40,
        "smallest subnormal": np.full(65, SMALLEST_SUBNORMAL) * signs[:65],
        "just below normal": rng.uniform(-1, 1, 64 * 4) * 1.1e-38,
        "mixed huge and tiny blocks": mixed,
        "huge and tiny in one block": np.tile([FLOAT32_MAX, 1e-40, -1e-30, 0.0], 64 * 4),
        "normal and subnormal blocks": np.where(
            np.arange(64 * 8) // 64 % 2 == 0, rng.standard_normal(64 * 8), 1e-42
        ),
    }

"""Checks for "NF4 by hand", part 1: the NF4 levels, and what every check of this assignment
shares (the variant, the tables, the test tensors, the reference codes); blockwise codes are
`nf4_blockwise.py`, the storage side (nibble packing, double quantization, bits per weight)
`nf4_storage.py`.

QLoRA: Dettmers et al. 2023, arXiv:2305.14314 (NF4, double quantization, 4.127 bits/weight).

The oracle for the 4-bit codes, scales and packed bytes is bitsandbytes itself
(`bitsandbytes.functional.quantize_4bit` on CPU): the student's bytes must be bit-identical to
its bytes. Where bitsandbytes is not installed the same rule is applied by brute force (every
value against every midpoint) and the message says so. Double quantization's 8-bit codes are
checked against the exact nearest level of the dynamic map (bitsandbytes' CPU kernel uses an
approximate search that differs in rare places, so it cannot be the oracle there).

Test tensors are built so that only the documented rules decide the answer: no value sits
within 1e-5 of a boundary between two levels, except in the case made of exact ties, where
every value sits exactly on one (a tie takes the lower code, as torch.bucketize does). Each
student's tensor (`nf4_variant`) has an odd number of elements, a short last block, an
all-zero block and blocks of very different scales.

Constants: `ASSIGNMENT`, the name that seeds every variant; `LEVEL_TOL`, how close the
student's levels must come to the table; `DQ_BLOCKSIZE` (256), the absmax values per block of
double quantization.

    check_nf4_levels(nf4_levels, student_id="ada@example.edu")  # None, or CheckFailed
"""

import statistics
from dataclasses import dataclass

import numpy as np

from ._feedback import (
    as_array,
    call,
    check_callable,
    check_own_work,
    fail,
    student_rng,
)

__all__ = [
    "ASSIGNMENT",
    "DQ_BLOCKSIZE",
    "LEVEL_TOL",
    "NF4Variant",
    "check_nf4_levels",
    "dynamic_map_table",
    "nf4_table",
    "nf4_variant",
    "reference_codes",
]

ASSIGNMENT = "nf4_by_hand"


LEVEL_TOL = 1e-6  # a float64 derivation from normal quantiles lands within ~1e-7 of the table


DQ_BLOCKSIZE = 256


@dataclass(frozen=True)
class NF4Variant:
    """One student's tensor: W [rows, cols] (odd size), the 4-bit blocksize, the number of
    absmax values to double-quantize, an NF4 offset other than bitsandbytes', and a seed.

    Made by `nf4_variant`; the checks build their test tensors from it.

    Examples:
        >>> v = nf4_variant()  # the public variant
        >>> v
        NF4Variant(rows=15, cols=41, blocksize=32, n_scales=619, seed=1297394681, offset=0.975)
        >>> v.rows * v.cols, -(-v.rows * v.cols // v.blocksize)  # odd n; 20 blocks, one short
        (615, 20)
    """

    rows: int
    cols: int
    blocksize: int
    n_scales: int
    seed: int
    offset: float


def nf4_variant(student_id: str | None = None) -> NF4Variant:
    """Sizes and seed of `student_id` (None: the public variant); the same id always gets the
    same variant.

    Examples:
        >>> nf4_variant("ada@example.edu")
        NF4Variant(rows=13, cols=33, blocksize=32, n_scales=634, seed=1676301819, offset=0.975)
    """
    rng = student_rng(student_id, ASSIGNMENT)
    return NF4Variant(
        rows=int(rng.choice([9, 11, 13, 15])),
        cols=int(rng.choice([33, 35, 37, 39, 41])),
        blocksize=int(rng.choice([32, 64])),
        n_scales=int(rng.integers(530, 760)),
        seed=int(rng.integers(2**31)),
        offset=float(rng.choice([0.95, 0.96, 0.975, 0.98, 0.99])),
    )


def nf4_table() -> np.ndarray:
    """bitsandbytes' NF4 table (float32, 16 levels): the exact values the codes index.

    QLoRA's NormalFloat4 (Dettmers et al. 2023, arXiv:2305.14314). Read from bitsandbytes
    when it is installed, else `lowrank.numpy.nf4_code()`, the same table bit for bit.

    Examples:
        >>> table = nf4_table()
        >>> table.dtype, table.shape
        (dtype('float32'), (16,))
        >>> table[:3], float(table[7])
        (array([-1.    , -0.6962, -0.5251], dtype=float32), 0.0)
    """
    try:
        from bitsandbytes.functional import get_4bit_type

        return get_4bit_type("nf4", device="cpu").numpy().astype(np.float32)
    except ImportError:
        from lowrank.numpy import nf4_code  # the same table, bit for bit (tested)

        return nf4_code()


def dynamic_map_table() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (256 float32 levels, ascending).

    The map of 8-bit block-wise quantization (Dettmers et al. 2022, arXiv:2110.02861) that
    QLoRA's double quantization uses for the block scales. Read from bitsandbytes when it is
    installed, else `lowrank.numpy.dynamic_map()`, the same map bit for bit.

    Examples:
        >>> table = dynamic_map_table()
        >>> table.dtype, table.shape, float(table[-1])
        (dtype('float32'), (256,), 1.0)
        >>> bool(np.all(np.diff(table) > 0))
        True
    """
    try:
        from bitsandbytes.functional import create_dynamic_map

        return create_dynamic_map(signed=True).numpy().astype(np.float32)
    except ImportError:
        from lowrank.numpy import dynamic_map  # the same map, bit for bit (tested)

        return dynamic_map()


def _midpoints(levels: np.ndarray) -> np.ndarray:
    return (levels[:-1] + levels[1:]) / np.float32(2)  # float32, as bitsandbytes computes them


def _blocks_scaled(x: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """(scaled (n,), absmax (n_blocks,)) in float32 the way bitsandbytes computes them:
    x * (1 / absmax) for full blocks, x / absmax for the short last one; absmax 0 -> scaled 0."""
    n = x.size
    n_blocks = -(-n // blocksize)
    padded = np.zeros(n_blocks * blocksize, np.float32)
    padded[:n] = x
    blocks = padded.reshape(n_blocks, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    safe = np.maximum(absmax, np.float32(1e-38))
    scaled = (blocks * (np.float32(1) / safe)[:, None]).reshape(-1)[:n]
    full = n - n % blocksize
    scaled[full:] = x[full:] / safe[-1]
    return scaled, absmax


def _nudge(x: np.ndarray, blocksize: int, levels: np.ndarray) -> np.ndarray:
    """Move every value whose scaled value lies within 1e-5 of a midpoint a little towards 0
    (never past its block's absmax), so that no rounding subtlety decides a code."""
    x = x.copy()
    mids = _midpoints(levels)
    for _ in range(20):
        scaled, _ = _blocks_scaled(x, blocksize)
        near = np.min(np.abs(scaled[:, None] - mids[None, :]), axis=1) < 1e-5
        near &= np.abs(scaled) < 1  # the block's absmax itself is never near a midpoint here
        if not near.any():
            return x
        x[near] *= np.float32(0.999)
    raise RuntimeError("could not build a test tensor away from the midpoints")  # unreachable


def _weights(v: NF4Variant) -> np.ndarray:
    """W [rows, cols] float32: normal values, each block at its own scale, block 1 all zero."""
    rng = np.random.default_rng(v.seed)
    n = v.rows * v.cols
    x = rng.standard_t(df=5, size=n).astype(np.float32)
    scales = np.exp(rng.normal(0, 1.0, size=-(-n // v.blocksize))).astype(np.float32)
    x *= np.repeat(scales, v.blocksize)[:n]
    x[v.blocksize : 2 * v.blocksize] = 0  # an all-zero block
    return _nudge(x, v.blocksize, nf4_table()).reshape(v.rows, v.cols)


def _ties() -> np.ndarray:
    """Two blocks of 64 and 31 values, each holding 1.0 (so absmax is exactly 1 and scaling is
    exact) and every midpoint between neighbouring NF4 levels: exact ties."""
    mids = _midpoints(nf4_table())
    rng = np.random.default_rng(0)
    first = np.concatenate([[1.0], mids, mids, -rng.uniform(0, 1, 64 - 31)]).astype(np.float32)
    second = np.concatenate([[1.0], mids, -rng.uniform(0, 1, 15)]).astype(np.float32)
    far = np.concatenate([first, second])
    keep = np.zeros(far.size, bool)
    keep[1:31] = keep[65:80] = True  # the ties themselves must stay exactly where they are
    nudged = _nudge(far, 64, nf4_table())
    return np.where(keep, far, nudged).astype(np.float32)


def reference_codes(w: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray, bytes, str]:
    """(codes uint8 (n,), absmax float32 (n_blocks,), packed bytes, oracle name) for w.

    The NF4 codes of w (any shape, flattened row-major) in blocks of `blocksize`: from
    `bitsandbytes.functional.quantize_4bit` on CPU when bitsandbytes is installed (which takes
    blocksizes of 64 and up), else by brute force; the oracle name says which.

    Examples:
        >>> w = np.array([[1.0, -0.5, 0.0], [0.25, 2.0, -2.0]], np.float32)  # (2, 3)
        >>> codes, absmax, packed, oracle = reference_codes(w, 64)  # one short block
        >>> codes, absmax
        (array([12,  4,  7,  9, 15,  0], dtype=uint8), array([2.], dtype=float32))
        >>> packed.hex(), oracle.split()[0] in ("bitsandbytes", "brute")
        ('c479f0', True)
    """
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    try:
        import bitsandbytes
        import torch
        from bitsandbytes.functional import quantize_4bit

        packed, state = quantize_4bit(
            torch.from_numpy(x.copy()),
            blocksize=blocksize,
            quant_type="nf4",
            compress_statistics=False,
        )
        packed = packed.reshape(-1).numpy().copy()
        codes = np.empty(2 * packed.size, np.uint8)
        codes[0::2], codes[1::2] = packed >> 4, packed & 15
        absmax = state.absmax.numpy().copy()
        absmax[absmax == np.float32(1e-38)] = 0  # its divide-by-zero guard on a zero short block
        return codes[: x.size], absmax, packed.tobytes(), f"bitsandbytes {bitsandbytes.__version__}"
    except ImportError:
        scaled, absmax = _blocks_scaled(x, blocksize)
        codes = np.searchsorted(_midpoints(nf4_table()), scaled, side="left").astype(np.uint8)
        padded = np.append(codes, np.uint8(7)) if codes.size % 2 else codes
        packed = ((padded[0::2] << 4) | padded[1::2]).astype(np.uint8)
        return codes, absmax, packed.tobytes(), "brute force (bitsandbytes not installed)"


def check_nf4_levels(nf4_levels, *, student_id: str | None = None) -> None:
    """nf4_levels(offset=0.9677083) -> 16 ascending values from normal quantiles: 7 negative,
    an exact 0, 8 positive, ends at -1 and 1; at the default offset within 1e-6 of
    bitsandbytes' table, and with a student's own offset within 1e-6 of the same construction
    (so that the table cannot simply be typed in).

    The NF4 construction of QLoRA (Dettmers et al. 2023, arXiv:2305.14314, section 3).

    Examples:
        >>> from statistics import NormalDist
        >>> def nf4_levels(offset=0.9677083):
        ...     normal = NormalDist()
        ...     positive = [normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
        ...     negative = [-normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
        ...     levels = np.sort(np.array([*positive, 0.0, *negative]))
        ...     return levels / levels.max()
        >>> check_nf4_levels(nf4_levels, student_id="ada@example.edu")  # silent: right
        >>> check_nf4_levels(lambda offset=0.9677083: np.linspace(-1, 1, 16))
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_nf4_levels: evenly spaced levels
          case:     nf4_levels()
          expected: quantiles of N(0, 1), dense near 0: [-1.    -0.696 -0.525 -0.395 -0.284
          -0.185 -0.091  0.     0.08   0.161 0.246  0.338  0.441  0.563  0.723  1.   ]
          got:      [-1.    -0.867 -0.733 -0.6   -0.467 -0.333 -0.2   -0.067  0.067  0.2
          0.333  0.467  0.6    0.733  0.867  1.   ]
          hint:     evenly spaced levels are int4's; NF4 puts its levels at quantiles of N(0, 1),
                    so that normally distributed weights use every level about equally often
    """
    check = "check_nf4_levels"
    check_callable(check, nf4_levels)
    check_own_work(check, nf4_levels)
    default = _levels_of(check, call(check, nf4_levels, case="nf4_levels()"), "nf4_levels()")
    error = float(np.abs(default - nf4_table()).max())
    if error > LEVEL_TOL:
        fail(
            check,
            f"levels differ from bitsandbytes' NF4 by up to {error:.2g} (allowed {LEVEL_TOL:g}: "
            "a float64 derivation is within ~1e-7)",
            expected=np.round(nf4_table(), 4),
            got=np.round(default, 4),
            hint="positive half: N^-1 of 8 probabilities evenly spaced from 0.9677083 to 0.5",
            case="nf4_levels()",
        )
    if student_id is None:
        return
    offset = nf4_variant(student_id).offset
    case = f"nf4_levels(offset={offset})"
    got = _levels_of(check, call(check, nf4_levels, offset=offset, case=case), case)
    normal = statistics.NormalDist()  # the construction, written out (QLoRA, section 3)
    positive = [normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    want = np.sort(np.array([*positive, 0.0, *negative]))
    want /= want.max()
    error = float(np.abs(got - want).max())
    if error > LEVEL_TOL:
        hint = "the probabilities run from `offset` (not a fixed number) down to 0.5"
        if np.allclose(got, default, atol=1e-12):
            hint = "your levels ignore `offset`: derive them from it instead of a fixed table"
        fail(
            check,
            f"levels for offset {offset} differ from the construction by up to {error:.2g} "
            f"(allowed {LEVEL_TOL:g})",
            expected=np.round(want, 4),
            got=np.round(got, 4),
            hint=hint,
            case=case,
        )


def _levels_of(check: str, result: object, case: str) -> np.ndarray:
    """`result` as 16 float64 levels, with the structural mistakes named."""
    got = as_array(check, result, "the levels", case=case)
    got = got.astype(np.float64).reshape(-1) if got.size == 16 else got
    if got.shape != (16,):
        fail(
            check,
            "wrong number of levels",
            expected="16 levels (4 bits)",
            got=got.shape,
            hint="positive half: 8 quantiles; negative half: 7; plus an exact zero",
            case=case,
        )
    if np.any(np.diff(got) <= 0):
        fail(
            check,
            "levels are not strictly ascending",
            expected="sorted, index = code",
            got=np.round(got, 4),
            hint="sort them: code c decodes to levels[c]",
            case=case,
        )
    gaps = np.diff(got)
    if np.ptp(gaps) < 1e-3 * gaps.mean():
        fail(
            check,
            "evenly spaced levels",
            expected=f"quantiles of N(0, 1), dense near 0: {np.round(nf4_table(), 3)}",
            got=np.round(got, 3),
            hint="evenly spaced levels are int4's; NF4 puts its levels at quantiles of N(0, 1), "
            "so that normally distributed weights use every level about equally often",
            case=case,
        )
    if abs(got[0] + 1) > 1e-12 or abs(got[-1] - 1) > 1e-12:
        fail(
            check,
            "the ends are not -1 and 1",
            expected="levels[0] = -1, levels[15] = 1",
            got=f"{got[0]:.6g}, {got[-1]:.6g}",
            hint="divide every quantile by the largest one: blocks are scaled to [-1, 1]",
            case=case,
        )
    if got[7] != 0:
        fail(
            check,
            "no exact zero at code 7",
            expected="7 negative levels, an exact 0.0, 8 positive",
            got=f"levels[7] = {got[7]:.6g}, {np.sum(got < 0)} negative",
            hint="zero must be exact (padding, and weights that are exactly 0, must decode to "
            "0): take 8 quantiles for the positive half and 7 for the negative half, add 0",
            case=case,
        )
    return got


def _first_bad(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])

"""The numba build of the CPU 4-bit kernels (`quant_cpu` runs it where the C++ build,
`quant_native`, cannot be compiled): the same loops, the same bits, on Python threads.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
The steps are explained in `lowrank/numpy/quant.py` (the readable reference); this file does
the same float32 arithmetic, one block at a time, while the block is in the CPU's L1 cache:

- quantize (`_quantize_4bit`): the block's absmax is the largest sign-cleared bit pattern, as
  an integer (the bits of non-negative floats order as their values, NaN's above inf's); the
  values are scaled as `lowrank.numpy.quant` scales them (times 1 / absmax; a short last block
  divided, as bitsandbytes does; a block below 1e-38 lifted by 2 ** 64 first); the nearest of
  16 levels is the number of the 15 float32 midpoints strictly below the scaled value (what
  `torch.bucketize` returns: ties go to the lower level), 15 comparisons that the compiler turns
  into vector instructions; two codes per byte, high nibble first.
- the 8-bit codes of double quantization (`_quantize_codes`, 255 midpoints of the dynamic map,
  on n / 64 scales only) look up the top 16 bits of each scaled float instead: a 16-bit "cell"
  holds at most one midpoint, so `below[cell] + (value > threshold[cell])` is the count.
- dequantize (`_dequantize_float32`, `_dequantize_16bit`): each block first makes its 16
  possible values, level * scale in float32 (for bfloat16 and float16 rounded to nearest even
  as torch's cast rounds, float16's subnormals included: `_float16_bits`, integer operations),
  then each byte of codes picks two: 16 roundings a block instead of 64.

What made the loops fast: each kernel gets its chunk as arrays starting at 0 and loops from 0
(numba then knows no index is negative and drops its negative-index check; with it the element
loops did not vectorize and ran 2-3x slower), counts kept in int32 (uint8 stores stopped
vectorization), and no view made inside a loop's function of an array it writes. The public
functions have `quant_native`'s names and arguments, so `quant_cpu` calls either the same way;
they cut the blocks into chunks whose slicing keeps every kernel's indices starting at 0.

The loops release Python's lock (`nogil`) and `_run_chunks` runs chunks of blocks on up to
`threads` Python threads (not numba's own thread pool: its default layer aborts the process
when two Python threads call a parallel kernel at once). Compiled code is cached on disk
(`cache=True`): the first call in a fresh install compiles for a few seconds, later processes
load it. float16 is not read here: `quant_cpu` widens it to float32 first.
"""

import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

from lowrank.numpy import quant as reference

__all__ = ["dequantize_4bit", "quantize_4bit", "quantize_codes"]

# Elements per task: a task's buffers are one block; this only sets how often threads meet.
_QUANTIZE_CHUNK = 1 << 16
_DEQUANTIZE_CHUNK = 1 << 16

_TINY = np.float32(1e-38)  # stands in for an all-zero block's absmax when dividing (0 * 1e38 = 0)
_LIFT = np.float32(reference._LIFT)  # 2 ** 64: blocks below _TINY are multiplied by it first
_ONE = np.float32(1.0)
_SIGN_CLEARED = np.uint32(0x7FFFFFFF)
_LITTLE_ENDIAN = sys.byteorder == "little"


@njit(nogil=True, cache=True)
def _quantize_4bit(source, shift, blocksize, midpoints, order, absmax, packed):
    """Quantize whole blocks to packed 4-bit codes: source (n_blocks * blocksize,) float32 bits,
    or bfloat16 bits shifted up by `shift` = 16; midpoints (15,) float32; order (16,) uint8:
    sorted position -> code; absmax (n_blocks,) float32 out; packed (n / 2,) uint8 out;
    blocksize even (whole bytes per block). Each call gets its chunk as arrays that start at 0:
    indices that cannot be negative let the loops vectorize."""
    bits = np.empty(blocksize + 1, np.uint32)  # one block, and a slot whose float is its absmax
    values = bits.view(np.float32)
    codes = np.empty(blocksize, np.int32)  # int32: the 15 comparisons below vectorize
    pairs = codes.view(np.int64)  # codes 2p and 2p + 1 as one number
    identity = True
    for k in range(16):
        identity = identity and order[k] == k
    for block in range(absmax.size):
        start = block * blocksize
        top = np.uint32(0)
        for j in range(blocksize):
            word = np.uint32(source[start + j]) << shift
            bits[j] = word
            top = max(top, word & _SIGN_CLEARED)
        bits[blocksize] = top
        block_absmax = values[blocksize]
        absmax[block] = block_absmax
        # below 1e-38 (subnormal values) 1 / absmax has no float32 value: such a block is
        # scaled up by 2 ** 64 first, exactly (x * 1 is x: the usual block is unchanged)
        lift = block_absmax > 0 and block_absmax < _TINY
        before = _LIFT if lift else _ONE
        inverse = _ONE / (block_absmax * _LIFT) if lift else _ONE / max(block_absmax, _TINY)
        for j in range(blocksize):
            scaled = (values[j] * before) * inverse
            count = np.int32(0)
            for k in range(15):  # midpoints strictly below: torch.bucketize's position
                count += np.int32(scaled > midpoints[k])
            codes[j] = count
        if not identity:  # FP4: sorted position -> code
            for j in range(blocksize):
                codes[j] = order[codes[j]]
        half = start // 2
        for p in range(blocksize // 2):
            if _LITTLE_ENDIAN:
                pair = pairs[p]  # code 2p in the low 32 bits
                packed[half + p] = np.uint8(((pair & 15) << 4) | (pair >> 32))
            else:
                packed[half + p] = np.uint8((codes[2 * p] << 4) | codes[2 * p + 1])


@njit(nogil=True, cache=True)
def _quantize_codes(source, shift, blocksize, below, threshold, order, absmax, codes):
    """Quantize to one uint8 code per element by the cell lookup (any table: the dynamic map's
    255 midpoints, blocksize 1, a short last block): source (n,) as in `_quantize_4bit`, the
    last block may be short; below (65536,) uint8 and threshold (65536,) float32:
    `_search_table`; absmax (ceil(n / blocksize),) float32 out; codes (n,) uint8 out."""
    bits = np.empty(blocksize + 1, np.uint32)
    values = bits.view(np.float32)
    scaled = np.empty(blocksize, np.float32)
    scaled_bits = scaled.view(np.uint32)
    n = source.size
    for block in range(absmax.size):
        start = block * blocksize
        size = min(blocksize, n - start)
        top = np.uint32(0)
        for j in range(size):
            word = np.uint32(source[start + j]) << shift
            bits[j] = word
            top = max(top, word & _SIGN_CLEARED)
        bits[size] = top
        block_absmax = values[size]
        absmax[block] = block_absmax
        if size < blocksize:  # bitsandbytes divides a short last block
            divisor = block_absmax if block_absmax > 0 else _TINY
            for j in range(size):
                scaled[j] = values[j] / divisor
        else:
            lift = block_absmax > 0 and block_absmax < _TINY
            before = _LIFT if lift else _ONE
            inverse = _ONE / (block_absmax * _LIFT) if lift else _ONE / max(block_absmax, _TINY)
            for j in range(size):
                scaled[j] = (values[j] * before) * inverse
        for j in range(size):
            cell = scaled_bits[j] >> 16
            position = below[cell] + (1 if scaled[j] > threshold[cell] else 0)
            codes[start + j] = order[position]


@njit(nogil=True, cache=True, inline="always")
def _float16_bits(bits):
    """float32 bits -> float16 bits, rounded to nearest even, subnormals included (what torch's
    cast gives; finite inputs below 65520 in magnitude, which a clamped scale guarantees)."""
    sign = (bits >> 16) & 0x8000
    magnitude = np.int64(bits & _SIGN_CLEARED)
    if magnitude >= 0x38800000:  # 2 ** -14 and up: a normal float16
        odd = (magnitude >> 13) & 1
        rebiased = magnitude - (112 << 23) + 0xFFF + odd  # exponent 127 -> 15, round half even
        return np.uint16(sign | (rebiased >> 13))
    exponent = magnitude >> 23
    if exponent < 102:  # below 2 ** -25: rounds to zero
        return np.uint16(sign)
    mantissa = (magnitude & 0x7FFFFF) | 0x800000  # 24 bits, value = mantissa * 2 ** (e - 150)
    shift = 126 - exponent  # 14..24: units of float16's smallest subnormal, 2 ** -24
    units = mantissa >> shift
    rest = mantissa & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    units += 1 if rest > half or (rest == half and (units & 1) == 1) else 0
    return np.uint16(sign | units)


@njit(nogil=True, cache=True)
def _dequantize_float32(packed, scales, blocksize, levels, out):
    """Decode whole blocks into float32 `out` (scales.size * blocksize,), its first element the
    high nibble of packed[0]; scales float32; levels (16,) float32; blocksize even (a block is
    whole bytes). Each block first makes its 16 possible values level * scale, then each byte
    of codes picks two. Arrays start at 0 and the loops run from 0: numba then knows no index
    is negative, leaves out its negative-index check, and the byte loop vectorizes (2-3x
    faster; a byte loop is ~1.4x quicker than one that finds each element's nibble)."""
    products = np.empty(16, np.float32)
    half = blocksize >> 1  # bytes per block
    for block in range(scales.size):
        scale = scales[block]
        for k in range(16):
            products[k] = levels[k] * scale
        first = block * half
        for j in range(half):
            byte = np.int32(packed[first + j])
            out[2 * (first + j)] = products[byte >> 4]  # the high nibble comes first
            out[2 * (first + j) + 1] = products[byte & 15]


@njit(nogil=True, cache=True)
def _dequantize_16bit(packed, scales, blocksize, levels, bfloat16, out):
    """`_dequantize_float32` into the bits of bfloat16 (bfloat16 True) or float16 (uint16 out):
    each block's 16 products are rounded to nearest even once (torch's rule), 16 roundings per
    block instead of one per element."""
    products = np.empty(16, np.float32)
    words = products.view(np.uint32)
    table = np.empty(16, np.uint16)
    half = blocksize >> 1  # bytes per block (blocksize even)
    for block in range(scales.size):
        scale = scales[block]
        for k in range(16):
            products[k] = levels[k] * scale
        for k in range(16):
            if bfloat16:  # round on the float32 bits: add 0x7FFF plus the lowest kept bit
                word = np.int64(words[k])
                table[k] = (word + 0x7FFF + ((word >> 16) & 1)) >> 16
            else:
                table[k] = _float16_bits(words[k])
        first = block * half
        for j in range(half):
            byte = np.int32(packed[first + j])
            out[2 * (first + j)] = table[byte >> 4]
            out[2 * (first + j) + 1] = table[byte & 15]


def quantize_4bit(
    source: torch.Tensor,
    blocksize: int,
    midpoints: np.ndarray,
    order: np.ndarray,
    absmax: np.ndarray,
    packed: np.ndarray,
    threads: int,
) -> None:
    """`quant_native.quantize_4bit` in numba: `absmax.size` whole blocks of the contiguous CPU
    tensor `source` (float32 or bfloat16) into packed codes and absmax, in chunks on up to
    `threads` threads.

    Examples:
        >>> from lowrank.torch.quant_cpu import _search_table
        >>> search = _search_table("nf4")
        >>> x = torch.tensor([1.0, -1.0, 0.0, 0.5, 2.0, -2.0, 0.0, 1.0])  # two blocks of 4
        >>> absmax, packed = np.empty(2, np.float32), np.empty(4, np.uint8)
        >>> quantize_4bit(x, 4, search.midpoints, search.order, absmax, packed, threads=1)
        >>> absmax.tolist(), [f"{byte:02X}" for byte in packed]  # codes 15 0 7 12 | 15 0 7 12
        ([1.0, 2.0], ['F0', '7C', 'F0', '7C'])
    """
    bits, shift = _bits(source)
    per_task = max(1, _QUANTIZE_CHUNK // blocksize)  # blocks per task
    whole = absmax.size

    def blocks(first: int) -> None:  # blocks [first, first + per_task)
        last = min(first + per_task, whole)
        _quantize_4bit(
            bits[first * blocksize : last * blocksize], shift, blocksize, midpoints, order,
            absmax[first:last], packed[first * blocksize // 2 : last * blocksize // 2],
        )  # fmt: skip

    _run_chunks(blocks, whole, per_task, threads)


def quantize_codes(
    source: torch.Tensor,
    blocksize: int,
    below: np.ndarray,
    threshold: np.ndarray,
    order: np.ndarray,
    absmax: np.ndarray,
    codes: np.ndarray,
    threads: int,
) -> None:
    """`quant_native.quantize_codes` in numba: every element of `source` (float32 or
    bfloat16, [n], the last block may be short) to one uint8 code by the cell lookup.

    Examples:
        >>> from lowrank.torch.quant_cpu import _search_table
        >>> search = _search_table("nf4")
        >>> x = torch.tensor([1.0, -1.0, 0.0, 0.5, 2.0])  # a block of 4 and a short one
        >>> absmax, codes = np.empty(2, np.float32), np.empty(5, np.uint8)
        >>> quantize_codes(x, 4, search.below, search.threshold, search.order, absmax, codes, 1)
        >>> absmax.tolist(), codes.tolist()
        ([1.0, 2.0], [15, 0, 7, 12, 15])
    """
    bits, shift = _bits(source)
    n, per_task = bits.size, max(1, _QUANTIZE_CHUNK // blocksize)

    def blocks(first: int) -> None:  # blocks [first, first + per_task)
        start, stop = first * blocksize, min((first + per_task) * blocksize, n)
        _quantize_codes(
            bits[start:stop], shift, blocksize, below, threshold, order,
            absmax[first : first + per_task], codes[start:stop],
        )  # fmt: skip

    _run_chunks(blocks, -(-n // blocksize), per_task, threads)


def dequantize_4bit(
    packed: np.ndarray,
    scales: np.ndarray,
    blocksize: int,
    levels: np.ndarray,
    out: np.ndarray,
    out_kind: str,
    threads: int,
) -> None:
    """Decode `scales.size` whole blocks (blocksize even) into `out` ([n_blocks * blocksize]
    float32, or uint16 bits of "bfloat16" / "float16"): `level[code] * scale` in float32,
    rounded to nearest even for the 16-bit kinds. `scales` float32, already clamped
    (`quant_cpu._clamped_scales`; `quant_native.dequantize_4bit` clamps them itself).

    Examples:
        >>> from lowrank.numpy.codebooks import code_for
        >>> packed = np.array([0xF0, 0x7C], np.uint8)  # codes 15 0 7 12: NF4's 1, -1, 0, 0.44
        >>> out = np.empty(4, np.float32)
        >>> dequantize_4bit(packed, np.array([2.0], np.float32), 4, code_for("nf4"), out,
        ...                 "float32", threads=1)
        >>> [round(value, 4) for value in out.tolist()]
        [2.0, -2.0, 0.0, 0.8814]
    """
    per_task = max(1, _DEQUANTIZE_CHUNK // blocksize)
    whole = scales.size

    def blocks(first: int) -> None:  # blocks [first, first + per_task)
        last = min(first + per_task, whole)
        arrays = packed[first * blocksize // 2 :], scales[first:last], blocksize, levels
        chunk = out[first * blocksize : last * blocksize]
        if out_kind == "float32":
            _dequantize_float32(*arrays, chunk)
        else:
            _dequantize_16bit(*arrays, out_kind == "bfloat16", chunk)

    _run_chunks(blocks, whole, per_task, threads)


def _bits(x: torch.Tensor) -> tuple[np.ndarray, np.uint32]:
    """The numba kernels' view of a contiguous float32 or bfloat16 x: its float32 bit patterns
    as (uint32 array, shift 0), or bfloat16's as (uint16 array, shift 16), which shifted up are
    the float32 bits (widening bfloat16 is exact)."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16), np.uint32(16)
    return x.numpy().view(np.uint32), np.uint32(0)


def _run_chunks(work: Callable[[int], None], n: int, chunk: int, threads: int) -> None:
    """Call `work(start)` for start = 0, chunk, 2 * chunk, ... below n, on up to
    `threads` threads: the compiled loops let go of Python's global lock, so the
    chunks really run side by side. Each call writes its own slice of the outputs. Each thread
    takes one run of neighbouring chunks (one task per thread: a task per chunk cost more in
    the pool than the chunks gained, a 2048 x 2048 decode on two threads 7.2 ms against 4.6)."""
    starts = range(0, n, chunk)
    workers = min(threads, len(starts))
    if workers <= 1:
        for start in starts:
            work(start)
        return
    per_worker = -(-len(starts) // workers)  # each thread one run of neighbouring chunks

    def run(first: int) -> None:
        for start in starts[first : first + per_worker]:
            work(start)

    with ThreadPoolExecutor(workers) as pool:  # list() waits, and re-raises a chunk's error
        list(pool.map(run, range(0, len(starts), per_worker)))

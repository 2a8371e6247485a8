"""The CPU fast path of `lowrank.torch.quant`: 4-bit blockwise quantize and dequantize as small
compiled loops (numba) on the tensors' own memory, giving exactly the codes and values of the
plain tensor path that CUDA falls back to and of the NumPy reference.

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
  then every element picks one by its nibble: 16 roundings a block instead of 64.

What this changes from the reference: nothing in the values (tests/torch/test_quant_cpu.py
checks codes, scales, packed bytes and decoded bits against the tensor path and the NumPy
reference, at the edges of the float32 range, across chunk seams and threads); only the order
of work. Measured one thread, 1024 x 4096 float32, CPU time: quantize 4.8 ms where the NumPy
chunks this replaced took 15.4 ms and bitsandbytes 114 ms (with double quantization); float32
dequantize 3.0 ms (was 4.4, bitsandbytes 2.4); the whole comparison, on two threads against
every peer and the copy floor, is benchmarks/run.py's (docs/benchmarks.md). What made the loops
fast: each kernel gets its chunk as arrays starting at 0 and loops from 0 (numba then knows no
index is negative and drops its negative-index check; with it the element loops did not
vectorize and ran 2-3x slower), counts kept in int32 (uint8 stores stopped vectorization), and
no view made inside a loop's function of an array it writes.

Two builds of the same loops. Where a C++ compiler is (with OpenMP, and ninja),
`quant_native` compiles them from `quant_native.cpp` once per machine and the launchers here
call those: the same arithmetic, run on PyTorch's own OpenMP threads, which matters because the
decode runs between matmuls (a 2048 x 2048 float32 decode on two threads right after a matmul:
2.1 ms in C++, 6.0 ms in the numba loops on Python threads, which then compete with PyTorch's
still-spinning workers), and reading float16 without widening it first. Elsewhere the numba
loops below run; tests/torch/test_quant_cpu.py runs every test on both.

About 550 lines: three numba kernels and the two launchers that cut their work into chunks; the
launchers' slicing is what keeps every kernel's indices starting at 0, so they stay together.

The numba loops release Python's lock (`nogil`) and `_run_chunks` runs chunks of blocks on up to
`torch.get_num_threads()` threads (not numba's own thread pool: its default layer aborts the
process when two Python threads call a parallel kernel at once). Compiled code is cached on
disk (`cache=True`): the first call in a fresh install compiles for a few seconds, later
processes load it.
"""

import math
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from numba import njit

from lowrank.numpy import quant as reference
from lowrank.numpy import quantized as reference_quantized
from lowrank.numpy.codebooks import code_for, dynamic_map
from lowrank.torch import quant_native
from lowrank.torch.quantized import DOUBLE_QUANT_BLOCKSIZE, FLOAT32_MAX

__all__ = ["dequantize", "quantize_blocks", "scale_limit"]

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


def quantize_blocks(
    x: torch.Tensor, blocksize: int, table: str, pack: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of a CPU tensor x [n] to the nearest level of `table`
    ("nf4", "fp4", "int4" or "dynamic"; ties to the lower), with float32 arithmetic.

    Returns (codes uint8 [n], absmax float32 [n_blocks]); with `pack` (a 16-level table) the
    codes come back packed, uint8 [ceil(n / 2)] (as `quant.pack_4bit`, an odd n padded with the
    code of 0.0). float32 and bfloat16 x are read in place (bfloat16 is the top half of a
    float32: widening it is exact), and float16 where the C++ kernels run (widened exactly
    there); other dtypes are rounded to float32 by torch first. Raises
    ValueError if x holds NaN or inf (or values beyond the float32 range).

    Examples:
        >>> x = torch.tensor([1.0, -1.0, 0.0, 0.5, 2.0])  # [5]: a block of 4, a short one
        >>> quantize_blocks(x, 4, "nf4")
        (tensor([15,  0,  7, 12, 15], dtype=torch.uint8), tensor([1., 2.]))
        >>> quantize_blocks(x, 4, "nf4", pack=True)[0]  # 0xF0, 0x7C, 0xF7 (padded with 7)
        tensor([240, 124, 247], dtype=torch.uint8)

        They are the codes of the plain tensor path that CUDA falls back to.

        >>> from lowrank.torch import quant
        >>> w = torch.randn(512, generator=torch.Generator().manual_seed(0))
        >>> codes, absmax = quantize_blocks(w, 64, "fp4")
        >>> expected_codes, expected_absmax = quant._quantize_blocks(w, 64, "fp4")
        >>> torch.equal(codes, expected_codes), torch.equal(absmax, expected_absmax)
        (True, True)
    """
    native = quant_native.kernels()
    if x.dtype not in ((torch.float32, torch.bfloat16) + ((torch.float16,) if native else ())):
        x = x.float()  # float32 like bitsandbytes (the C++ kernels widen float16 themselves)
    x = x.contiguous().view(-1)  # [n]; only read
    n = x.numel()
    absmax = np.empty(-(-n // blocksize), np.float32)  # [n_blocks]
    search = _search_table(table)
    whole = n // blocksize if pack and blocksize >= 2 else 0  # blocks for the packed kernel
    rest = whole * blocksize  # what is left: everything unpacked, or a short last block
    codes = np.empty(-(-n // 2) if pack else n, np.uint8)
    unpacked = codes if not pack else np.empty(n - rest, np.uint8)
    if native:
        threads = torch.get_num_threads()
        if whole:
            quant_native.quantize_4bit(
                x, blocksize, search.midpoints, search.order, absmax[:whole],
                codes[: rest // 2], threads,
            )  # fmt: skip
        if rest < n:
            quant_native.quantize_codes(
                x[rest:], blocksize, search.below, search.threshold, search.order,
                absmax[whole:], unpacked, threads,
            )  # fmt: skip
    else:
        _quantize_in_numba(x, blocksize, search, whole, absmax, codes, unpacked)
    if pack and rest < n:  # rest is even: these codes fill the last bytes, padded with 0.0's
        if unpacked.size % 2:
            unpacked = np.append(unpacked, np.uint8(search.pad_code))
        codes[rest // 2 :] = (unpacked[0::2] << 4) | unpacked[1::2]
    # a NaN or inf anywhere makes its block's absmax NaN or inf: check the scales only
    if not np.all(np.isfinite(absmax)):
        raise ValueError("w contains NaN or inf (or values beyond the float32 range)")
    return torch.from_numpy(codes), torch.from_numpy(absmax)


def _quantize_in_numba(
    x: torch.Tensor,
    blocksize: int,
    search: "_Search",
    whole: int,
    absmax: np.ndarray,
    codes: np.ndarray,
    unpacked: np.ndarray,
) -> None:
    """`quantize_blocks`' kernels where the C++ ones do not build: the first `whole` blocks of
    x (float32 or bfloat16) packed into codes, the rest one code per element into unpacked;
    chunks of blocks on Python threads (`_run_chunks`)."""
    n, rest = x.numel(), whole * blocksize
    per_task = max(1, _QUANTIZE_CHUNK // blocksize)  # blocks per task
    source, shift = _bits(x)

    def packed_blocks(first: int) -> None:  # blocks [first, first + per_task) of the whole
        last = min(first + per_task, whole)
        _quantize_4bit(
            source[first * blocksize : last * blocksize], shift, blocksize, search.midpoints,
            search.order, absmax[first:last], codes[first * blocksize // 2 : last * blocksize // 2],
        )  # fmt: skip

    _run_chunks(packed_blocks, whole, per_task)

    def coded_blocks(first: int) -> None:  # blocks [first, first + per_task) after the whole
        start, stop = rest + first * blocksize, min(rest + (first + per_task) * blocksize, n)
        _quantize_codes(
            source[start:stop], shift, blocksize, search.below, search.threshold, search.order,
            absmax[whole + first : whole + first + per_task], unpacked[start - rest : stop - rest],
        )  # fmt: skip

    _run_chunks(coded_blocks, absmax.size - whole, per_task)


def _bits(x: torch.Tensor) -> tuple[np.ndarray, np.uint32]:
    """The numba kernels' view of a contiguous float32 or bfloat16 x: its float32 bit patterns
    as (uint32 array, shift 0), or bfloat16's as (uint16 array, shift 16), which shifted up are
    the float32 bits (widening bfloat16 is exact)."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16), np.uint32(16)
    return x.numpy().view(np.uint32), np.uint32(0)


def dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    offset: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    *,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    blocksize: int,
    quant_type: str,
    double_quant: bool,
) -> torch.Tensor:
    """`code[c] * absmax[block]` in float32 from the fields of a CPU `quantized.Quantized4bit`,
    returned as `dtype`, shape `shape` (n elements).

    Each scale is clamped to `scale_limit(dtype)`, as the tensor path does. float32, bfloat16
    and float16 results are written straight into the output, rounded to nearest even from the
    float32 product (as torch's cast). float64, and scales that are not finite (NaN, where
    torch's cast has its own bit patterns), are made in float32 and cast by torch. The fields
    are not checked here (`quant.dequantize_4bit` does).

    Args:
        packed: uint8 [ceil(n / 2)], element 2j in the high nibble.
        absmax: float32 [n_blocks], or with `double_quant` uint8 [n_blocks] codes of the
            dynamic map, decoded here with `offset` and `absmax2` exactly as
            `Quantized4bit.absmax_float32()` does.
        offset: float32 0-d (double quantization) or None.
        absmax2: float32 [ceil(n_blocks / 256)] (double quantization) or None.
        shape: the shape of the result.
        dtype: the dtype of the result.
        blocksize: elements per block.
        quant_type: "nf4", "fp4" or "int4", the table the codes index.
        double_quant: whether `absmax` holds 8-bit codes.

    Examples:
        >>> x = torch.tensor([1.0, -1.0, 0.0, 0.5, 2.0])
        >>> packed, absmax = quantize_blocks(x, 4, "nf4", pack=True)
        >>> dequantize(packed, absmax, None, None, shape=(5,), dtype=torch.float32,
        ...            blocksize=4, quant_type="nf4", double_quant=False)
        tensor([ 1.0000, -1.0000,  0.0000,  0.4407,  2.0000])
    """
    n = math.prod(shape)
    packed, levels, limit = packed.contiguous().numpy(), code_for(quant_type), scale_limit(dtype)
    whole = n // blocksize if blocksize > 1 else 0  # blocksize 1 (half a byte): all in NumPy
    native = whole and quant_native.kernels()
    # float32, bfloat16 and float16 are written here; float64, and scales that may be NaN
    # (torch's cast has its own NaN bit patterns), are made in float32 and cast by torch
    scales = None if native and whole == absmax.numel() else _clamped_scales(
        absmax, offset, absmax2, double_quant, limit
    )  # fmt: skip
    direct = dtype in (torch.bfloat16, torch.float16) and (
        _scales_have_no_nan(absmax, offset, absmax2, double_quant)
        if scales is None
        else not np.isnan(scales).any()
    )
    out = np.empty(n, np.uint16 if direct else np.float32)  # bfloat16 and float16 as bits
    if native:  # the C++ kernels rebuild and clamp each block's scale themselves
        quant_native.dequantize_4bit(
            packed, absmax.contiguous().numpy(),
            absmax2.contiguous().numpy() if double_quant else None,
            float(offset) if double_quant else 0.0, limit, whole, blocksize, levels,
            out[: whole * blocksize], str(dtype).removeprefix("torch.") if direct else "float32",
            torch.get_num_threads(),
        )  # fmt: skip
    else:
        per_task = max(1, _DEQUANTIZE_CHUNK // blocksize)

        def work(first: int) -> None:  # blocks [first, first + per_task)
            last = min(first + per_task, whole)
            arrays = packed[first * blocksize // 2 :], scales[first:last], blocksize, levels
            chunk = out[first * blocksize : last * blocksize]
            if direct:
                _dequantize_16bit(*arrays, dtype == torch.bfloat16, chunk)
            else:
                _dequantize_float32(*arrays, chunk)

        _run_chunks(work, whole, per_task)
    if whole * blocksize < n:  # a short last block, in NumPy (torch rounds it if 16-bit)
        start = whole * blocksize
        nibbles = np.stack([packed[start // 2 :] >> 4, packed[start // 2 :] & 15], 1)
        element_scales = np.repeat(scales[whole:], blocksize)[: n - start]
        tail = levels[nibbles.reshape(-1)[: n - start]] * element_scales  # float32
        if direct:
            tail = torch.from_numpy(tail).to(dtype).view(torch.int16).numpy().view(np.uint16)
        out[start:] = tail
    values = torch.from_numpy(out)
    return (values.view(dtype) if direct else values.to(dtype)).view(shape)


def _clamped_scales(
    absmax: torch.Tensor,
    offset: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    double_quant: bool,
    limit: float,
) -> np.ndarray:
    """`_scales`, clamped to +-limit (float16 and bfloat16: level * scale must fit the dtype)."""
    scales = _scales(absmax, offset, absmax2, double_quant)
    if limit < FLOAT32_MAX:
        scales = np.clip(scales, np.float32(-limit), np.float32(limit))  # a copy, never in place
    return scales


def _scales_have_no_nan(
    absmax: torch.Tensor,
    offset: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    double_quant: bool,
) -> bool:
    """Whether every clamped scale is surely a number, read from the stored fields alone: a
    float32 absmax without NaN; a double-quantized one with finite absmax2 and offset (a level
    of the dynamic map is at most 1, so code * absmax2 + offset is then never NaN). Where this
    says False the decode goes through float32 and torch's cast: the same bits for numbers."""
    if not double_quant:
        return not torch.isnan(absmax).any()
    return bool(torch.isfinite(absmax2).all() and torch.isfinite(offset).all())


def _scales(
    absmax: torch.Tensor,
    offset: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    double_quant: bool,
) -> np.ndarray:
    """Block scales, float32 [n_blocks]; with double quantization
    `dynamic_map()[code] * absmax2[j // 256] + offset` clamped to +-float32 max, as
    `Quantized4bit.absmax_float32()` (in NumPy: quicker than torch here)."""
    if not double_quant:
        return absmax.numpy()
    codes = absmax.numpy()  # uint8 [n_blocks]
    scales = np.repeat(absmax2.numpy(), DOUBLE_QUANT_BLOCKSIZE)[: codes.size]  # [n_blocks]
    with np.errstate(over="ignore"):  # beyond float32: clamped just below
        rebuilt = dynamic_map()[codes] * scales + offset.numpy()
    return np.clip(
        rebuilt, -reference_quantized.FLOAT32_MAX, reference_quantized.FLOAT32_MAX, out=rebuilt
    )


def scale_limit(dtype: torch.dtype) -> float:
    """The largest scale a decode into `dtype` may use: its largest finite value (float16:
    65504, bfloat16: 3.39e38), or float32's if that is smaller (decoding is float32
    arithmetic). A level is at most 1 in magnitude, so level * scale then fits the dtype.

    Examples:
        >>> scale_limit(torch.float16)
        65504.0
        >>> scale_limit(torch.float64) == scale_limit(torch.float32) == FLOAT32_MAX
        True
    """
    return min(torch.finfo(dtype).max, FLOAT32_MAX)


def _run_chunks(work: Callable[[int], None], n: int, chunk: int) -> None:
    """Call `work(start)` for start = 0, chunk, 2 * chunk, ... below n, on up to
    `torch.get_num_threads()` threads: the compiled loops let go of Python's global lock, so the
    chunks really run side by side. Each call writes its own slice of the outputs. Each thread
    takes one run of neighbouring chunks (one task per thread: a task per chunk cost more in
    the pool than the chunks gained, a 2048 x 2048 decode on two threads 7.2 ms against 4.6)."""
    starts = range(0, n, chunk)
    workers = min(torch.get_num_threads(), len(starts))
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


@dataclass(frozen=True)
class _Search:
    midpoints: np.ndarray  # float32 [levels - 1], between the sorted levels
    order: np.ndarray  # uint8 [levels]: sorted position -> code
    pad_code: int  # the code of 0.0
    below: np.ndarray  # uint8 [65536]: midpoints below each 16-bit cell
    threshold: np.ndarray  # float32 [65536]: the cell's midpoint, or +inf


@cache
def _search_table(table: str) -> _Search:
    """Search tables for `table` ("nf4", "fp4", "int4" or "dynamic"), from the same float32
    midpoints as `lowrank.numpy.quant._nearest_code` (levels sorted stably)."""
    code = dynamic_map() if table == "dynamic" else code_for(table)
    order = np.argsort(code, kind="stable").astype(np.uint8)
    levels = code[order]
    midpoints = (levels[:-1] + levels[1:]) / np.float32(2.0)  # float32 [levels - 1]
    # the cells: every float32 whose top 16 bits are h; its smallest and largest member
    top = np.arange(65536, dtype=np.uint32) << 16
    ends = np.stack([top, top | 0xFFFF]).view(np.float32)  # [2, 65536]
    lowest, highest = np.fmin(ends[0], ends[1]), np.fmax(ends[0], ends[1])  # NaN cells: NaN
    below = np.searchsorted(midpoints, lowest, side="left")
    inside = np.searchsorted(midpoints, highest, side="left") - below  # midpoints in [low, high)
    finite = np.isfinite(lowest) & np.isfinite(highest)
    assert inside[finite].max() <= 1, "a cell holds two midpoints"
    threshold = np.where(inside == 1, midpoints[np.minimum(below, midpoints.size - 1)], np.inf)
    return _Search(
        midpoints=midpoints.astype(np.float32),
        order=order,
        pad_code=int(order[np.searchsorted(midpoints, 0.0, side="left")]),
        below=below.astype(np.uint8),
        threshold=threshold.astype(np.float32),
    )

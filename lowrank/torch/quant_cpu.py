"""The CPU fast path of `lowrank.torch.quant`: 4-bit blockwise quantize and dequantize done in
NumPy on the tensors' own memory, giving exactly the codes and values of the plain tensor path
that CUDA runs.

Why it exists: on CPU, PyTorch's per-element gathers and its binary search are slow. Here the
nearest level comes from a lookup on the top 16 bits of each float (`_nearest_code_cpu`) instead
of a bucketize over the midpoints, and decoding looks up the two levels of each byte at once
(`_levels`). The work is cut into chunks and each chunk runs start to end (scale, look up, pack)
while its temporaries are still in the CPU caches, on a few threads (`_run_chunks`). Measured
with benchmarks/bench_quant.py (4096 x 4096, 2 cores) when these kernels went in: quantize
7.1-8.3x faster than bitsandbytes (1.9-2.4x before the chunks), float32 dequantize 1.4-1.8x
(0.95x before); bfloat16 dequantize stays slower (bitsandbytes writes bf16 in one native pass).

tests/torch/test_quant_cpu.py checks that every kernel here is bit-identical to the tensor path
in `lowrank.torch.quant` (codes, scales, packed bytes and dequantized values, across chunk
seams). This file imports only the NumPy reference and the format's constants
(`lowrank.torch.quantized`), never `lowrank.torch.quant`.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
"""

import math
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from lowrank.numpy import quant as reference
from lowrank.numpy import quantized as reference_quantized
from lowrank.numpy.codebooks import code_for, dynamic_map
from lowrank.torch.quantized import DOUBLE_QUANT_BLOCKSIZE, FLOAT32_MAX

__all__ = ["dequantize", "quantize_blocks", "scale_limit"]

_TINY = 1e-38  # stands in for an all-zero block's absmax when dividing (0 * 1e38 = 0)
# Values per task, so that a task's temporaries (about 20 bytes per value when quantizing, 10
# when decoding) stay in the caches while it runs; measured on 4096 x 4096.
_QUANTIZE_CHUNK = 1 << 18
_DEQUANTIZE_CHUNK = 1 << 19


def quantize_blocks(
    x: torch.Tensor, blocksize: int, table: str, pack: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of a CPU tensor x [n] to the nearest level of `table`
    ("nf4", "fp4", "int4" or "dynamic"; ties to the lower), with float32 arithmetic.

    Returns (codes uint8 [n], absmax float32 [n_blocks]); with `pack` the codes come back
    packed, uint8 [ceil(n / 2)] (as `quant.pack_4bit`, an odd n padded with the code of 0.0).
    float32 and bfloat16 x are read in place (bfloat16 is the top half of a float32: widening
    it is exact); other dtypes are rounded to float32 by torch first. Raises ValueError if x
    holds NaN or inf (or values beyond the float32 range).

    Examples:
        >>> x = torch.tensor([1.0, -1.0, 0.0, 0.5, 2.0])  # [5]: a block of 4, a short one
        >>> quantize_blocks(x, 4, "nf4")
        (tensor([15,  0,  7, 12, 15], dtype=torch.uint8), tensor([1., 2.]))
        >>> quantize_blocks(x, 4, "nf4", pack=True)[0]  # 0xF0, 0x7C, 0xF7 (padded with 7)
        tensor([240, 124, 247], dtype=torch.uint8)

        They are the codes of the plain tensor path that CUDA runs.

        >>> from lowrank.torch import quant
        >>> w = torch.randn(512, generator=torch.Generator().manual_seed(0))
        >>> codes, absmax = quantize_blocks(w, 64, "fp4")
        >>> expected_codes, expected_absmax = quant._quantize_blocks(w, 64, "fp4")
        >>> torch.equal(codes, expected_codes), torch.equal(absmax, expected_absmax)
        (True, True)
    """
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()  # float32 like bitsandbytes
    x = x.contiguous()  # [n]; only read
    source = x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.numpy()
    n = source.size
    absmax = np.empty(-(-n // blocksize), np.float32)  # [n_blocks]
    codes = np.empty(-(-n // 2) if pack else n, np.uint8)
    pad_code = _search_table(table).pad_code
    chunk = max(_QUANTIZE_CHUNK, blocksize)  # a multiple of blocksize, and even

    def quantize_chunk(start: int) -> None:
        stop = min(start + chunk, n)
        values = source[start:stop]
        if values.dtype == np.int16:  # bfloat16 bits: shifted up, they are the float32 bits
            values = np.left_shift(values.view(np.uint16), 16, dtype=np.uint32).view(np.float32)
        whole = (stop - start) // blocksize  # whole blocks; the chunk may end with a short one
        full = whole * blocksize
        scales = absmax[start // blocksize : -(-stop // blocksize)]
        # |x| is x's bits without the sign bit; read as integers, such bits order like the
        # values (NaN's above inf's), and NumPy's integer max is twice as fast as its float max
        magnitude = values.view(np.uint32) & np.uint32(0x7FFFFFFF)
        magnitude[:full].reshape(whole, blocksize).max(axis=1, out=scales[:whole].view(np.uint32))
        if full < stop - start:
            scales.view(np.uint32)[whole] = magnitude[full:].max()
        # a NaN or inf anywhere makes its block's absmax NaN or inf: check the few scales only
        if not np.all(np.isfinite(scales)):
            raise ValueError("w contains NaN or inf (or values beyond the float32 range)")
        scaled = magnitude.view(np.float32)  # [stop - start], reuses the buffer
        inverse = np.float32(1.0) / np.maximum(scales[:whole], np.float32(_TINY))
        blocks = values[:full].reshape(whole, blocksize)
        scaled_blocks = scaled[:full].reshape(whole, blocksize)
        np.multiply(blocks, inverse[:, None], out=scaled_blocks)
        # below 1e-38 (subnormal values) 1 / absmax has no float32 value: such a block is
        # scaled up by 2 ** 64 first, exactly, then like any (lowrank.numpy.quant._LIFT)
        if whole and scales[:whole].min() < np.float32(_TINY):  # rare: zero or tiny blocks
            tiny = np.flatnonzero((scales[:whole] > 0) & (scales[:whole] < np.float32(_TINY)))
            lifted_inverse = np.float32(1.0) / (scales[tiny] * reference._LIFT)
            scaled_blocks[tiny] = (blocks[tiny] * reference._LIFT) * lifted_inverse[:, None]
        if full < stop - start:  # bitsandbytes divides a short last block
            last = scales[whole]
            scaled[full:] = values[full:] / (last if last > 0 else np.float32(_TINY))
        chunk_codes = _nearest_code_cpu(scaled, table).numpy()
        if not pack:
            codes[start:stop] = chunk_codes
            return
        if chunk_codes.size % 2:  # only the last chunk can be odd
            chunk_codes = np.append(chunk_codes, np.uint8(pad_code))
        _pack_pairs(chunk_codes, out=codes[start // 2 : -(-stop // 2)])

    _run_chunks(quantize_chunk, n, chunk)
    return torch.from_numpy(codes), torch.from_numpy(absmax)


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

    Each scale is clamped to `scale_limit(dtype)`, as the tensor path does. Chunk by chunk on a
    few threads. float32 and bfloat16 results are written straight into the output; the
    bfloat16 rounding is done on the float32 bits (as torch's cast does). Other dtypes, and
    scales that are not finite (NaN, where torch's cast has its own bit patterns), are made in
    float32 and cast by torch. The fields are not checked here (`quant.dequantize_4bit` does).

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
    packed, scales = packed.contiguous(), _scales(absmax, offset, absmax2, double_quant)
    limit = scale_limit(dtype)
    if limit < FLOAT32_MAX:  # float16 and bfloat16: level * scale must fit the dtype
        scales = np.clip(scales, np.float32(-limit), np.float32(limit))  # a copy, never in place
    as_bfloat16 = dtype == torch.bfloat16 and bool(np.all(np.isfinite(scales)))
    out = np.empty(n, np.uint16 if as_bfloat16 else np.float32)  # bfloat16 as its bits
    chunk = max(_DEQUANTIZE_CHUNK, blocksize)  # a multiple of blocksize, and even

    def dequantize_chunk(start: int) -> None:
        stop = min(start + chunk, n)
        whole = (stop - start) // blocksize  # whole blocks; the chunk may end with a short one
        full = whole * blocksize
        levels = _levels(packed[start // 2 : -(-stop // 2)], quant_type).numpy()[: stop - start]
        block_scales = scales[start // blocksize : -(-stop // blocksize)]
        products = levels if as_bfloat16 else out[start:stop]  # float32 level * absmax
        np.multiply(
            levels[:full].reshape(whole, blocksize),
            block_scales[:whole, None],
            out=products[:full].reshape(whole, blocksize),
        )
        np.multiply(levels[full:], block_scales[whole:], out=products[full:])  # a short block
        if as_bfloat16:
            _round_to_bfloat16(levels, out=out[start:stop])

    _run_chunks(dequantize_chunk, n, chunk)
    values = torch.from_numpy(out)
    return (values.view(torch.bfloat16) if as_bfloat16 else values.to(dtype)).view(shape)


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


def _round_to_bfloat16(values: np.ndarray, out: np.ndarray) -> None:
    """Round finite float32 `values` to bfloat16 bits (uint16 `out`), to nearest, ties to even,
    exactly as torch's cast: add 0x7FFF plus the lowest kept bit, then keep the top 16 bits."""
    bits = values.view(np.uint32)
    rounded = bits >> 16
    rounded &= 1
    rounded += bits
    rounded += 0x7FFF  # a finite float32's bits + 0x8000 stays below 2 ** 32
    rounded >>= 16
    np.copyto(out, rounded, casting="unsafe")  # each value now fits in 16 bits


def _levels(packed: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The level of every nibble in CPU `packed` [m], in order (high nibble first), float32
    [2 * m]: NumPy's take of whole [2] rows, far faster than torch's gather on CPU."""
    return torch.from_numpy(np.take(_pair_table(quant_type), packed.numpy(), axis=0).reshape(-1))


def _pack_pairs(codes: np.ndarray, out: np.ndarray) -> None:
    """`quant.pack_4bit` for an even number of NumPy codes, written into `out` (uint8)."""
    if sys.byteorder == "little":
        # read each pair as one little-endian uint16 (first code in the low byte): 3x faster;
        # the uint16 result's low byte is (first << 4) | second, which the unsafe cast keeps
        pairs = codes.view(np.uint16)
        np.bitwise_or(pairs << 4, pairs >> 8, out=out, casting="unsafe")
    else:
        np.left_shift(codes[0::2], 4, out=out)
        out |= codes[1::2]


def _run_chunks(work: Callable[[int], None], n: int, chunk: int) -> None:
    """Call `work(start)` for start = 0, chunk, 2 * chunk, ... below n, on up to
    `torch.get_num_threads()` threads: NumPy lets go of Python's global lock inside its loops,
    so the chunks really run side by side. Each call writes its own slice of the outputs."""
    starts = range(0, n, chunk)
    workers = min(torch.get_num_threads(), len(starts))
    if workers <= 1:
        for start in starts:
            work(start)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, starts))  # list() waits, and re-raises a chunk's error here


def _nearest_code_cpu(scaled: np.ndarray, table: str) -> torch.Tensor:
    """The codes of `quant._nearest_code` (a bucketize over the midpoints) for a float32 NumPy
    array [m], uint8 [m], from a lookup on the top 16 bits of each float32 (sign, exponent,
    7 mantissa bits).

    All floats sharing those bits form a short interval, a "cell", holding at most one midpoint
    (checked when the tables are built). So the sorted position is `below[cell]` (midpoints
    under the cell) plus 1 if the value lies above the cell's midpoint `threshold[cell]`
    (+inf where the cell holds none): two lookups and a comparison instead of a binary search.
    """
    search = _search_table(table)
    # take() works on intp indices: convert the cells once, not in each of the two lookups
    cell = (scaled.view(np.uint32) >> 16).astype(np.intp)
    position = np.take(search.below, cell)
    position += scaled > np.take(search.threshold, cell)
    if search.order is not None:  # FP4: sorted position -> code
        position = np.take(search.order, position)
    return torch.from_numpy(position)


@dataclass(frozen=True)
class _Search:
    order: np.ndarray | None  # uint8 [levels]: sorted position -> code (None: identity)
    pad_code: int  # the code of 0.0
    below: np.ndarray  # uint8 [65536]: midpoints below each 16-bit cell
    threshold: np.ndarray  # float32 [65536]: the cell's midpoint, or +inf


@cache
def _search_table(table: str) -> _Search:
    """Cell tables for `table` ("nf4", "fp4", "int4" or "dynamic"), from the same float32
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
    is_sorted = np.array_equal(order, np.arange(order.size))
    return _Search(
        order=None if is_sorted else order,
        pad_code=int(order[np.searchsorted(midpoints, 0.0, side="left")]),
        below=below.astype(np.uint8),
        threshold=threshold.astype(np.float32),
    )


@cache
def _pair_table(quant_type: str) -> np.ndarray:
    """[256, 2] float32: the levels of byte b's high and low nibble."""
    code = code_for(quant_type)  # [16]
    byte = np.arange(256)
    return np.stack([code[byte >> 4], code[byte & 0x0F]], axis=1)

"""The CPU fast path of `lowrank.torch.quant`: 4-bit blockwise quantize and dequantize as
compiled loops on the tensors' own memory, giving exactly the codes and values of the plain
tensor path that CUDA falls back to and of the NumPy reference.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
The steps are explained in `lowrank/numpy/quant.py` (the readable reference). This file holds
what both builds of the loops share: the search tables (the 15 float32 midpoints of a 16-level
table, and the 16-bit cells of the dynamic map), the scales of double quantization, the short
last block (in NumPy), and the choice of build:

- `quant_native` (C++, `quant_native.cpp`), wherever a C++ compiler with OpenMP and ninja are:
  compiled once per machine, run on PyTorch's own OpenMP threads. This matters because the
  decode runs between matmuls: a 2048 x 2048 float32 decode on two threads right after a
  matmul took 2.1 ms in C++ and 6.0 ms in numba, whose Python threads then compete with
  PyTorch's still-spinning workers. It also reads float16 without widening it first.
- `quant_numba` elsewhere: the same loops, on Python threads.

Both take the same arguments and give the same bits: tests/torch/test_quant_cpu.py runs every
test on both, against the tensor path and the NumPy reference, at the edges of the float32
range, across chunk seams and threads. Only the order of work changes. The whole comparison,
on two threads against every peer and the copy floor, is in benchmarks/run.py
(docs/benchmarks.md).
"""

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from lowrank.numpy import quantized as reference_quantized
from lowrank.numpy.codebooks import code_for, dynamic_map
from lowrank.torch import quant_native, quant_numba
from lowrank.torch.quantized import DOUBLE_QUANT_BLOCKSIZE, FLOAT32_MAX

__all__ = ["dequantize", "quantize_blocks", "scale_limit"]


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
    kernels, threads = quant_native if native else quant_numba, torch.get_num_threads()
    if whole:  # the same call for both builds
        kernels.quantize_4bit(
            x, blocksize, search.midpoints, search.order, absmax[:whole], codes[: rest // 2],
            threads,
        )  # fmt: skip
    if rest < n:
        kernels.quantize_codes(
            x[rest:], blocksize, search.below, search.threshold, search.order, absmax[whole:],
            unpacked, threads,
        )  # fmt: skip
    if pack and rest < n:  # rest is even: these codes fill the last bytes, padded with 0.0's
        if unpacked.size % 2:
            unpacked = np.append(unpacked, np.uint8(search.pad_code))
        codes[rest // 2 :] = (unpacked[0::2] << 4) | unpacked[1::2]
    # a NaN or inf anywhere makes its block's absmax NaN or inf: check the scales only
    if not np.all(np.isfinite(absmax)):
        raise ValueError("w contains NaN or inf (or values beyond the float32 range)")
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
    direct = dtype in (torch.bfloat16, torch.float16) and _scales_have_no_nan(
        absmax, offset, absmax2, double_quant
    )
    out = np.empty(n, np.uint16 if direct else np.float32)  # bfloat16 and float16 as bits
    out_kind = str(dtype).removeprefix("torch.") if direct else "float32"
    threads = torch.get_num_threads()
    if native:  # the C++ kernels rebuild and clamp each block's scale themselves
        quant_native.dequantize_4bit(
            packed, absmax.contiguous().numpy(),
            absmax2.contiguous().numpy() if double_quant else None,
            float(offset) if double_quant else 0.0, limit, whole, blocksize, levels,
            out[: whole * blocksize], out_kind, threads,
        )  # fmt: skip
    elif whole:  # numba: the clamped scales made above
        quant_numba.dequantize_4bit(
            packed, scales[:whole], blocksize, levels, out[: whole * blocksize], out_kind, threads
        )  # fmt: skip
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

"""The CUDA implementation of `lowrank.torch.quant`: 4-bit blockwise quantize and dequantize as
two Triton kernels, giving exactly the codes, scales and values of the plain tensor path.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
The steps are explained in `lowrank/numpy/quant.py`; the tensor path (`quant._quantize_blocks`,
`quant._dequantize`) stays the fallback where Triton is missing, and the readable mirror.

Why it exists: the tensor path runs each step (absmax, scale, bucketize, pack; gather, multiply,
cast) as its own CUDA kernel, with the temporaries in device memory between them. Here one
program owns a tile of whole blocks and does every step in registers: quantize reads each
value once and writes half a byte; dequantize reads half a byte and writes one value.

What the kernels do differently from the tensor path, and why the bits still agree:
- absmax is the largest sign-cleared bit pattern of the block, as an integer (the bits of
  non-negative floats order as their values, NaN's above inf's, so a NaN is never dropped);
- the nearest level counts the float32 midpoints strictly below the scaled value, which is
  what `torch.bucketize` returns (ties go to the lower level);
- divisions are `tl.math.div_rn` (IEEE, as torch's), not Triton's default approximate `/`;
  the kernels are launched with `enable_fp_fusion=False`, so the rebuilt double-quantized
  scale `dynamic_map[code] * absmax2 + offset` is rounded twice, as torch rounds it, and never
  fused into one FMA; 1e-38 enters as its float32 bits (Triton would make it a float64);
- bfloat16 values are read as their 16 bits shifted up (exact) and written by rounding the
  float32 bits to nearest even in integers (torch's rule; the interpreter's cast truncates);
- a NaN value (only a hand-made `Quantized4bit` with non-finite scales has one) is a NaN, not
  necessarily torch's NaN bits.
Double quantization runs through the same quantize kernel (the dynamic map's 255 midpoints);
its offset, the mean of the scales, stays a torch reduction in `quant.quantize_4bit`.

Devices: on CUDA tensors the kernels are compiled; on CPU tensors the same kernel source runs in
Triton's interpreter (NumPy, slow, for tests: tests/torch/test_quant_triton.py checks the bits
against the tensor path and the NumPy reference without a GPU). Triton decides compiled or
interpreted when a kernel is decorated (`triton.jit` reads TRITON_INTERPRET), so the kernels
here are plain functions decorated on first use, once per mode (`_kernel`), and they call only
Triton's builtins (`tl.reduce` with triton's max, not `tl.max` or `tl.zeros`: those are `jit`
functions of triton's own, made compiled or interpreted when triton was imported). So whatever
imported triton first, a CPU tensor always gets the interpreter. `quant.quantize_4bit` and
`quant.dequantize_4bit` send a tensor here when `handles(device, blocksize)`: a CUDA device
(`DEVICES`, the one switch), triton importable, not while torch.compile traces. triton itself
is imported on first use too (it costs ~0.5 s), never on CPU-only paths. Written and tested
against triton 3.9.

    packed, absmax = quantize_blocks(x, 64, "nf4", pack=True)   # x [n] on CUDA
    w_hat = dequantize(packed, absmax, None, None, shape=(n,), dtype=torch.bfloat16,
                       blocksize=64, quant_type="nf4", double_quant=False)
"""

from __future__ import annotations  # `tl.constexpr` annotations stay strings: tl comes later

import importlib.util
import math
import os
from functools import cache

import numpy as np
import torch

from lowrank.torch.codebooks import _search_table, code_for, dynamic_map
from lowrank.torch.quant_cpu import scale_limit
from lowrank.torch.quantized import DOUBLE_QUANT_BLOCKSIZE, FLOAT32_MAX

__all__ = ["DEVICES", "MAX_BLOCKSIZE", "available", "dequantize", "handles", "quantize_blocks"]

DEVICES = ("cuda",)  # device types quant.py sends to these kernels (tests may add "cpu")
MAX_BLOCKSIZE = 1 << 14  # a block is one program's row: larger ones take the tensor path
_QUANTIZE_TILE = 1024  # values per program (whole blocks; a block larger than this is a tile)
_DEQUANTIZE_TILE = 2048
_TINY_BITS = int(np.float32(1e-38).view(np.uint32))  # quant._TINY as float32 bits, 0x006CE3EE

tl = None  # triton.language, imported on first use (`_triton`), read by the kernels' bodies


@cache
def available() -> bool:
    """Whether triton is installed (checked once, without importing it).

    Examples:
        >>> available() in (True, False)
        True
    """
    return importlib.util.find_spec("triton") is not None


def handles(device: torch.device, blocksize: int) -> bool:
    """Whether `quant.quantize_4bit` / `dequantize_4bit` run these kernels for tensors on
    `device` quantized in blocks of `blocksize`: a device type in `DEVICES` (CUDA), triton
    installed, and blocksize <= MAX_BLOCKSIZE. The caller checks torch.compile.

    Examples:
        >>> handles(torch.device("cpu"), 64)  # CPU keeps quant_cpu
        False
    """
    return device.type in DEVICES and blocksize <= MAX_BLOCKSIZE and available()


def quantize_blocks(
    x: torch.Tensor, blocksize: int, table: str, pack: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of x [n] (float32, bfloat16, float16 or float64; CUDA, or
    CPU through the interpreter) in float32 to the nearest level of `table` ("nf4", "fp4",
    "int4" or "dynamic"; ties to the lower): `quant._quantize_blocks`, bit for bit.

    Returns (codes uint8 [n], absmax float32 [n_blocks]) on x's device; with `pack` the codes
    come back packed, uint8 [ceil(n / 2)], high nibble first, an odd n padded with the code of
    0.0. A NaN or inf in x gives a NaN or inf absmax (the caller raises); no host sync.

    Examples:
        >>> x = torch.tensor([1.0, -1.0, 0.0, 0.5, 2.0])  # a block of 4, a short one
        >>> quantize_blocks(x, 4, "nf4")  # doctest: +SKIP
        (tensor([15,  0,  7, 12, 15], dtype=torch.uint8), tensor([1., 2.]))
    """
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        x = x.float()  # float64: rounded by torch, as the tensor path does
    x = x.contiguous().view(-1)  # [n]
    n = x.numel()
    n_blocks = -(-n // blocksize)
    search = _search_table(table, x.device)  # midpoints float32 [levels - 1], order, pad code
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    codes = torch.empty(-(-n // 2) if pack else n, dtype=torch.uint8, device=x.device)
    blocks = max(1, _QUANTIZE_TILE // blocksize)  # blocks per program, a power of two
    kernel = _kernel("quantize", _interpreting(x.device))
    kernel[(-(-n_blocks // blocks),)](
        x.view(torch.int16) if x.dtype == torch.bfloat16 else x,
        absmax,
        codes,
        search.midpoints,
        search.midpoints if search.order is None else search.order,  # unused when sorted
        n,
        -(-n // 2),
        search.pad_code,
        BLOCKSIZE=blocksize,
        BLOCKS=blocks,
        N_MIDPOINTS=search.midpoints.numel(),
        SORTED=search.order is None,
        BFLOAT16=x.dtype == torch.bfloat16,
        PACK=pack,
        TINY_BITS=_TINY_BITS,
        num_warps=_num_warps(blocks * blocksize),
        enable_fp_fusion=False,
    )
    return codes, absmax


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
    """`code[c] * absmax[block]` in float32 from the fields of a `quantized.Quantized4bit` on
    CUDA (or CPU, interpreted), returned as `dtype` (float32, bfloat16, float16 or float64),
    shape `shape` (n elements): `quant._dequantize`, bit for bit, with no host sync.

    Each scale is rebuilt as `Quantized4bit.absmax_float32()` does (with double quantization
    `dynamic_map()[code] * absmax2[j // 256] + offset`, clamped to +-float32 max) and clamped
    to `quant_cpu.scale_limit(dtype)`. The fields are not checked here (`quant.dequantize_4bit`
    does); the arguments are those of `quant_cpu.dequantize`.

    Examples:
        >>> packed = torch.tensor([0xF0, 0x7C, 0xF7], dtype=torch.uint8)  # NF4 15 0 7 12 15
        >>> dequantize(packed, torch.tensor([1.0, 2.0]), None, None, shape=(5,),
        ...            dtype=torch.float32, blocksize=4, quant_type="nf4",
        ...            double_quant=False)  # doctest: +SKIP
        tensor([ 1.0000, -1.0000,  0.0000,  0.4407,  2.0000])
    """
    device = packed.device
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    out = torch.empty(n, dtype=dtype, device=device)
    limit = scale_limit(dtype)
    blocks = max(1, _DEQUANTIZE_TILE // blocksize)
    absmax = absmax.contiguous()
    kernel = _kernel("dequantize", _interpreting(device))
    kernel[(-(-n_blocks // blocks),)](
        packed.contiguous(),
        absmax,
        offset if double_quant else absmax,  # unused without double quantization
        absmax2.contiguous() if double_quant else absmax,
        _tables(quant_type, device)[0],
        _tables(quant_type, device)[1],
        out.view(torch.int16) if dtype == torch.bfloat16 else out,
        n,
        packed.numel(),
        BLOCKSIZE=blocksize,
        BLOCKS=blocks,
        DOUBLE_QUANT=double_quant,
        SCALE_BLOCKSIZE=DOUBLE_QUANT_BLOCKSIZE,
        FLOAT32_LIMIT=FLOAT32_MAX,
        LIMIT=limit,
        CLAMP=limit < FLOAT32_MAX,  # float16 and bfloat16: level * scale must fit the dtype
        BFLOAT16=dtype == torch.bfloat16,
        num_warps=_num_warps(blocks * blocksize),
        enable_fp_fusion=False,
    )
    return out.view(shape)


# ---- the kernels (plain functions: `_kernel` decorates them) -------------------------------


def _quantize_kernel(
    x_ptr,  # [n] float32 or float16 values, or bfloat16 bits as int16
    absmax_ptr,  # [n_blocks] float32, written
    codes_ptr,  # [n] uint8 codes, or with PACK [ceil(n / 2)] bytes, written
    midpoints_ptr,  # [N_MIDPOINTS] float32, between the sorted levels
    order_ptr,  # [N_MIDPOINTS + 1] uint8: sorted position -> code (read unless SORTED)
    n,
    n_bytes,  # ceil(n / 2), an argument so that Triton sees when 16 divides it (vector stores)
    pad_code,  # the code of 0.0, in the last low nibble of an odd n
    BLOCKSIZE: tl.constexpr,
    BLOCKS: tl.constexpr,  # blocks per program
    N_MIDPOINTS: tl.constexpr,
    SORTED: tl.constexpr,
    BFLOAT16: tl.constexpr,
    PACK: tl.constexpr,
    TINY_BITS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS] block ids
    offsets = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # [BLOCKS, BLOCKSIZE]
    inside = offsets < n
    if BFLOAT16:  # a bfloat16 is the top half of a float32: widening its bits is exact
        bits = tl.load(x_ptr + offsets, mask=inside, other=0).to(tl.uint16, bitcast=True)
        x = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)  # zeros: no effect
    # absmax: the largest |x| of each block, from the sign-cleared bits read as integers
    # (tl.reduce, not tl.max: see `_kernel`)
    magnitude = x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    absmax = tl.reduce(magnitude, 1, tl.standard._elementwise_max)
    absmax = absmax.to(tl.float32, bitcast=True)  # [BLOCKS]
    n_blocks = (n + BLOCKSIZE - 1) // BLOCKSIZE
    tl.store(absmax_ptr + rows, absmax, mask=rows < n_blocks)
    # scale: x * (1 / absmax); a block below 1e-38 is first lifted by 2 ** 64 (exact), as
    # quant._quantize_blocks does; an all-zero block divides by 1e-38 (0 * 1e38 = 0)
    tiny = tl.full([BLOCKS], TINY_BITS, tl.uint32).to(tl.float32, bitcast=True)
    lift = tl.where((absmax > 0) & (absmax < tiny), 2.0**64, 1.0)
    inverse = tl.math.div_rn(tl.full([BLOCKS], 1.0, tl.float32), tl.maximum(absmax * lift, tiny))
    scaled = (x * lift[:, None]) * inverse[:, None]
    last = tl.program_id(0) == tl.num_programs(0) - 1
    if last & (n % BLOCKSIZE != 0):  # bitsandbytes divides a short last block
        divisor = tl.where(absmax > 0, absmax, tiny)
        short = tl.math.div_rn(x, tl.broadcast_to(divisor[:, None], (BLOCKS, BLOCKSIZE)))
        scaled = tl.where((rows == n_blocks - 1)[:, None], short, scaled)
    # nearest level: the midpoints strictly below (torch.bucketize), ties to the lower level
    position = tl.full([BLOCKS, BLOCKSIZE], 0, tl.int32)
    for i in range(N_MIDPOINTS):
        position += (scaled > tl.load(midpoints_ptr + i)).to(tl.int32)
    if SORTED:
        codes = position.to(tl.uint8)
    else:
        codes = tl.load(order_ptr + position)
    if PACK:  # two codes a byte, the first in the high nibble; an odd n pads with pad_code
        codes = tl.where(inside, codes, pad_code).to(tl.uint8)
        high, low = tl.split(tl.reshape(codes, (BLOCKS * BLOCKSIZE // 2, 2)))
        first_byte = tl.program_id(0).to(tl.int64) * (BLOCKS * BLOCKSIZE // 2)
        byte = first_byte + tl.arange(0, BLOCKS * BLOCKSIZE // 2)
        packed = ((high << 4) | low).to(tl.uint8)
        tl.store(codes_ptr + byte, packed, mask=byte < n_bytes)
    else:
        tl.store(codes_ptr + offsets, codes.to(tl.uint8), mask=inside)


def _dequantize_kernel(
    packed_ptr,  # [ceil(n / 2)] uint8
    absmax_ptr,  # [n_blocks] float32 scales, or uint8 codes with DOUBLE_QUANT
    offset_ptr,  # 0-d float32 (DOUBLE_QUANT)
    absmax2_ptr,  # [ceil(n_blocks / SCALE_BLOCKSIZE)] float32 (DOUBLE_QUANT)
    levels_ptr,  # [16] float32, the 4-bit table
    dynamic_ptr,  # [256] float32, the dynamic map
    out_ptr,  # [n] float32, float16 or float64, or bfloat16 bits as int16, written
    n,
    n_bytes,  # ceil(n / 2), an argument so that Triton sees when 16 divides it (vector loads)
    BLOCKSIZE: tl.constexpr,
    BLOCKS: tl.constexpr,  # blocks per program
    DOUBLE_QUANT: tl.constexpr,
    SCALE_BLOCKSIZE: tl.constexpr,
    FLOAT32_LIMIT: tl.constexpr,
    LIMIT: tl.constexpr,
    CLAMP: tl.constexpr,
    BFLOAT16: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS] block ids
    offsets = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # [BLOCKS, BLOCKSIZE]
    inside = offsets < n
    has_block = rows < (n + BLOCKSIZE - 1) // BLOCKSIZE
    # each block's scale, as Quantized4bit.absmax_float32() and quant._dequantize build it
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + rows, mask=has_block, other=0)
        absmax2 = tl.load(absmax2_ptr + rows // SCALE_BLOCKSIZE, mask=has_block, other=0.0)
        scale = tl.load(dynamic_ptr + code) * absmax2  # rounded, then the offset added
        scale = scale + tl.load(offset_ptr)
        limit = FLOAT32_LIMIT
        scale = tl.clamp(scale, -limit, limit, propagate_nan=tl.PropagateNan.ALL)
    else:
        scale = tl.load(absmax_ptr + rows, mask=has_block, other=0.0)
    if CLAMP:
        scale = tl.clamp(scale, -LIMIT, LIMIT, propagate_nan=tl.PropagateNan.ALL)
    if BLOCKSIZE == 1:  # a block is one value: a byte holds two blocks, the first high
        byte = tl.load(packed_ptr + offsets // 2, mask=inside, other=0)
        nibble = tl.where((offsets & 1) == 0, byte >> 4, byte & 0x0F)
    else:  # each byte read once, its two nibbles put side by side (element 2j: high nibble)
        pairs = rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
        byte = tl.load(packed_ptr + pairs, mask=pairs < n_bytes, other=0)
        nibble = tl.reshape(tl.join(byte >> 4, byte & 0x0F), (BLOCKS, BLOCKSIZE))
    values = tl.load(levels_ptr + nibble) * scale[:, None]  # float32 level * absmax
    if BFLOAT16:  # to nearest, ties to even, on the bits (torch's rule); NaN stays a NaN
        bits = values.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(values != values, 0x7FC0, rounded).to(tl.uint16)
        tl.store(out_ptr + offsets, rounded.to(tl.int16, bitcast=True), mask=inside)
    else:
        tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=inside)


_KERNELS = {"quantize": _quantize_kernel, "dequantize": _dequantize_kernel}


@cache
def _kernel(name: str, interpret: bool):
    """`triton.jit` of kernel `name`, compiled (interpret=False) or for Triton's interpreter.

    triton.jit picks one or the other when it decorates, from TRITON_INTERPRET; setting it for
    this one decoration (and putting it back) lets both kinds live in one process."""
    triton = _triton()
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        return triton.jit(_KERNELS[name])
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _triton():
    """Import triton (and set the module's `tl`, which the kernels' bodies name)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton


def _interpreting(device: torch.device) -> bool:
    """CPU tensors can only run in the interpreter; CUDA ones do too if TRITON_INTERPRET=1."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


@cache
def _tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 16 levels of `quant_type` and the dynamic map, float32 [16] and [256] on `device`,
    made once per device (so that a decode copies nothing from the host)."""
    return code_for(quant_type, device), dynamic_map(device)


def _num_warps(values: int) -> int:
    """Warps per program: 4 for tiles up to 2048 values, more for larger blocks."""
    return max(4, min(16, values // 512))

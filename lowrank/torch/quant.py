"""4-bit blockwise quantization on tensors (CPU and CUDA): the mirror of `lowrank.numpy.quant`.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
The steps (blockwise absmax, nearest of 16 levels, two codes per byte, double quantization of
the scales) and the code tables are explained in `lowrank/numpy/quant.py`; this file does the
same float32 arithmetic with whole-tensor operations, so both give identical codes and identical
float32 dequantized values, and both are bit-identical to `bitsandbytes.functional.quantize_4bit`.
Reading and writing bitsandbytes' serialized 4-bit format is in `bnb_format.py`.

On CUDA the work is queued and the Python side reads back one value only: "does w hold NaN or
inf?", which quantize's ValueError needs (a NaN or inf makes its block's absmax NaN or inf, so
only the scales are checked). That is quantize's one host sync; dequantize never waits.

On CPU, PyTorch's per-element gathers and its binary search are slow, so `quantize_4bit` and
`dequantize_4bit` each decide once, CPU or not, and on CPU hand the work to `quant_cpu`: NumPy
kernels on the same memory that give exactly the codes and values of the plain tensor path
below (blockwise absmax, a bucketize over the midpoints, a pair-table decode), which
tests/torch/test_quant_cpu.py checks. Everything else here is plain tensor code on any device.
"""

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from lowrank._validate import check_blocksize, check_quant_type
from lowrank.numpy import quant as reference
from lowrank.numpy.quant import DOUBLE_QUANT_BLOCKSIZE
from lowrank.torch import quant_cpu

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TINY = 1e-38  # stands in for an all-zero block's absmax when dividing (0 * 1e38 = 0)


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 levels, float32, ascending, index = code (bitsandbytes' table)."""
    return torch.from_numpy(reference.nf4_code()).to(device)


def fp4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' FP4 table, float32, index = bit pattern (bit 3 = sign)."""
    return torch.from_numpy(reference.fp4_code()).to(device)


def int4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """Symmetric absmax int4: code c holds (c - 8) / 7, float32."""
    return torch.from_numpy(reference.int4_code()).to(device)


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The signed 8-bit dynamic map (256 float32 levels) used for double quantization;
    bit-identical to `bitsandbytes.functional.create_dynamic_map(signed=True)`."""
    return torch.from_numpy(reference.dynamic_map()).to(device)


def code_for(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-level table of `quant_type` ("nf4", "fp4" or "int4"), index = 4-bit code."""
    return torch.from_numpy(reference.code_for(quant_type)).to(device)


@dataclass(frozen=True, eq=False)
class Quantized4bit:
    """A 4-bit blockwise-quantized tensor (see `lowrank.numpy.quant.Quantized4bit`).

    packed:  uint8 [ceil(n / 2)], element 2j in the high nibble.
    absmax:  float32 [n_blocks], or uint8 [n_blocks] codes of (absmax - offset) with double quant.
    offset:  float32 0-d tensor (double quantization) or None.
    absmax2: float32 [ceil(n_blocks / 256)] (double quantization) or None.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    offset: torch.Tensor | None
    absmax2: torch.Tensor | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    double_quant: bool

    @property
    def nbytes(self) -> int:
        """Bytes that must be stored: codes, scales, and with double quantization their
        scales and the float32 offset (code tables are constants)."""
        total = _nbytes(self.packed) + _nbytes(self.absmax)
        if self.double_quant:
            total += _nbytes(self.absmax2) + 4
        return total

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def absmax_float32(self) -> torch.Tensor:
        """Block scales, float32 [n_blocks]; with double quantization
        `dynamic_map()[code] * absmax2[j // 256] + offset`."""
        if not self.double_quant:
            return self.absmax
        table = _dynamic_map(self.device)  # [256]
        scales = _block_scales(self.absmax2, DOUBLE_QUANT_BLOCKSIZE, self.absmax.numel())
        return table[self.absmax.long()] * scales + self.offset

    def to(self, device: torch.device | str) -> "Quantized4bit":
        """The same quantized tensor on `device`."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Quantized4bit(
            packed=move(self.packed),
            absmax=move(self.absmax),
            offset=move(self.offset),
            absmax2=move(self.absmax2),
            shape=self.shape,
            dtype=self.dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            double_quant=self.double_quant,
        )


def quantize_4bit(
    w: torch.Tensor, *, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True
) -> Quantized4bit:
    """Quantize `w` (float32, bfloat16, float16 or float64; any shape) to 4 bits, blockwise.

    Flattened row-major, blocks of `blocksize`, each scaled by its absmax in float32 and mapped
    to the nearest level (ties to the lower); see `lowrank.numpy.quant` for the whole story.
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w must be float32, bfloat16, float16 or float64, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    x = w.detach().reshape(-1)  # [n]
    # quantize's one CPU-or-not decision: the same codes either way, NumPy kernels on CPU
    quantize_blocks = quant_cpu.quantize_blocks if x.device.type == "cpu" else _quantize_blocks
    packed, absmax = quantize_blocks(x, blocksize, quant_type, pack=True)  # [ceil(n/2)], [n_blocks]
    # NaN or inf anywhere makes its block's absmax NaN or inf, so checking the scales is enough
    # (quant_cpu has already checked each chunk's). On CUDA this is quantize's one host sync:
    # the contract's ValueError needs the answer on the host.
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("w contains NaN or inf (or values beyond the float32 range)")
    offset, absmax2 = None, None
    if double_quant:
        offset = absmax.mean(dtype=torch.float64).float()  # float64 sum, rounded once (as NumPy)
        absmax, absmax2 = quantize_blocks(absmax - offset, DOUBLE_QUANT_BLOCKSIZE, "dynamic")
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


def dequantize_4bit(q: Quantized4bit) -> torch.Tensor:
    """Rebuild the tensor: `code[c] * absmax[block]` in float32, returned as `q.dtype`."""
    if q.device.type == "cpu":  # dequantize's one CPU-or-not decision: the same values
        return quant_cpu.dequantize(
            q.packed,
            q.absmax,
            q.offset,
            q.absmax2,
            shape=q.shape,
            dtype=q.dtype,
            blocksize=q.blocksize,
            quant_type=q.quant_type,
            double_quant=q.double_quant,
        )
    return _dequantize(q)


def pack_4bit(codes: torch.Tensor, pad_code: int = 0) -> torch.Tensor:
    """Pack uint8 codes (0..15) [n] into uint8 [ceil(n / 2)], high nibble first; an odd n is
    padded with `pad_code`."""
    if codes.dim() != 1 or codes.dtype != torch.uint8:
        raise ValueError("codes must be a 1-D uint8 tensor of values 0..15")
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad_code)])
    pairs = codes.view(-1, 2)  # [ceil(n / 2), 2]
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` codes (uint8) held in `packed` (inverse of `pack_4bit`)."""
    if packed.dim() != 1 or packed.dtype != torch.uint8 or not 0 <= n <= 2 * packed.numel():
        raise ValueError(f"packed must be a 1-D uint8 tensor holding at least {n} codes")
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]


# ---- the plain tensor path (what CUDA runs; quant_cpu gives the same on CPU) -----------------


def _quantize_blocks(
    x: torch.Tensor, blocksize: int, table: str, pack: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of x [n] (any float dtype, any device) in float32 to the
    nearest level of `table` ("nf4", "fp4", "int4" or "dynamic"; ties to the lower).

    Returns (codes uint8 [n], absmax float32 [n_blocks]); with `pack` the codes come back
    packed, uint8 [ceil(n / 2)] (`pack_4bit`, an odd n padded with the code of 0.0).
    """
    x = x.float()  # float32 like bitsandbytes
    n = x.numel()
    n_blocks = -(-n // blocksize)
    if n != n_blocks * blocksize:
        x = F.pad(x, (0, n_blocks * blocksize - n))  # zeros leave every absmax as is
    blocks = x.view(n_blocks, blocksize)
    low, high = torch.aminmax(blocks, dim=1)  # one pass instead of abs() then amax()
    absmax = torch.maximum(low.abs(), high.abs())  # [n_blocks]
    inverse = 1.0 / absmax.clamp(min=_TINY)
    scaled = (blocks * inverse[:, None]).view(-1)[:n]  # [n]
    full = n - n % blocksize
    if full < n:  # bitsandbytes divides a short last block (see lowrank/numpy/quant.py)
        scaled[full:] = x[full:n] / absmax[-1].clamp(min=_TINY)
    codes = _nearest_code(scaled, table)  # [n]
    if pack:
        codes = pack_4bit(codes, pad_code=_search_table(table, x.device).pad_code)
    return codes, absmax


def _nearest_code(scaled: torch.Tensor, table: str) -> torch.Tensor:
    """Code of the nearest level: bucketize counts the float32 midpoints strictly below each
    value, which is the sorted position of the nearest level (ties go to the lower one)."""
    search = _search_table(table, scaled.device)
    position = torch.bucketize(scaled, search.midpoints)
    if search.order is None:  # levels already sorted: the position is the code
        return position.to(torch.uint8)
    return search.order[position]


def _dequantize(q: Quantized4bit) -> torch.Tensor:
    """`dequantize_4bit` in tensor operations, for any device (what CUDA runs)."""
    n = _numel(q.shape)
    absmax = q.absmax_float32()  # [n_blocks]
    values = _levels(q.packed, q.quant_type)  # [2 * ceil(n / 2)] float32
    n_blocks = absmax.numel()
    if values.numel() != n_blocks * q.blocksize:  # a short last block or an odd pad nibble
        values = F.pad(values[:n], (0, n_blocks * q.blocksize - n))
    blocks = values.view(n_blocks, q.blocksize)  # [n_blocks, blocksize], a fresh buffer
    blocks.mul_(absmax[:, None])
    return blocks.reshape(-1)[:n].reshape(q.shape).to(q.dtype)


def _levels(packed: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The level of every nibble in `packed` [m], in order (high nibble first), float32 [2 * m]."""
    table = _pair_table(quant_type, packed.device)  # [256, 2]
    return table[packed.long()].reshape(-1)


@dataclass(frozen=True)
class _Search:
    midpoints: torch.Tensor  # float32 [levels - 1], between the sorted levels
    order: torch.Tensor | None  # uint8 [levels]: sorted position -> code (None: identity)
    pad_code: int  # the code of 0.0


@cache
def _search_table(table: str, device: torch.device) -> _Search:
    """Search tables for `table` ("nf4", "fp4", "int4" or "dynamic"), as in
    `lowrank.numpy.quant._nearest_code`: levels sorted stably, float32 midpoints."""
    code = reference.dynamic_map() if table == "dynamic" else reference.code_for(table)
    order = np.argsort(code, kind="stable").astype(np.uint8)
    levels = code[order]
    midpoints = (levels[:-1] + levels[1:]) / np.float32(2.0)
    is_sorted = np.array_equal(order, np.arange(order.size))
    return _Search(
        midpoints=torch.from_numpy(midpoints).to(device),
        order=None if is_sorted else torch.from_numpy(order).to(device),
        pad_code=int(order[np.searchsorted(midpoints, 0.0, side="left")]),
    )


@cache
def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the levels of byte b's high and low nibble."""
    code = code_for(quant_type)
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 0x0F]], dim=1).to(device)


@cache
def _dynamic_map(device: torch.device) -> torch.Tensor:
    return dynamic_map(device)


def _block_scales(absmax: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    """Each element's block scale, [n]."""
    return absmax.repeat_interleave(blocksize)[:n]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()

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

The two float32 corners of `lowrank.numpy.quant` are handled the same way here, in both paths: a
block whose absmax is below 1e-38 (no float32 reciprocal exists) is first multiplied by 2 ** 64,
exactly, and then scaled like any block; every
decoded scale is clamped to the largest finite value of float32 and of `q.dtype` (a rebuilt
double-quantized scale may lie above the true absmax, which near float16's 65504 or float32's
3.4e38 overflowed to inf; the true absmax is below the limit, so the clamp only brings the
scale closer to it). Ordinary weights meet neither corner: bit-identity with bitsandbytes holds.

`dequantize_4bit` checks its `Quantized4bit` first (`check_quantized`): sizes, dtypes, devices
and flags are host-side metadata and always checked; the values (finite scales) only on CPU,
so that decoding on CUDA still never waits for the device.

Under `torch.compile`, `dequantize_4bit` takes the plain tensor path even on CPU: Dynamo cannot
trace NumPy code that works on a tensor's memory (it failed with a TorchRuntimeError, not a
graph break), while it traces the tensor path whole (`fullgraph=True` works), and inductor can
fuse the decode into the kernels around it; the code tables enter the graph as constants
(`assume_constant_result`). A custom operator (`torch.library.custom_op`) wrapping quant_cpu
was the other choice; it needs torch >= 2.4 (lowrank supports 2.1) and a second, fake kernel
to keep in step, and it would hide the decode from inductor.
"""

import numbers
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from lowrank._validate import ArgumentTypeError, check_blocksize, check_bool, check_quant_type
from lowrank.numpy import quant as reference
from lowrank.numpy.quant import DOUBLE_QUANT_BLOCKSIZE
from lowrank.torch import quant_cpu
from lowrank.torch.quant_cpu import FLOAT32_MAX, scale_limit

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TINY = 1e-38  # stands in for an all-zero block's absmax when dividing (0 * 1e38 = 0)
_LIFT = float(reference._LIFT)  # 2 ** 64: blocks below _TINY are multiplied by it first

# torch >= 2.3 names these in torch.compiler; torch 2.1 and 2.2 only in torch._dynamo
_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
_constant_result = (
    getattr(torch.compiler, "assume_constant_result", None) or torch._dynamo.assume_constant_result
)


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
        check_quantized(self, values=False)  # sizes only (also on the meta device)
        total = _nbytes(self.packed) + _nbytes(self.absmax)
        if self.double_quant:
            total += _nbytes(self.absmax2) + 4
        return total

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def absmax_float32(self) -> torch.Tensor:
        """Block scales, float32 [n_blocks]; with double quantization
        `dynamic_map()[code] * absmax2[j // 256] + offset`, clamped to +-float32 max."""
        check_quantized(self)
        return _absmax_float32(self)

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
    check_bool("double_quant", double_quant)
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
    """Rebuild the tensor: `code[c] * absmax[block]` in float32, returned as `q.dtype`.

    `q` is checked first (`check_quantized`; on CUDA, and while compiling, without reading the
    values: no host sync). Each scale is clamped to the largest finite value of `q.dtype` and
    of float32, so a quantization of finite input decodes to finite values of its dtype.
    """
    check_quantized(q)
    # dequantize's one CPU-or-not decision (the same values); Dynamo traces the tensor path
    if q.device.type == "cpu" and not _is_compiling():
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


def check_quantized(q: Quantized4bit, *, values: bool = True) -> None:
    """Refuse a `Quantized4bit` whose fields do not describe one quantized tensor (the rules of
    `lowrank.numpy.quant.check_quantized`, naming the field and what was expected).

    Metadata, always checked (free: nothing is read from the device): `quant_type`,
    `blocksize`, `double_quant`; `shape` a tuple of non-negative ints with n >= 1 elements;
    `dtype` one of FLOAT_DTYPES; `packed` uint8 [ceil(n / 2)] exactly (a shape needing fewer
    codes is refused, never truncated); `absmax` [ceil(n / blocksize)], float32, or uint8 with
    double quantization, which also needs `offset` (float32 0-d) and `absmax2` (float32
    [ceil(n_blocks / 256)]), both None without it; all on `packed`'s device.
    Values, with `values`, on CPU only: the float32 scales and the offset must be finite
    (O(n_blocks); `packed` is never read). On CUDA, and while torch.compile traces, the values
    are not checked, so that `dequantize_4bit` adds no host sync and no graph break.
    Wrong types raise `ArgumentTypeError` (a TypeError and a ValueError), inconsistent values
    `ValueError`.
    """
    if not isinstance(q, Quantized4bit):
        raise ArgumentTypeError(f"expected a Quantized4bit, got {type(q).__name__}")
    check_quant_type(q.quant_type)
    check_blocksize(q.blocksize)
    check_bool("Quantized4bit.double_quant", q.double_quant)
    n = _check_shape(q.shape)
    if not isinstance(q.dtype, torch.dtype) or q.dtype not in FLOAT_DTYPES:
        raise ArgumentTypeError(
            f"Quantized4bit.dtype must be one of {FLOAT_DTYPES} (the quantized tensor's), "
            f"got {q.dtype!r}"
        )
    where = f"for shape {q.shape} (n = {n})"
    _check_tensor(q, "packed", torch.uint8, (-(-n // 2),), f"ceil(n / 2) bytes {where}")
    n_blocks = -(-n // q.blocksize)
    blocks = f"ceil(n / blocksize) = ceil({n} / {q.blocksize}) entries {where}"
    if not q.double_quant:
        _check_tensor(q, "absmax", torch.float32, (n_blocks,), f"{blocks}, as double_quant=False")
        for name in ("offset", "absmax2"):
            if getattr(q, name) is not None:
                raise ValueError(f"Quantized4bit.{name} must be None without double quantization")
        scales = {"absmax": q.absmax}
    else:
        what = f"{blocks}, codes as double_quant=True"
        _check_tensor(q, "absmax", torch.uint8, (n_blocks,), what)
        n_blocks2 = -(-n_blocks // DOUBLE_QUANT_BLOCKSIZE)
        what = f"ceil(n_blocks / 256) = {n_blocks2} entries"
        _check_tensor(q, "absmax2", torch.float32, (n_blocks2,), what)
        if q.offset is None:
            raise ValueError("Quantized4bit.offset is missing: double quantization needs it")
        _check_tensor(q, "offset", torch.float32, (), "a 0-d tensor, the mean of the scales")
        scales = {"absmax2": q.absmax2, "offset": q.offset}
    if values and q.packed.device.type == "cpu" and not _is_compiling():
        for name, t in scales.items():  # NumPy: ~10x quicker than torch for this on CPU
            if not np.isfinite(t.detach().numpy()).all():
                raise ValueError(f"Quantized4bit.{name} must be finite (it holds NaN or inf)")


def _check_shape(shape: object) -> int:
    """The number of elements of a valid `Quantized4bit.shape` (plain loops: Dynamo traces
    this, and it takes no generator expressions)."""
    if not isinstance(shape, tuple):
        raise ArgumentTypeError(f"Quantized4bit.shape must be a tuple of ints, got {shape!r}")
    n = 1
    for size in shape:
        if not isinstance(size, numbers.Integral) or isinstance(size, bool):
            raise ArgumentTypeError(f"Quantized4bit.shape must be a tuple of ints, got {shape!r}")
        if size < 0:
            n = 0
        n *= int(size)
    if n == 0:
        raise ValueError(
            f"Quantized4bit.shape must be non-negative sizes holding at least one element, "
            f"got {shape}"
        )
    return n


def _check_tensor(
    q: Quantized4bit, name: str, dtype: torch.dtype, shape: tuple[int, ...], what: str
) -> None:
    """`q.<name>` must be a `dtype` tensor of `shape` on `q.packed`'s device."""
    t = getattr(q, name)
    if not isinstance(t, torch.Tensor) or t.dtype != dtype:
        got = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ArgumentTypeError(
            f"Quantized4bit.{name} must be a {dtype} tensor ({what}), got {got}"
        )
    if tuple(t.shape) != shape:
        raise ValueError(
            f"Quantized4bit.{name} must have shape {list(shape)} ({what}), got {list(t.shape)}"
        )
    if name != "packed" and t.device != q.packed.device:
        raise ValueError(
            f"Quantized4bit.{name} is on {t.device}, but packed is on {q.packed.device}"
        )


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
    # below 1e-38 (subnormal values) 1 / absmax has no float32 value: such a block is scaled up
    # by 2 ** 64 first (exact; lowrank.numpy.quant._LIFT), the others by 1 (x * 1 is x, so
    # their codes are bitsandbytes'). A per-block factor, not a test on the host: no sync.
    lift = torch.where((absmax > 0) & (absmax < _TINY), _LIFT, 1.0)  # [n_blocks]
    inverse = 1.0 / (absmax * lift).clamp(min=_TINY)
    scaled = (blocks * lift[:, None]).mul_(inverse[:, None]).view(-1)[:n]  # [n]
    full = n - n % blocksize
    if full < n:  # bitsandbytes divides a short last block (see lowrank/numpy/quant.py)
        scaled[full:] = x[full:n] / torch.where(absmax[-1] > 0, absmax[-1], _TINY)
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
    """`dequantize_4bit` in tensor operations, for any device (what CUDA runs), for a checked q."""
    n = _numel(q.shape)
    absmax = _absmax_float32(q)  # [n_blocks], within +-float32 max
    limit = scale_limit(q.dtype)
    if limit < FLOAT32_MAX:  # float16 and bfloat16: level * scale must fit the dtype
        absmax = absmax.clamp(-limit, limit)
    values = _levels(q.packed, q.quant_type)  # [2 * ceil(n / 2)] float32
    n_blocks = absmax.numel()
    if values.numel() != n_blocks * q.blocksize:  # a short last block or an odd pad nibble
        values = F.pad(values[:n], (0, n_blocks * q.blocksize - n))
    blocks = values.view(n_blocks, q.blocksize)  # [n_blocks, blocksize], a fresh buffer
    blocks.mul_(absmax[:, None])
    return blocks.reshape(-1)[:n].reshape(q.shape).to(q.dtype)


def _absmax_float32(q: Quantized4bit) -> torch.Tensor:
    """`Quantized4bit.absmax_float32` for a checked `q`. The rebuilt scale is the nearest 8-bit
    level (times absmax2, plus offset), which may lie above the true absmax: near float32's top
    that rounds to inf, so it is clamped (only towards the true absmax, which is finite)."""
    if not q.double_quant:
        return q.absmax
    table = _dynamic_map(q.device)  # [256]
    scales = _block_scales(q.absmax2, DOUBLE_QUANT_BLOCKSIZE, q.absmax.numel())
    return (table[q.absmax.long()] * scales + q.offset).clamp_(-FLOAT32_MAX, FLOAT32_MAX)


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


_TABLES: dict[tuple, torch.Tensor] = {}  # the decode tables, built once per device


@_constant_result  # under torch.compile: called once while tracing, a constant of the graph
def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the levels of byte b's high and low nibble."""
    key = ("pairs", quant_type, device)
    if key not in _TABLES:
        code = code_for(quant_type)
        byte = torch.arange(256)
        _TABLES[key] = torch.stack([code[byte >> 4], code[byte & 0x0F]], dim=1).to(device)
    return _TABLES[key]


@_constant_result
def _dynamic_map(device: torch.device) -> torch.Tensor:
    """[256] float32, `dynamic_map()` on `device`."""
    key = ("dynamic", device)
    if key not in _TABLES:
        _TABLES[key] = dynamic_map(device)
    return _TABLES[key]


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

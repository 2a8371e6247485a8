"""The container of a 4-bit blockwise-quantized tensor, `Quantized4bit`, and its validation,
`check_quantized`: the mirror of `lowrank.numpy.quantized`.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
The fields, the rules they follow and the rebuild of the block scales (`absmax_float32`, clamped
to +-FLOAT32_MAX) are explained in `lowrank/numpy/quantized.py`; on tensors one rule is added:
every tensor lies on `packed`'s device.

`check_quantized` runs before every decode (`quant.dequantize_4bit`, `absmax_float32()`) and in
the bitsandbytes reader and writer (`bnb_format.py`): sizes, dtypes, devices and flags are
host-side metadata and always checked; the values (finite scales) only on CPU, so that decoding
on CUDA still never waits for the device, and not while torch.compile traces (no graph break).

Constants: `FLOAT_DTYPES`, the dtypes a quantized tensor may have had (float32, bfloat16,
float16, float64); `FLOAT32_MAX`, the largest finite float32, where rebuilt scales are clamped;
`DOUBLE_QUANT_BLOCKSIZE` (256), the scales per second-level block (from `lowrank.numpy`).

This file imports the code tables and nothing from `quant.py`, which imports it.

    q = quantize_4bit(w)  # lowrank.torch.quant: a Quantized4bit
    check_quantized(q)    # silent when its fields describe one quantized tensor
"""

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from lowrank._validate import ArgumentTypeError, check_blocksize, check_bool, check_quant_type
from lowrank.numpy import quantized as reference
from lowrank.numpy.quantized import DOUBLE_QUANT_BLOCKSIZE
from lowrank.torch.codebooks import _dynamic_map

__all__ = [
    "DOUBLE_QUANT_BLOCKSIZE",
    "FLOAT32_MAX",
    "FLOAT_DTYPES",
    "Quantized4bit",
    "check_quantized",
]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FLOAT32_MAX = float(reference.FLOAT32_MAX)  # no decoded scale goes beyond it

# torch >= 2.3 names it in torch.compiler; torch 2.1 and 2.2 only in torch._dynamo
_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


@dataclass(frozen=True, eq=False)
class Quantized4bit:
    """A 4-bit blockwise-quantized tensor (see `lowrank.numpy.quantized.Quantized4bit`).

    QLoRA's storage format (Dettmers et al. 2023, arXiv:2305.14314), bit-identical to
    bitsandbytes': n = prod(shape) elements in blocks of `blocksize`, each block a scale and
    one 4-bit code per element. Made by `lowrank.torch.quant.quantize_4bit`, decoded by
    `dequantize_4bit`; frozen, with every tensor on `packed`'s device.

    Attributes:
        packed: uint8 [ceil(n / 2)], element 2j in the high nibble.
        absmax: float32 [n_blocks], or uint8 [n_blocks] codes of (absmax - offset) with
            double quantization.
        offset: float32 0-d tensor (double quantization) or None.
        absmax2: float32 [ceil(n_blocks / 256)] (double quantization) or None.
        shape: the shape of the quantized tensor.
        dtype: its dtype (one of FLOAT_DTYPES), which decoding returns.
        blocksize: elements per block (64 in QLoRA).
        quant_type: "nf4", "fp4" or "int4", the table the codes index.
        double_quant: whether `absmax` holds 8-bit codes of the scales.

    Examples:
        >>> from lowrank.torch.quant import quantize_4bit
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> q = quantize_4bit(torch.randn(64, 64))  # nf4, blocksize 64, double quantization
        >>> q.packed.shape, q.absmax.dtype, q.absmax.shape, q.absmax2.shape
        (torch.Size([2048]), torch.uint8, torch.Size([64]), torch.Size([1]))
        >>> q.shape, q.dtype, q.device
        ((64, 64), torch.float32, device(type='cpu'))
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
        scales and the float32 offset (code tables are constants).

        Examples:
            >>> from lowrank.torch.quant import quantize_4bit
            >>> q = quantize_4bit(torch.ones(64, 64))
            >>> q.nbytes  # 2048 codes + 64 scale codes + 1 float32 absmax2 + the offset
            2120
            >>> round(8 * q.nbytes / 4096, 3)  # bits per weight
            4.141
        """
        check_quantized(self, values=False)  # sizes only (also on the meta device)
        total = _nbytes(self.packed) + _nbytes(self.absmax)
        if self.double_quant:
            total += _nbytes(self.absmax2) + 4
        return total

    @property
    def device(self) -> torch.device:
        """The device every tensor of this quantized tensor lies on (`packed`'s).

        Examples:
            >>> from lowrank.torch.quant import quantize_4bit
            >>> quantize_4bit(torch.ones(8)).device
            device(type='cpu')
        """
        return self.packed.device

    def absmax_float32(self) -> torch.Tensor:
        """Block scales, float32 [n_blocks]; with double quantization
        `dynamic_map()[code] * absmax2[j // 256] + offset`, clamped to +-float32 max.

        Examples:
            >>> from lowrank.torch.quant import quantize_4bit
            >>> w = torch.arange(1.0, 129.0)  # two blocks of 64, absmax 64 and 128
            >>> quantize_4bit(w, double_quant=False).absmax_float32()
            tensor([ 64., 128.])
            >>> scales = quantize_4bit(w).absmax_float32()  # rebuilt from 8-bit codes
            >>> bool(torch.allclose(scales, torch.tensor([64.0, 128.0]), rtol=0.01))
            True
        """
        check_quantized(self)
        return _absmax_float32(self)

    def to(self, device: torch.device | str) -> "Quantized4bit":
        """The same quantized tensor on `device` (every field moved, the rest kept).

        Examples:
            >>> from lowrank.torch.quant import quantize_4bit
            >>> quantize_4bit(torch.ones(8)).to("meta").absmax.device
            device(type='meta')
        """

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


def check_quantized(q: Quantized4bit, *, values: bool = True) -> None:
    """Refuse a `Quantized4bit` whose fields do not describe one quantized tensor (the rules of
    `lowrank.numpy.quantized.check_quantized`, naming the field and what was expected).

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

    Examples:
        >>> import dataclasses
        >>> from lowrank.torch.quant import quantize_4bit
        >>> q = quantize_4bit(torch.ones(4, 8))
        >>> check_quantized(q)  # silent: a valid quantized tensor
        >>> check_quantized(dataclasses.replace(q, packed=q.packed[:-1]))
        Traceback (most recent call last):
        ...
        ValueError: Quantized4bit.packed must have shape [16] (ceil(n / 2) bytes ...), got [15]
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


def _absmax_float32(q: Quantized4bit) -> torch.Tensor:
    """`Quantized4bit.absmax_float32` for a checked `q`. The rebuilt scale is the nearest 8-bit
    level (times absmax2, plus offset), which may lie above the true absmax: near float32's top
    that rounds to inf, so it is clamped (only towards the true absmax, which is finite)."""
    if not q.double_quant:
        return q.absmax
    table = _dynamic_map(q.device)  # [256]
    scales = _block_scales(q.absmax2, DOUBLE_QUANT_BLOCKSIZE, q.absmax.numel())
    return (table[q.absmax.long()] * scales + q.offset).clamp_(-FLOAT32_MAX, FLOAT32_MAX)


def _block_scales(absmax: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    """Each element's block scale, [n]."""
    return absmax.repeat_interleave(blocksize)[:n]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()

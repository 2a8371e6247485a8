"""The container of a 4-bit blockwise-quantized array, `Quantized4bit`, and its validation,
`check_quantized`: which fields QLoRA's storage format has, and which combinations of them
describe one quantized array.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
The fields are bitsandbytes': packed 4-bit codes and one absmax per block; with double
quantization the absmax values stored as 8-bit codes of the dynamic map (`codebooks.py`) in
blocks of 256, with their own float32 scales `absmax2` and the `offset` they are centred on.
`quant.quantize_4bit` makes a `Quantized4bit` and `quant.dequantize_4bit` decodes one.

Nothing that reads a `Quantized4bit` trusts it: `check_quantized` refuses one whose fields
contradict each other (lengths, dtypes, shape, flags, non-finite scales) before anything is
decoded, naming the field and what was expected. `dequantize_4bit`, `absmax_float32()` and
`nbytes` call it, and so do the bitsandbytes reader and writer (`lowrank/torch/bnb_format.py`,
through the torch mirror of this file).

The block scales are rebuilt here too (`absmax_float32`): with double quantization a scale is
the nearest 8-bit level times absmax2, plus offset, which may lie above the block's true
absmax; near the top of float32 that rounds to inf, so it is clamped to +-FLOAT32_MAX (only
towards the true absmax, which is finite).

Constants: `DOUBLE_QUANT_BLOCKSIZE` (256), the number of block scales that share one float32
`absmax2`; `FLOAT32_MAX`, the largest finite float32, the clamp of every decoded scale.

This file imports the code tables and nothing from `quant.py`, which imports it.
"""

import math
import numbers
from dataclasses import dataclass

import numpy as np

from lowrank._validate import ArgumentTypeError, check_blocksize, check_bool, check_quant_type

from .codebooks import dynamic_map

DOUBLE_QUANT_BLOCKSIZE = 256  # block of absmax values that share one float32 scale
FLOAT32_MAX = np.float32(np.finfo(np.float32).max)  # no decoded scale goes beyond it

__all__ = ["DOUBLE_QUANT_BLOCKSIZE", "FLOAT32_MAX", "Quantized4bit", "check_quantized"]


@dataclass(frozen=True, eq=False)
class Quantized4bit:
    """A 4-bit blockwise-quantized array: everything needed to rebuild it, nothing more.

    QLoRA's storage format (Dettmers et al. 2023, arXiv:2305.14314), field for field
    bitsandbytes'. n is the number of elements, n_blocks = ceil(n / blocksize).

    Attributes:
        packed: uint8 (ceil(n / 2),), two codes per byte, element 2j in the high nibble.
        absmax: float32 (n_blocks,) block scales; with double quantization uint8 codes of
            `dynamic_map()` for (absmax - offset), in blocks of 256.
        offset: float32 mean of the block scales (double quantization), else None.
        absmax2: float32 (ceil(n_blocks / 256),) scales of the absmax codes, else None.
        shape: the shape of the quantized array.
        dtype: the dtype it had.
        blocksize: values per block.
        quant_type: "nf4", "fp4" or "int4".
        double_quant: whether the block scales are double-quantized.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import quantize_4bit
        >>> q = quantize_4bit(np.ones((2, 32), np.float32), double_quant=False)
        >>> q.shape, q.packed.shape, q.absmax
        ((2, 32), (32,), array([1.], dtype=float32))
        >>> q.nbytes  # 32 bytes of codes + one float32 scale
        36
        >>> quantize_4bit(np.ones((2, 32), np.float32)).absmax_float32()  # rebuilt from 8 bits
        array([1.], dtype=float32)
    """

    packed: np.ndarray
    absmax: np.ndarray
    offset: np.float32 | None
    absmax2: np.ndarray | None
    shape: tuple[int, ...]
    dtype: np.dtype
    blocksize: int
    quant_type: str
    double_quant: bool

    def absmax_float32(self) -> np.ndarray:
        """The block scales as float32 (n_blocks,), decoding double quantization if used:
        `dynamic_map()[code] * absmax2[j // 256] + offset`, clamped to +-float32 max."""
        check_quantized(self)
        return _absmax_float32(self)

    @property
    def nbytes(self) -> int:
        """Bytes that must be stored: codes, scales and, with double quantization, their scales
        and the offset (the code tables are constants)."""
        check_quantized(self, values=False)  # sizes only: the values do not change the count
        total = self.packed.nbytes + self.absmax.nbytes
        if self.double_quant:
            total += self.absmax2.nbytes + 4  # float32 offset
        return total


def check_quantized(q: Quantized4bit, *, values: bool = True) -> None:
    """Refuse a `Quantized4bit` whose fields do not describe one quantized array.

    Checks, naming the field and what was expected: `quant_type`, `blocksize` and
    `double_quant` are valid; `shape` is a tuple of non-negative ints holding at least one
    element (n); `dtype` is a floating-point dtype; `packed` is a 1-D uint8 array of exactly
    ceil(n / 2) bytes (a shape that needs fewer codes is refused too, never truncated);
    `absmax` is 1-D with ceil(n / blocksize) entries, float32, or uint8 codes with double
    quantization, which also needs a float32 scalar `offset` and a 1-D float32 `absmax2` of
    ceil(n_blocks / 256) entries (both None without it). With `values`, the float32 scales and
    the offset must be finite: O(n_blocks) work; `packed` is never read (every byte is a
    valid pair of codes). Wrong types raise `ArgumentTypeError` (a TypeError and a
    ValueError), inconsistent values `ValueError`.

    Examples:
        >>> import dataclasses
        >>> import numpy as np
        >>> from lowrank.numpy import quantize_4bit
        >>> from lowrank.numpy.quantized import check_quantized
        >>> q = quantize_4bit(np.ones((2, 32), np.float32))
        >>> check_quantized(q)  # consistent: returns None
        >>> check_quantized(dataclasses.replace(q, packed=q.packed[:-1]))
        Traceback (most recent call last):
            ...
        ValueError: Quantized4bit.packed must be 1-D with 32 entries (ceil(n / 2) bytes ...
    """
    if not isinstance(q, Quantized4bit):
        raise ArgumentTypeError(f"expected a Quantized4bit, got {type(q).__name__}")
    check_quant_type(q.quant_type)
    check_blocksize(q.blocksize)
    check_bool("Quantized4bit.double_quant", q.double_quant)
    n = _check_shape(q.shape)
    dtype = q.dtype
    if not (
        (isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)))
        and np.issubdtype(dtype, np.floating)
    ):
        raise ArgumentTypeError(
            f"Quantized4bit.dtype must be the floating-point dtype of the quantized array, "
            f"got {dtype!r}"
        )
    n_blocks = -(-n // q.blocksize)
    where = f"for shape {q.shape} (n = {n})"
    _check_array("packed", q.packed, np.uint8, -(-n // 2), f"ceil(n / 2) bytes {where}")
    blocks = f"ceil(n / blocksize) = ceil({n} / {q.blocksize}) entries {where}"
    if not q.double_quant:
        _check_array("absmax", q.absmax, np.float32, n_blocks, f"{blocks}, as double_quant=False")
        for name in ("offset", "absmax2"):
            if getattr(q, name) is not None:
                raise ValueError(f"Quantized4bit.{name} must be None without double quantization")
        if values and not np.all(np.isfinite(q.absmax)):
            raise ValueError("Quantized4bit.absmax must be finite (it holds NaN or inf)")
        return
    _check_array("absmax", q.absmax, np.uint8, n_blocks, f"{blocks}, codes as double_quant=True")
    n_blocks2 = -(-n_blocks // DOUBLE_QUANT_BLOCKSIZE)
    _check_array(
        "absmax2", q.absmax2, np.float32, n_blocks2, f"ceil(n_blocks / 256) = {n_blocks2} entries"
    )
    offset = q.offset
    if offset is None:
        raise ValueError("Quantized4bit.offset is missing: double quantization needs it")
    if not isinstance(offset, (np.ndarray, np.generic)) or offset.dtype != np.float32:
        raise ArgumentTypeError(
            f"Quantized4bit.offset must be a float32 scalar, got {offset!r} "
            f"({type(offset).__name__})"
        )
    if offset.shape != ():
        raise ValueError(f"Quantized4bit.offset must be a scalar, got shape {offset.shape}")
    for name, scales in (("absmax2", q.absmax2), ("offset", offset)):
        if values and not np.all(np.isfinite(scales)):
            raise ValueError(f"Quantized4bit.{name} must be finite (it holds NaN or inf)")


def _check_shape(shape: object) -> int:
    """The number of elements of a valid `Quantized4bit.shape`."""
    if not isinstance(shape, tuple) or not all(
        isinstance(size, numbers.Integral) and not isinstance(size, bool) for size in shape
    ):
        raise ArgumentTypeError(f"Quantized4bit.shape must be a tuple of ints, got {shape!r}")
    if any(size < 0 for size in shape) or math.prod(shape) == 0:
        raise ValueError(
            f"Quantized4bit.shape must be non-negative sizes holding at least one element, "
            f"got {shape}"
        )
    return math.prod(int(size) for size in shape)


def _check_array(name: str, a: object, dtype: type, size: int, what: str) -> None:
    """`Quantized4bit.<name>` must be a 1-D `dtype` array of `size` entries."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        got = f"{a.dtype} array" if isinstance(a, np.ndarray) else type(a).__name__
        raise ArgumentTypeError(
            f"Quantized4bit.{name} must be a {np.dtype(dtype).name} array ({what}), got {got}"
        )
    if a.shape != (size,):
        raise ValueError(
            f"Quantized4bit.{name} must be 1-D with {size} entries ({what}), got shape {a.shape}"
        )


def _absmax_float32(q: Quantized4bit) -> np.ndarray:
    """`Quantized4bit.absmax_float32` for a checked `q`.

    The rebuilt scale is the nearest 8-bit level times absmax2, plus offset: it can lie above
    the block's true absmax by up to half a level's gap (times absmax2), which near float32's
    top rounds to inf. The clamp to +-float32 max only moves such a scale closer to the true
    absmax (which is finite), and leaves every other scale, so every ordinary one, as it is.
    """
    if not q.double_quant:
        return q.absmax
    scales = _block_scales(q.absmax2, DOUBLE_QUANT_BLOCKSIZE, q.absmax.size)
    with np.errstate(over="ignore"):  # a rebuilt scale beyond float32: clamped just below
        rebuilt = dynamic_map()[q.absmax] * scales + q.offset
    return np.clip(rebuilt, -FLOAT32_MAX, FLOAT32_MAX, out=rebuilt)


def _block_scales(absmax: np.ndarray, blocksize: int, n: int) -> np.ndarray:
    """Each element's block scale, (n,)."""
    return np.repeat(absmax, blocksize)[:n]

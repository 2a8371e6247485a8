"""Builds and loads `quant_native.cpp`, the CPU 4-bit kernels that run on PyTorch's own OpenMP
threads, and calls them on the memory of CPU tensors and NumPy arrays.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
`quant_cpu` calls `quantize_4bit`, `quantize_codes` and `dequantize_4bit` here when `kernels()`
finds the library, and `quant_numba`'s (the same names and arguments) otherwise; both give the
same bits (tests/torch/test_quant_cpu.py runs every test on both). The .cpp says why C++: the
loops share the cores with PyTorch's pool instead of competing with it.

The library is compiled once per machine with `torch.utils.cpp_extension.load` (g++ or clang
with OpenMP, and ninja; about 5 s) into PyTorch's extension cache (`TORCH_EXTENSIONS_DIR`,
default ~/.cache/torch_extensions); later processes load it in milliseconds. Its name carries
a hash of the source and of this CPU's model and flags, because `-march=native` code may not run on
another CPU that shares the cache. Where it cannot be built (no compiler, no ninja, no OpenMP,
a read-only cache), `kernels()` returns None and says why in `unavailable_reason()`; nothing
else changes.
"""

import contextlib
import ctypes
import hashlib
import logging
import platform
import re
import time
from functools import cache
from pathlib import Path

import numpy as np
import torch

from lowrank.numpy.codebooks import dynamic_map

__all__ = ["dequantize_4bit", "kernels", "quantize_4bit", "quantize_codes", "unavailable_reason"]

_SOURCE = Path(__file__).with_name("quant_native.cpp")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
_SOURCE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_OUT_KINDS = {"float32": 0, "bfloat16": 1, "float16": 2}
_DYNAMIC = dynamic_map()  # float32 [256]: double quantization's table
_STALE_LOCK_S = 300.0  # a build lock older than this was left by a killed process
_failure: list[str] = []  # why the build failed, once


def _cpu_signature() -> str:
    """This CPU's model and feature flags (Linux's /proc/cpuinfo; elsewhere what platform
    knows): what -march=native compiled for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))


def _remove_stale_lock(build_directory: Path) -> None:
    """cpp_extension waits, without end, while its build folder holds a `lock` file; a process
    killed during the build (Ctrl-C, a timeout) leaves one behind. A build takes seconds: a
    lock older than `_STALE_LOCK_S` is such a leftover and is removed."""
    lock = build_directory / "lock"
    with contextlib.suppress(FileNotFoundError):
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink()


@cache
def kernels() -> ctypes.CDLL | None:
    """The compiled library, built on the first call; None where it cannot be built (then
    `unavailable_reason()` says why; torch's own build warnings are kept quiet).

    Examples:
        >>> library = kernels()  # None where no C++ compiler with OpenMP, or no ninja, is
        >>> (library is None) == (unavailable_reason() is not None)
        True
    """
    builder = logging.getLogger("torch.utils.cpp_extension")
    level = builder.level
    builder.setLevel(logging.ERROR)  # its compiler-compatibility warnings: the reason says it
    try:
        from torch.utils import cpp_extension

        digest = hashlib.sha256(_SOURCE.read_bytes() + _cpu_signature().encode()).hexdigest()
        name = f"lowrank_quant_{digest[:16]}"
        _remove_stale_lock(Path(cpp_extension._get_build_directory(name, False)))
        path = cpp_extension.load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        library = ctypes.CDLL(path)
    except Exception as error:  # a compiler, ninja or the cache missing: numba's loops run
        _failure.append(_reason(error))
        return None
    finally:
        builder.setLevel(level)
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.lowrank_quantize_4bit.argtypes = [
        pointer, ctypes.c_int, size, size, pointer, pointer, pointer, pointer, ctypes.c_int
    ]  # fmt: skip
    library.lowrank_quantize_codes.argtypes = [
        pointer, ctypes.c_int, size, size, pointer, pointer, pointer, pointer, pointer, ctypes.c_int
    ]  # fmt: skip
    library.lowrank_dequantize_4bit.argtypes = [
        pointer, pointer, pointer, pointer, ctypes.c_float, ctypes.c_float, size, size, pointer,
        ctypes.c_int, pointer, ctypes.c_int,
    ]  # fmt: skip
    return library


def _reason(error: Exception) -> str:
    """One line from a failed build: the compiler's or the shell's complaint where the message
    has one ("... g++: not found", "... error: ..."), else its last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    complaints = [
        line
        for line in lines[1:] or lines
        if re.search(r"error|not found|no such file", line, re.IGNORECASE)
    ]
    return f"{type(error).__name__}: {(complaints[:1] or lines[-1:] or [''])[0]}"


def unavailable_reason() -> str | None:
    """Why `kernels()` found no library (None when it did, or before it was asked).

    Examples:
        >>> reason = unavailable_reason()  # e.g. "RuntimeError: /bin/sh: 1: g++: not found"
        >>> reason is None or isinstance(reason, str)
        True
    """
    return _failure[0] if _failure else None


def _address(array: np.ndarray) -> int:
    assert array.flags.c_contiguous, "the kernels read and write contiguous memory"
    return array.ctypes.data


def quantize_4bit(
    source: torch.Tensor,
    blocksize: int,
    midpoints: np.ndarray,
    order: np.ndarray,
    absmax: np.ndarray,
    packed: np.ndarray,
    threads: int,
) -> None:
    """Quantize `absmax.size` whole blocks of the CPU tensor `source` (contiguous float32,
    bfloat16 or float16, [n_blocks * blocksize] or more) into packed uint8
    [n_blocks * blocksize / 2] and absmax float32 [n_blocks]: `quant_numba._quantize_4bit`'s
    codes (blocksize even). midpoints float32 [15], order uint8 [16]: as in `_search_table`.

    Examples:
        >>> from lowrank.torch.quant_cpu import _search_table
        >>> search = _search_table("nf4")
        >>> x = torch.tensor([1.0, -1.0, 0.0, 0.5, 2.0, -2.0, 0.0, 1.0])  # two blocks of 4
        >>> absmax, packed = np.empty(2, np.float32), np.empty(4, np.uint8)
        >>> quantize_4bit(x, 4, search.midpoints, search.order, absmax, packed, threads=1)
        >>> absmax.tolist(), [f"{byte:02X}" for byte in packed]  # codes 15 0 7 12 | 15 0 7 12
        ([1.0, 2.0], ['F0', '7C', 'F0', '7C'])
    """
    n_blocks = absmax.size
    assert source.is_contiguous() and source.numel() >= n_blocks * blocksize
    assert packed.size >= n_blocks * blocksize // 2
    assert midpoints.dtype == np.float32 and midpoints.size == 15 and order.size == 16
    kernels().lowrank_quantize_4bit(
        source.data_ptr(), _SOURCE_KINDS[source.dtype], n_blocks, blocksize, _address(midpoints),
        _address(order), _address(absmax), _address(packed), threads,
    )  # fmt: skip


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
    """Quantize every element of the CPU tensor `source` (contiguous float32, bfloat16 or
    float16, [n]; the last block may be short) to one uint8 code, codes [n], absmax float32
    [ceil(n / blocksize)]: `quant_numba._quantize_codes`'s codes, by the same cell lookup
    (below uint8 [65536], threshold float32 [65536], order uint8: `quant_cpu._search_table`).

    Examples:
        >>> from lowrank.torch.quant_cpu import _search_table
        >>> search = _search_table("nf4")
        >>> x = torch.tensor([1.0, -1.0, 0.0, 0.5, 2.0])  # a block of 4 and a short one
        >>> absmax, codes = np.empty(2, np.float32), np.empty(5, np.uint8)
        >>> quantize_codes(x, 4, search.below, search.threshold, search.order, absmax, codes, 1)
        >>> absmax.tolist(), codes.tolist()
        ([1.0, 2.0], [15, 0, 7, 12, 15])
    """
    n = source.numel()
    assert source.is_contiguous() and codes.size >= n and absmax.size >= -(-n // blocksize)
    assert below.size == threshold.size == 65536 and threshold.dtype == np.float32
    kernels().lowrank_quantize_codes(
        source.data_ptr(), _SOURCE_KINDS[source.dtype], n, blocksize, _address(below),
        _address(threshold), _address(order), _address(absmax), _address(codes), threads,
    )  # fmt: skip


def dequantize_4bit(
    packed: np.ndarray,
    absmax: np.ndarray,
    absmax2: np.ndarray | None,
    offset: float,
    limit: float,
    n_blocks: int,
    blocksize: int,
    levels: np.ndarray,
    out: np.ndarray,
    out_kind: str,
    threads: int,
) -> None:
    """Decode the first `n_blocks` whole blocks (blocksize even) of `packed` into `out`
    ([n_blocks * blocksize] float32, or uint16 bits of "bfloat16" / "float16"):
    `level[code] * scale` in float32, rounded to nearest even for the 16-bit kinds. The scales:
    `absmax` float32 [>= n_blocks], or with `absmax2` (float32 [ceil(n_blocks / 256)]) uint8
    codes of the dynamic map rebuilt with `offset` as `quant_cpu._scales` does; each clamped to
    +-float32 max and +-limit. The 16-bit kinds need scales that are numbers.

    Examples:
        >>> from lowrank.numpy.codebooks import code_for
        >>> packed = np.array([0xF0, 0x7C], np.uint8)  # codes 15 0 7 12: NF4's 1, -1, 0, 0.44
        >>> out = np.empty(4, np.float32)
        >>> dequantize_4bit(packed, np.array([2.0], np.float32), None, 0.0, 3.4e38, 1, 4,
        ...                 code_for("nf4"), out, "float32", threads=1)
        >>> [round(value, 4) for value in out.tolist()]
        [2.0, -2.0, 0.0, 0.8814]
    """
    assert packed.size >= n_blocks * blocksize // 2 and out.size >= n_blocks * blocksize
    assert absmax.size >= n_blocks and levels.dtype == np.float32 and levels.size == 16
    assert absmax.dtype == (np.uint8 if absmax2 is not None else np.float32)
    kernels().lowrank_dequantize_4bit(
        _address(packed), _address(absmax), None if absmax2 is None else _address(absmax2),
        _address(_DYNAMIC), offset, limit, n_blocks, blocksize, _address(levels),
        _OUT_KINDS[out_kind], _address(out), threads,
    )  # fmt: skip

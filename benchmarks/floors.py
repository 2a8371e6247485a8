"""Floors measured in the same run: what the hardware needs at least for a row's work.

- Bytes: an operation that must read R bytes and write W bytes is given the time of a plain
  copy that reads R bytes and writes W bytes into a destination of W bytes allocated afresh
  on every call, as the operation allocates its output (on CPU this includes the page faults
  of a fresh large buffer, where glibc maps one; on CUDA the caching allocator makes it free).
  `copy_floor(R, W)` returns that callable; it is raced with the contenders, so it sees the
  same load.
- FLOPs: `count_flops(fn)` counts the matrix FLOPs of one call (torch.utils.flop_counter);
  `matmul_floor(m, k, n)` is a plain `x @ w.T` of a representative shape whose measured time
  gives the rate, so floor = FLOPs / rate.
- Bandwidth of a device-to-device copy (for the GPU's dequantize share): `copy_bandwidth`.
"""

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def copy_floor(read_bytes: int, write_bytes: int, device: torch.device) -> Callable[[], object]:
    """A plain copy that reads read_bytes and writes write_bytes into a fresh buffer.

    The destination is allocated afresh on each call, with the operation's output size, as
    the operation allocates its output. Reading more than is written (quantize) copies every
    k-th 8-byte word of the source, k <= 8, so every 64-byte cache line is read (a further
    read pass covers what k = 8 leaves); writing more than is read (dequantize) copies the
    source k times (a broadcast: it is read from memory once).
    """
    w8, r8 = max(1, write_bytes // 8), max(1, read_bytes // 8)
    extra = None
    if r8 >= w8:
        k = min(8, r8 // w8)
        src = torch.ones(w8 * k, dtype=torch.int64, device=device)
        strided = src.view(w8, k)[:, 0]
        if r8 > 8 * w8:  # the rest of the bytes read, one read pass
            extra = torch.ones(r8 - 8 * w8, dtype=torch.float64, device=device)

        def copy() -> torch.Tensor:
            out = torch.empty(w8, dtype=torch.int64, device=device).copy_(strided)
            if extra is not None:
                extra.sum()
            return out
    else:
        k = -(-w8 // r8)
        src = torch.ones(r8, dtype=torch.int64, device=device)

        def copy() -> torch.Tensor:
            out = torch.empty(k * r8, dtype=torch.int64, device=device)
            out.view(k, r8).copy_(src.expand(k, r8))
            return out

    return copy


def matmul_floor(
    m: int, k: int, n: int, dtype: torch.dtype, device: torch.device
) -> Callable[[], object]:
    """A callable doing one plain (m, k) @ (k, n) product; `.flops` on it is 2 m k n."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(n, k, generator=g).to(device=device, dtype=dtype)

    def matmul() -> torch.Tensor:
        return x @ w.T

    matmul.flops = 2 * m * k * n  # type: ignore[attr-defined]
    return matmul


def count_flops(fn: Callable[[], object]) -> int:
    """Matrix FLOPs (mm, addmm, bmm, ...) of one call of fn, as torch counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int = 10) -> float:
    """Bytes per second (read + written) of a warm device-to-device copy of nbytes."""
    from benchmarks.timing import race

    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    stats = race({"copy": lambda: dst.copy_(src)}, repeats=repeats, device=device)
    return 2 * src.numel() * 4 / stats["copy"].median

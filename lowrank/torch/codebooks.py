"""The code tables on tensors: the mirror of `lowrank.numpy.codebooks`.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
NF4, FP4, int4 and the dynamic map are explained in `lowrank/numpy/codebooks.py`; each function
here returns that NumPy table as a float32 tensor (`torch.from_numpy`: the same bits), on the
device asked for.

Below them, the tables that `quant.py` and `quantized.py` read on every call, built once per
device and cached: the search table of a nearest-level search (`_search_table`: the sorted
levels' float32 midpoints), the levels of both nibbles of every byte (`_pair_table`) and the
dynamic map (`_dynamic_map`). Under `torch.compile` the two decode tables enter the graph as
constants (`assume_constant_result`): Dynamo calls them once while tracing.

    code = nf4_code("cuda")  # float32 [16], index = 4-bit code
"""

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from lowrank.numpy import codebooks as reference

# torch >= 2.3 names it in torch.compiler; torch 2.1 and 2.2 only in torch._dynamo
__all__ = ["code_for", "dynamic_map", "fp4_code", "int4_code", "nf4_code"]

_constant_result = (
    getattr(torch.compiler, "assume_constant_result", None) or torch._dynamo.assume_constant_result
)


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 levels, float32 [16] on `device`, ascending, index = code (bitsandbytes' table).

    NormalFloat4 (Dettmers et al. 2023, QLoRA, arXiv:2305.14314): quantiles of N(0, 1) scaled
    to [-1, 1], with an exact zero at code 7.

    Examples:
        >>> code = nf4_code()
        >>> code.shape, code.dtype
        (torch.Size([16]), torch.float32)
        >>> code[0].item(), code[7].item(), code[15].item()
        (-1.0, 0.0, 1.0)
        >>> bool(torch.all(code[1:] > code[:-1]))  # ascending
        True
    """
    return torch.from_numpy(reference.nf4_code()).to(device)


def fp4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' FP4 table, float32 [16] on `device`, index = bit pattern (bit 3 = sign).

    The 4-bit float of QLoRA (Dettmers et al. 2023, arXiv:2305.14314), normalised to [-1, 1];
    not sorted: codes 8..15 are codes 0..7 with the sign flipped.

    Examples:
        >>> code = fp4_code()
        >>> code[3].item(), code[11].item()  # bit 3 flips the sign
        (1.0, -1.0)
        >>> torch.equal(code[8:], -code[:8])
        True
    """
    return torch.from_numpy(reference.fp4_code()).to(device)


def int4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """Symmetric absmax int4: code c holds (c - 8) / 7, float32 [16] on `device`.

    The plain integer baseline that NF4 and FP4 are compared with in QLoRA (Dettmers et al.
    2023, arXiv:2305.14314); code 0 (-8 / 7) lies outside [-1, 1] and is never the nearest.

    Examples:
        >>> code = int4_code()
        >>> code[8].item(), code[15].item()
        (0.0, 1.0)
        >>> round(code[1].item(), 4)
        -1.0
    """
    return torch.from_numpy(reference.int4_code()).to(device)


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The signed 8-bit dynamic map (256 float32 levels) used for double quantization;
    bit-identical to `bitsandbytes.functional.create_dynamic_map(signed=True)`.

    Dettmers et al. 2022, 8-bit optimizers via block-wise quantization (arXiv:2110.02861);
    QLoRA quantizes its block scales with it (Dettmers et al. 2023, arXiv:2305.14314).
    Returns float32 [256] on `device`.

    Examples:
        >>> table = dynamic_map()
        >>> table.shape, table.dtype
        (torch.Size([256]), torch.float32)
        >>> table.max().item(), int((table == 0).sum())
        (1.0, 1)
    """
    return torch.from_numpy(reference.dynamic_map()).to(device)


def code_for(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-level table of `quant_type` ("nf4", "fp4" or "int4"), index = 4-bit code:
    float32 [16] on `device`. Another name is a ValueError.

    Examples:
        >>> torch.equal(code_for("nf4"), nf4_code())
        True
        >>> code_for("nf4", device="meta").device
        device(type='meta')
        >>> code_for("nf5")
        Traceback (most recent call last):
        ...
        ValueError: unknown quant_type 'nf5'; expected one of ('nf4', 'fp4', 'int4')
    """
    return torch.from_numpy(reference.code_for(quant_type)).to(device)


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

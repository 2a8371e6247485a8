"""4-bit blockwise quantization on tensors (CPU and CUDA): the mirror of `lowrank.numpy.quant`,
plus reading and writing bitsandbytes' serialized 4-bit format.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
The steps (blockwise absmax, nearest of 16 levels, two codes per byte, double quantization of
the scales) and the code tables are explained in `lowrank/numpy/quant.py`; this file does the
same float32 arithmetic with whole-tensor operations, so both give identical codes and identical
float32 dequantized values, and both are bit-identical to `bitsandbytes.functional.quantize_4bit`.

On CUDA nothing here waits for the GPU: the work is queued and the Python side never reads a
value back. The one check that would need to read one, "does w hold NaN or inf?", is therefore
done on CPU tensors only (on CUDA a NaN or inf makes its block's absmax NaN or inf;
`qlora.Linear4bit` checks its weights itself).

On CPU, PyTorch's per-element gathers and its binary search are slow, so the CPU paths work
in NumPy on the same memory: the nearest level comes from a lookup on the top 16 bits of each
float (`_nearest_code_cpu`), and decoding looks up the two levels of each byte (`_levels`).
They give exactly the codes and values of the plain tensor path that CUDA runs (`_nearest_code`,
a bucketize over the midpoints), which tests/torch/test_quant.py checks. The CPU paths also cut
the tensor into chunks and run each chunk start to end (scale, look up, pack) while its
temporaries are still in the CPU caches, on a few threads (`_run_chunks`).
"""

import json
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from lowrank.numpy import quant as reference
from lowrank.numpy.quant import (
    DOUBLE_QUANT_BLOCKSIZE,
    _check_blocksize,
    _check_quant_type,
)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TINY = 1e-38  # stands in for an all-zero block's absmax when dividing (0 * 1e38 = 0)
# Values per task on CPU, so that a task's temporaries (about 20 bytes per value when
# quantizing, 10 when decoding) stay in the caches while it runs; measured on 4096 x 4096.
_QUANTIZE_CHUNK = 1 << 18
_DEQUANTIZE_CHUNK = 1 << 19


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
        if self.device.type == "cpu":  # in NumPy: quicker here than a few small torch ops
            codes, absmax2 = self.absmax.numpy(), self.absmax2.numpy()
            scales = np.repeat(absmax2, DOUBLE_QUANT_BLOCKSIZE)[: codes.size]
            return torch.from_numpy(reference.dynamic_map()[codes] * scales + self.offset.numpy())
        table = _dynamic_map(self.device)
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
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w must be float32, bfloat16, float16 or float64, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    x = w.detach().reshape(-1)  # (n,)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        # read as float32 chunk by chunk (bfloat16 widens exactly), the codes packed as they come
        packed, absmax = _quantize_blocks_cpu(x, blocksize, quant_type, pack=True)
    else:
        x = x.float()  # float32 like bitsandbytes
        codes, absmax = _quantize_blocks(x, blocksize, quant_type)
        # NaN or inf anywhere makes its block's absmax NaN or inf, so checking the scales is
        # enough (the CPU path checks inside _quantize_blocks_cpu). On CUDA this is quantize's
        # one host sync: the contract's ValueError needs the answer on the host.
        if x.device.type != "cpu" and not bool(torch.isfinite(absmax).all()):
            raise ValueError("w contains NaN or inf (or values beyond the float32 range)")
        packed = pack_4bit(codes, pad_code=_search_table(quant_type, x.device).pad_code)
    offset, absmax2 = None, None
    if double_quant:
        offset = absmax.mean(dtype=torch.float64).float()  # float64 sum, rounded once (as NumPy)
        absmax, absmax2 = _quantize_blocks(absmax - offset, DOUBLE_QUANT_BLOCKSIZE, "dynamic")
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
    n = _numel(q.shape)
    absmax = q.absmax_float32()
    if q.device.type == "cpu":
        return _dequantize_cpu(q.packed, absmax, n, q.blocksize, q.quant_type, q.dtype).view(
            q.shape
        )
    values = _levels(q.packed, q.quant_type)  # [2 * ceil(n / 2)] float32
    n_blocks = absmax.numel()
    if values.numel() != n_blocks * q.blocksize:  # a short last block or an odd pad nibble
        values = F.pad(values[:n], (0, n_blocks * q.blocksize - n))
    blocks = values.view(n_blocks, q.blocksize)  # [n_blocks, blocksize], a fresh buffer
    blocks.mul_(absmax[:, None])
    return blocks.reshape(-1)[:n].reshape(q.shape).to(q.dtype)


def _dequantize_cpu(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    n: int,
    blocksize: int,
    quant_type: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`dequantize_4bit` on CPU, [n] of `dtype`: chunk by chunk in NumPy, on a few threads.

    float32 and bfloat16 results are written straight into the output; the bfloat16 rounding is
    done on the float32 bits (as torch's cast does). Other dtypes, and scales that are not finite
    (where torch's cast has its own NaN bit patterns), are made in float32 and cast by torch.
    """
    packed, scales = packed.contiguous(), absmax.numpy()
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
    return values.view(torch.bfloat16) if as_bfloat16 else values.to(dtype)


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
    """The level of every nibble in `packed`, in order (high nibble first), float32."""
    table = _pair_table(quant_type, packed.device)  # [256, 2]
    if packed.device.type == "cpu":  # NumPy's take: far faster than torch's gather on CPU
        return torch.from_numpy(np.take(table.numpy(), packed.numpy(), axis=0).reshape(-1))
    return table[packed.long()].reshape(-1)


def pack_4bit(codes: torch.Tensor, pad_code: int = 0) -> torch.Tensor:
    """Pack uint8 codes (0..15) [n] into uint8 [ceil(n / 2)], high nibble first; an odd n is
    padded with `pad_code`."""
    if codes.dim() != 1 or codes.dtype != torch.uint8:
        raise ValueError("codes must be a 1-D uint8 tensor of values 0..15")
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad_code)])
    if codes.device.type == "cpu":
        packed = np.empty(codes.numel() // 2, np.uint8)
        _pack_pairs(codes.contiguous().numpy(), out=packed)
        return torch.from_numpy(packed)
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def _pack_pairs(codes: np.ndarray, out: np.ndarray) -> None:
    """`pack_4bit` for an even number of NumPy codes, written into `out` (uint8)."""
    if sys.byteorder == "little":
        # read each pair as one little-endian uint16 (first code in the low byte): 3x faster;
        # the uint16 result's low byte is (first << 4) | second, which the unsafe cast keeps
        pairs = codes.view(np.uint16)
        np.bitwise_or(pairs << 4, pairs >> 8, out=out, casting="unsafe")
    else:
        np.left_shift(codes[0::2], 4, out=out)
        out |= codes[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` codes (uint8) held in `packed` (inverse of `pack_4bit`)."""
    if packed.dim() != 1 or packed.dtype != torch.uint8 or not 0 <= n <= 2 * packed.numel():
        raise ValueError(f"packed must be a 1-D uint8 tensor holding at least {n} codes")
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]


# ---- bitsandbytes' serialized format --------------------------------------------------------
# bitsandbytes' Linear4bit saves its weight as these state-dict entries (prefix "weight"):
#   weight                 uint8 [ceil(n / 2), 1]  the packed codes
#   weight.absmax          float32 [n_blocks], or uint8 codes with double quantization
#   weight.quant_map       float32 [16]            the 4-bit table (NF4 or FP4)
#   weight.nested_absmax   float32 [n_blocks/256]  (double quantization)
#   weight.nested_quant_map float32 [256]          the dynamic map (double quantization)
#   weight.quant_state.bitsandbytes__nf4 (or __fp4) uint8 bytes of a JSON object with
#       quant_type, blocksize, dtype, shape (+ nested_blocksize, nested_dtype, nested_offset)
_BNB_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def to_bnb_state_dict(q: Quantized4bit, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The state-dict entries bitsandbytes' `Linear4bit` saves for a weight quantized as `q`;
    `Params4bit.from_prequantized` (what transformers uses) loads them."""
    if q.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes stores nf4 or fp4, not {q.quant_type!r}")
    if q.dtype not in _BNB_DTYPES.values():
        raise ValueError(f"bitsandbytes stores float32/bfloat16/float16 weights, not {q.dtype}")
    if q.blocksize not in _BNB_BLOCKSIZES:
        raise ValueError(f"bitsandbytes reads blocksizes {_BNB_BLOCKSIZES}, not {q.blocksize}")
    meta = {
        "quant_type": q.quant_type,
        "blocksize": q.blocksize,
        "dtype": str(q.dtype).removeprefix("torch."),
        "shape": list(q.shape),
    }
    entries = {
        prefix: q.packed.reshape(-1, 1),
        f"{prefix}.absmax": q.absmax,
        f"{prefix}.quant_map": code_for(q.quant_type, q.device),
    }
    if q.double_quant:
        entries[f"{prefix}.nested_absmax"] = q.absmax2
        entries[f"{prefix}.nested_quant_map"] = dynamic_map(q.device)
        meta |= {
            "nested_blocksize": DOUBLE_QUANT_BLOCKSIZE,
            "nested_dtype": "float32",
            "nested_offset": float(q.offset),
        }
    blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    entries[f"{prefix}.quant_state.bitsandbytes__{q.quant_type}"] = blob
    return entries


def from_bnb_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "weight"
) -> Quantized4bit:
    """Read a weight saved by bitsandbytes' `Linear4bit` (see `to_bnb_state_dict`).

    Dequantizes to exactly the values bitsandbytes gives. If the file's 8-bit map is not
    bit-identical to `dynamic_map()` (bitsandbytes builds it with float32 `torch.linspace`,
    whose last bits could differ between builds), its scales are decoded with the file's map
    and kept as float32, without double quantization, so the values still match exactly.
    """
    blob_keys = [k for k in state_dict if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if prefix not in state_dict or len(blob_keys) != 1:
        raise ValueError(
            f"no bitsandbytes 4-bit weight under {prefix!r}: need {prefix!r} and one "
            f"'{prefix}.quant_state.bitsandbytes__<nf4|fp4>' entry"
        )
    meta = json.loads(bytes(state_dict[blob_keys[0]].cpu().tolist()).decode("utf-8"))
    quant_type, blocksize = meta["quant_type"], int(meta["blocksize"])
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    packed = state_dict[prefix].reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)  # bitsandbytes may store the bytes as another dtype
    device = packed.device
    if not torch.equal(state_dict[f"{prefix}.quant_map"].to(device), code_for(quant_type, device)):
        raise ValueError(f"{prefix}.quant_map is not bitsandbytes' {quant_type} table")
    absmax, offset, absmax2 = state_dict[f"{prefix}.absmax"], None, None
    double_quant = f"{prefix}.nested_absmax" in state_dict
    if double_quant:
        absmax2 = state_dict[f"{prefix}.nested_absmax"].float()
        offset = torch.tensor(meta["nested_offset"], dtype=torch.float32, device=device)
        file_map = state_dict[f"{prefix}.nested_quant_map"].to(device)
        if not torch.equal(file_map, dynamic_map(device)):
            scales = _block_scales(absmax2, DOUBLE_QUANT_BLOCKSIZE, absmax.numel())
            absmax = file_map[absmax.long()] * scales + offset
            double_quant, offset, absmax2 = False, None, None
    return Quantized4bit(
        packed=packed,
        absmax=absmax,
        offset=offset,
        absmax2=absmax2,
        shape=tuple(meta["shape"]),
        dtype=_BNB_DTYPES[meta["dtype"]],
        blocksize=blocksize,
        quant_type=quant_type,
        double_quant=double_quant,
    )


# ---- internals ------------------------------------------------------------------------------


def _quantize_blocks(
    x: torch.Tensor, blocksize: int, table: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of float32 x [n] to the nearest level of `table` (ties to
    the lower). Returns (codes uint8 [n], absmax float32 [n_blocks])."""
    if x.device.type == "cpu":
        return _quantize_blocks_cpu(x, blocksize, table)
    return _quantize_blocks_tensor(x, blocksize, table)


def _quantize_blocks_tensor(
    x: torch.Tensor, blocksize: int, table: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_quantize_blocks` in tensor operations, for any device (what CUDA runs)."""
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
    return _nearest_code(scaled, table), absmax


def _quantize_blocks_cpu(
    x: torch.Tensor, blocksize: int, table: str, pack: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_quantize_blocks` on CPU: the same float32 steps in NumPy, on the tensor's own memory,
    for float32 or bfloat16 x (bfloat16 is the top half of a float32: widening it is exact).

    Chunk by chunk on a few threads, as the module docstring says; with `pack` the codes come
    back packed (`pack_4bit`, padded with the code of 0.0) instead of one per byte. NumPy
    passes and the 16-bit cell lookup of `_nearest_code_cpu` run several times faster here
    than PyTorch's CPU kernels (its binary search and gathers are slow).
    """
    x = x.contiguous()  # [n]; only read
    source = x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.numpy()
    n = source.size
    absmax = np.empty(-(-n // blocksize), np.float32)  # [n_blocks]
    codes = np.empty(-(-n // 2) if pack else n, np.uint8)
    pad_code = _search_table(table, torch.device("cpu")).pad_code
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
        np.multiply(blocks, inverse[:, None], out=scaled[:full].reshape(whole, blocksize))
        if full < stop - start:  # bitsandbytes divides a short last block
            scaled[full:] = values[full:] / np.maximum(scales[whole], np.float32(_TINY))
        chunk_codes = _nearest_code_cpu(scaled, table).numpy()
        if not pack:
            codes[start:stop] = chunk_codes
            return
        if chunk_codes.size % 2:  # only the last chunk can be odd
            chunk_codes = np.append(chunk_codes, np.uint8(pad_code))
        _pack_pairs(chunk_codes, out=codes[start // 2 : -(-stop // 2)])

    _run_chunks(quantize_chunk, n, chunk)
    return torch.from_numpy(codes), torch.from_numpy(absmax)


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


def _nearest_code(scaled: torch.Tensor, table: str) -> torch.Tensor:
    """Code of the nearest level: bucketize counts the float32 midpoints strictly below each
    value, which is the sorted position of the nearest level (ties go to the lower one)."""
    search = _search_table(table, scaled.device)
    position = torch.bucketize(scaled, search.midpoints)
    if search.order is None:  # levels already sorted: the position is the code
        return position.to(torch.uint8)
    return search.order[position]


def _nearest_code_cpu(scaled: np.ndarray, table: str) -> torch.Tensor:
    """The same codes as `_nearest_code`, for a float32 NumPy array, from a lookup on the top
    16 bits of each float32 (sign, exponent, 7 mantissa bits).

    All floats sharing those bits form a short interval, a "cell", holding at most one midpoint
    (checked when the tables are built). So the sorted position is `below[cell]` (midpoints
    under the cell) plus 1 if the value lies above the cell's midpoint `threshold[cell]`
    (+inf where the cell holds none): two lookups and a comparison instead of a binary search.
    """
    search = _search_table(table, torch.device("cpu"))
    # take() works on intp indices: convert the cells once, not in each of the two lookups
    cell = (scaled.view(np.uint32) >> 16).astype(np.intp)
    position = np.take(search.below, cell)
    position += scaled > np.take(search.threshold, cell)
    if search.order_np is not None:  # FP4: sorted position -> code
        position = np.take(search.order_np, position)
    return torch.from_numpy(position)


@dataclass(frozen=True)
class _Search:
    midpoints: torch.Tensor  # float32 [levels - 1], between the sorted levels
    order: torch.Tensor | None  # uint8 [levels]: sorted position -> code (None: identity)
    order_np: np.ndarray | None
    pad_code: int  # the code of 0.0
    below: np.ndarray  # uint8 [65536]: midpoints below each 16-bit cell
    threshold: np.ndarray  # float32 [65536]: the cell's midpoint, or +inf


@cache
def _search_table(table: str, device: torch.device) -> _Search:
    """Search tables for `table` ("nf4", "fp4", "int4" or "dynamic"), as in
    `lowrank.numpy.quant._nearest_code`: levels sorted stably, float32 midpoints."""
    code = reference.dynamic_map() if table == "dynamic" else reference.code_for(table)
    order = np.argsort(code, kind="stable").astype(np.uint8)
    levels = code[order]
    midpoints = (levels[:-1] + levels[1:]) / np.float32(2.0)
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
        midpoints=torch.from_numpy(midpoints).to(device),
        order=None if is_sorted else torch.from_numpy(order).to(device),
        order_np=None if is_sorted else order,
        pad_code=int(order[np.searchsorted(midpoints, 0.0, side="left")]),
        below=below.astype(np.uint8),
        threshold=threshold.astype(np.float32),
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

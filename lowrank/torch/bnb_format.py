"""bitsandbytes' serialized 4-bit format: the state-dict entries its `Linear4bit` saves, read
into and written from a `lowrank.torch.quantized.Quantized4bit`.

This is how QLoRA's 4-bit weights (NF4 or FP4; Dettmers et al. 2023, arXiv:2305.14314) are
stored in transformers checkpoints; double quantization stores the block scales themselves as
8-bit codes of the dynamic map (Dettmers et al. 2022, arXiv:2110.02861).
The codes and scales need no conversion: `quant.quantize_4bit` is bit-identical to
`bitsandbytes.functional.quantize_4bit` (tests/interop/test_bitsandbytes.py checks both
directions against bitsandbytes itself). Only the layout of the entries is bitsandbytes' own.
"""

import json
import math
import numbers
from collections.abc import Mapping

import torch

from lowrank._validate import ArgumentTypeError, check_blocksize
from lowrank.torch.codebooks import code_for, dynamic_map
from lowrank.torch.quantized import (
    DOUBLE_QUANT_BLOCKSIZE,
    FLOAT32_MAX,
    Quantized4bit,
    check_quantized,
)

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
_NESTED_META = ("nested_blocksize", "nested_dtype", "nested_offset")  # metadata keys
_NESTED_ENTRIES = (".nested_absmax", ".nested_quant_map")  # state-dict entries

__all__ = ["to_bnb_state_dict", "from_bnb_state_dict"]


def to_bnb_state_dict(q: Quantized4bit, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The state-dict entries bitsandbytes' `Linear4bit` saves for a weight quantized as `q`;
    `Params4bit.from_prequantized` (what transformers uses) loads them. `q` is checked first
    (`quantized.check_quantized`).

    For n = prod(q.shape) values in blocks of q.blocksize: `<prefix>` uint8 [ceil(n / 2), 1],
    `<prefix>.absmax` [n_blocks], `<prefix>.quant_map` float32 [16], with double quantization
    `<prefix>.nested_absmax` [ceil(n_blocks / 256)] and `<prefix>.nested_quant_map` float32
    [256], and the JSON metadata as uint8 bytes.

    Examples:
        >>> import torch
        >>> from lowrank.torch.bnb_format import to_bnb_state_dict
        >>> from lowrank.torch.quant import quantize_4bit
        >>> _ = torch.manual_seed(0)
        >>> q = quantize_4bit(torch.randn(8, 16), quant_type="nf4", blocksize=64)
        >>> state = to_bnb_state_dict(q)
        >>> for key, tensor in state.items():
        ...     if "quant_state" not in key:
        ...         print(key, tuple(tensor.shape), tensor.dtype)
        weight (64, 1) torch.uint8
        weight.absmax (2,) torch.uint8
        weight.quant_map (16,) torch.float32
        weight.nested_absmax (1,) torch.float32
        weight.nested_quant_map (256,) torch.float32
        >>> [key for key in state if "quant_state" in key]
        ['weight.quant_state.bitsandbytes__nf4']
    """
    check_quantized(q)
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

    Nothing in the file is trusted. Double quantization is recognised from any of its marks
    (a nested_* entry or metadata key, or uint8 absmax) and then needs every one of them; the
    packed bytes must fit prod(shape), absmax ceil(n / blocksize) and nested_absmax
    ceil(n_blocks / 256). A missing entry, malformed metadata or a contradiction raises
    ValueError naming the key (a wrong type `ArgumentTypeError`, a TypeError and a ValueError).

    Examples:
        >>> import torch
        >>> from lowrank.torch.bnb_format import from_bnb_state_dict, to_bnb_state_dict
        >>> from lowrank.torch.quant import dequantize_4bit, quantize_4bit
        >>> _ = torch.manual_seed(0)
        >>> q = quantize_4bit(torch.randn(8, 16), quant_type="nf4", blocksize=64)
        >>> state = to_bnb_state_dict(q)
        >>> back = from_bnb_state_dict(state)
        >>> back.shape, back.quant_type, back.double_quant
        ((8, 16), 'nf4', True)
        >>> torch.equal(dequantize_4bit(back), dequantize_4bit(q))
        True
        >>> del state["weight.nested_absmax"]
        >>> from_bnb_state_dict(state)
        Traceback (most recent call last):
            ...
        ValueError: the state dict lacks 'weight.nested_absmax', which double quantization ...
    """
    blob_key, meta = _read_meta(state_dict, prefix)
    quant_type, blocksize, dtype, shape = _read_layout(meta, blob_key)
    n = math.prod(shape)
    packed = _entry(state_dict, prefix, "").reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)  # bitsandbytes may store the bytes as another dtype
    if packed.numel() != -(-n // 2):
        raise ValueError(
            f"{prefix!r} holds {packed.numel()} bytes, but shape {list(shape)} in {blob_key} "
            f"needs ceil(n / 2) = {-(-n // 2)}"
        )
    device = packed.device
    quant_map = _entry(state_dict, prefix, ".quant_map")
    _check_dtype(f"{prefix}.quant_map", quant_map, torch.float32, "")
    table = code_for(quant_type, device)
    if quant_map.shape != table.shape or not torch.equal(quant_map.to(device), table):
        raise ValueError(f"{prefix}.quant_map is not bitsandbytes' {quant_type} table")
    absmax = _entry(state_dict, prefix, ".absmax")
    n_blocks = -(-n // blocksize)
    if absmax.shape != (n_blocks,):
        raise ValueError(
            f"{prefix}.absmax has shape {list(absmax.shape)}, but shape {list(shape)} and "
            f"blocksize {blocksize} in {blob_key} need [ceil(n / blocksize)] = [{n_blocks}]"
        )
    layout = dict(shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type)
    marks = [key for key in _NESTED_META if key in meta] + [
        prefix + suffix for suffix in _NESTED_ENTRIES if prefix + suffix in state_dict
    ]
    if not marks and absmax.dtype != torch.uint8:
        _check_dtype(f"{prefix}.absmax", absmax, torch.float32, "without double quantization")
        q = Quantized4bit(packed, absmax, None, None, double_quant=False, **layout)
        check_quantized(q)  # the rest: finite scales, one device
        return q

    why = f"double quantization ({', '.join(marks) or f'{prefix}.absmax is uint8'})"
    absmax2 = _entry(state_dict, prefix, ".nested_absmax", why)
    file_map = _entry(state_dict, prefix, ".nested_quant_map", why)
    nested_blocksize, nested_dtype, offset = (_meta(meta, k, blob_key, why) for k in _NESTED_META)
    if type(nested_blocksize) is not int or nested_blocksize != DOUBLE_QUANT_BLOCKSIZE:
        raise ValueError(
            f"{blob_key}: nested_blocksize must be {DOUBLE_QUANT_BLOCKSIZE}, got "
            f"{nested_blocksize!r}"
        )
    if nested_dtype != "float32":
        raise ValueError(f"{blob_key}: nested_dtype must be 'float32', got {nested_dtype!r}")
    if not isinstance(offset, numbers.Real) or isinstance(offset, bool):
        raise ValueError(f"{blob_key}: nested_offset must be a number, got {offset!r}")
    _check_dtype(f"{prefix}.absmax", absmax, torch.uint8, f"(codes) with {why}")
    _check_dtype(f"{prefix}.nested_absmax", absmax2, torch.float32, "")
    _check_dtype(f"{prefix}.nested_quant_map", file_map, torch.float32, "")
    if file_map.shape != (256,):
        raise ValueError(
            f"{prefix}.nested_quant_map must have shape [256], got {list(file_map.shape)}"
        )
    offset = torch.tensor(offset, dtype=torch.float32, device=device)
    q = Quantized4bit(packed, absmax, offset, absmax2, double_quant=True, **layout)
    check_quantized(q)  # the rest: nested_absmax's length, finite scales, one device
    file_map = file_map.to(device)
    if torch.equal(file_map, dynamic_map(device)):
        return q
    if not bool(torch.isfinite(file_map).all()):
        raise ValueError(f"{prefix}.nested_quant_map must be finite")
    # each block's scale from the file's map, [n_blocks] (as Quantized4bit.absmax_float32)
    scales = absmax2.repeat_interleave(DOUBLE_QUANT_BLOCKSIZE)[:n_blocks]
    rebuilt = (file_map[absmax.long()] * scales + offset).clamp_(-FLOAT32_MAX, FLOAT32_MAX)
    return Quantized4bit(packed, rebuilt, None, None, double_quant=False, **layout)


def _read_layout(meta: dict, blob_key: str) -> tuple[str, int, torch.dtype, tuple[int, ...]]:
    """quant_type, blocksize, dtype and shape from the metadata, each checked."""
    quant_type = _meta(meta, "quant_type", blob_key)
    if quant_type not in ("nf4", "fp4") or not blob_key.endswith(f"__{quant_type}"):
        raise ValueError(
            f"{blob_key}: quant_type must be 'nf4' or 'fp4', as in the key, got {quant_type!r}"
        )
    blocksize = _meta(meta, "blocksize", blob_key)
    if not isinstance(blocksize, int):
        raise ValueError(f"{blob_key}: blocksize must be an int, got {blocksize!r}")
    check_blocksize(blocksize)
    dtype = _meta(meta, "dtype", blob_key)
    if dtype not in _BNB_DTYPES:
        raise ValueError(f"{blob_key}: dtype must be one of {list(_BNB_DTYPES)}, got {dtype!r}")
    shape = _meta(meta, "shape", blob_key)
    if (
        not isinstance(shape, list)
        or not all(isinstance(size, int) and not isinstance(size, bool) for size in shape)
        or any(size < 0 for size in shape)
        or math.prod(shape) == 0
    ):
        raise ValueError(
            f"{blob_key}: shape must be a list of non-negative ints holding at least one "
            f"element, got {shape!r}"
        )
    return quant_type, blocksize, _BNB_DTYPES[dtype], tuple(shape)


def _read_meta(state_dict: Mapping[str, torch.Tensor], prefix: str) -> tuple[str, dict]:
    """The key of the JSON metadata blob under `prefix`, and the object it holds."""
    if not isinstance(state_dict, Mapping):
        raise ArgumentTypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    blob_keys = [k for k in state_dict if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if prefix not in state_dict or len(blob_keys) != 1:
        raise ValueError(
            f"no bitsandbytes 4-bit weight under {prefix!r}: need {prefix!r} and one "
            f"'{prefix}.quant_state.bitsandbytes__<nf4|fp4>' entry"
        )
    key = blob_keys[0]
    blob = state_dict[key]
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"{key} must be a 1-D uint8 tensor of JSON bytes")
    try:
        meta = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{key} does not hold valid UTF-8 JSON: {error}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key} must hold a JSON object, got {type(meta).__name__}")
    return key, meta


def _meta(meta: dict, name: str, blob_key: str, why: str = "") -> object:
    """meta[name], or a ValueError naming what is missing."""
    if name not in meta:
        raise ValueError(f"{blob_key} lacks {name!r}" + (f", which {why} needs" if why else ""))
    return meta[name]


def _entry(
    state_dict: Mapping[str, torch.Tensor], prefix: str, suffix: str, why: str = ""
) -> torch.Tensor:
    key = prefix + suffix
    if key not in state_dict:
        raise ValueError(f"the state dict lacks {key!r}" + (f", which {why} needs" if why else ""))
    value = state_dict[key]
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{key} must be a tensor, got {type(value).__name__}")
    return value


def _check_dtype(key: str, t: torch.Tensor, dtype: torch.dtype, when: str) -> None:
    if t.dtype != dtype:
        when = f" {when}" if when else ""
        raise ArgumentTypeError(f"{key} must be {dtype}{when}, got {t.dtype}")

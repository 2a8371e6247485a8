"""bitsandbytes' serialized 4-bit format: the state-dict entries its `Linear4bit` saves, read
into and written from a `lowrank.torch.quant.Quantized4bit`.

The codes and scales need no conversion: `quant.quantize_4bit` is bit-identical to
`bitsandbytes.functional.quantize_4bit` (tests/interop/test_bitsandbytes.py checks both
directions against bitsandbytes itself). Only the layout of the entries is bitsandbytes' own.
"""

import json
from collections.abc import Mapping

import torch

from lowrank._validate import check_blocksize, check_quant_type
from lowrank.torch.quant import DOUBLE_QUANT_BLOCKSIZE, Quantized4bit, code_for, dynamic_map

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
    check_quant_type(quant_type)
    check_blocksize(blocksize)
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
            # each block's scale of its absmax code, [n_blocks] (as Quantized4bit.absmax_float32)
            scales = absmax2.repeat_interleave(DOUBLE_QUANT_BLOCKSIZE)[: absmax.numel()]
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

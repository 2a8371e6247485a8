"""lowrank.torch.bnb_format without bitsandbytes installed: the entries and their metadata, a
round trip back to the same quantized tensor, and the errors. Reading and writing files that
bitsandbytes itself made and loads is in tests/interop/test_bitsandbytes.py."""

import json

import pytest
import torch

from lowrank.torch import dequantize_4bit, from_bnb_state_dict, quantize_4bit, to_bnb_state_dict
from lowrank.torch.quant import code_for, dynamic_map


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip(quant_type, double_quant, dtype):
    w = torch.randn(70, 33, generator=torch.Generator().manual_seed(0)).to(dtype)
    q = quantize_4bit(w, blocksize=128, quant_type=quant_type, double_quant=double_quant)
    back = from_bnb_state_dict(to_bnb_state_dict(q, prefix="layer.weight"), prefix="layer.weight")
    assert (back.shape, back.dtype, back.blocksize) == ((70, 33), dtype, 128)
    assert (back.quant_type, back.double_quant) == (quant_type, double_quant)
    assert torch.equal(back.packed, q.packed) and torch.equal(back.absmax, q.absmax)
    if double_quant:
        assert torch.equal(back.absmax2, q.absmax2) and torch.equal(back.offset, q.offset)
    assert torch.equal(dequantize_4bit(back), dequantize_4bit(q))


def test_entries_and_metadata():
    q = quantize_4bit(torch.randn(5, 7), blocksize=64, quant_type="nf4", double_quant=True)
    entries = to_bnb_state_dict(q)
    assert entries["weight"].shape == (18, 1) and entries["weight"].dtype == torch.uint8
    assert torch.equal(entries["weight.quant_map"], code_for("nf4"))
    assert torch.equal(entries["weight.nested_quant_map"], dynamic_map())
    meta = json.loads(bytes(entries["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta == {
        "quant_type": "nf4",
        "blocksize": 64,
        "dtype": "float32",
        "shape": [5, 7],
        "nested_blocksize": 256,
        "nested_dtype": "float32",
        "nested_offset": float(q.offset),
    }
    plain = to_bnb_state_dict(quantize_4bit(torch.randn(5, 7), double_quant=False))
    assert not any("nested" in key for key in plain)


def test_a_different_8bit_map_decodes_to_float32_scales():
    q = quantize_4bit(torch.randn(64 * 300), double_quant=True)
    entries = to_bnb_state_dict(q)
    entries["weight.nested_quant_map"] = dynamic_map() * 1.0000001  # another build's last bits
    back = from_bnb_state_dict(entries)
    assert not back.double_quant and back.absmax.dtype == torch.float32
    codes = q.absmax.long()
    scales = q.absmax2.repeat_interleave(256)[:300]
    assert torch.equal(back.absmax, entries["weight.nested_quant_map"][codes] * scales + q.offset)


def test_errors():
    with pytest.raises(ValueError, match="nf4 or fp4"):
        to_bnb_state_dict(quantize_4bit(torch.randn(8, 8), quant_type="int4"))
    with pytest.raises(ValueError, match="blocksizes"):
        to_bnb_state_dict(quantize_4bit(torch.randn(8, 8), blocksize=16))
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        to_bnb_state_dict(quantize_4bit(torch.randn(8, 8, dtype=torch.float64)))
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit weight"):
        from_bnb_state_dict({"weight": torch.zeros(4, 1, dtype=torch.uint8)})
    entries = to_bnb_state_dict(quantize_4bit(torch.randn(8, 8)))
    entries["weight.quant_map"] = code_for("fp4")
    with pytest.raises(ValueError, match="quant_map"):
        from_bnb_state_dict(entries)

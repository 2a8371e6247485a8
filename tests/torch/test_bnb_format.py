"""lowrank.torch.bnb_format without bitsandbytes installed: the entries and their metadata, a
round trip back to the same quantized tensor, and the errors: a state dict whose entries are
missing, malformed or contradict each other is refused, never decoded. Reading and writing
files that bitsandbytes itself made and loads is in tests/interop/test_bitsandbytes.py."""

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank._validate import ArgumentTypeError
from lowrank.torch import dequantize_4bit, from_bnb_state_dict, quantize_4bit, to_bnb_state_dict
from lowrank.torch.codebooks import code_for, dynamic_map


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


# ---- state dicts that contradict themselves ----

BLOB = "weight.quant_state.bitsandbytes__nf4"


def entries_of(shape=(70, 33), double_quant=True, blocksize=64, quant_type="nf4"):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(math.prod(shape)))
    q = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    return q, to_bnb_state_dict(q)


def meta_of(entries, key=BLOB) -> dict:
    return json.loads(bytes(entries[key].tolist()))


def with_meta(entries, meta, key=BLOB) -> dict:
    blob = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return {**entries, key: blob}


def test_double_quant_without_nested_absmax_is_refused():
    """The file says double quantization (nested_* metadata, uint8 absmax) but lacks the
    absmax2 entry: it was decoded as plain float32 scales, each uint8 code read as a float
    (values ~1600x too large). Every mark of double quantization now requires all of it."""
    q, entries = entries_of()
    del entries["weight.nested_absmax"]
    with pytest.raises(ValueError, match="lacks 'weight.nested_absmax'.*double quantization"):
        from_bnb_state_dict(entries)
    # the metadata keys gone as well: the uint8 absmax alone still says double quantization
    meta = {k: v for k, v in meta_of(entries).items() if not k.startswith("nested")}
    bare = with_meta({k: v for k, v in entries.items() if "nested" not in k}, meta)
    with pytest.raises(ValueError, match="weight.absmax is uint8"):
        from_bnb_state_dict(bare)
    # and a plain file given a nested key is refused the same way
    _, plain = entries_of(double_quant=False)
    meta = meta_of(plain) | {"nested_offset": 0.5}
    with pytest.raises(ValueError, match="nested_absmax"):
        from_bnb_state_dict(with_meta(plain, meta))


@pytest.mark.parametrize(
    "blob",
    [b"{not json", b"\xff\xfe", b"[1, 2]", b'"nf4"', b""],
    ids=["broken", "not utf-8", "a list", "a string", "empty"],
)
def test_malformed_metadata_is_a_value_error_naming_the_key(blob):
    _, entries = entries_of()
    entries[BLOB] = torch.tensor(list(blob), dtype=torch.uint8)
    with pytest.raises(ValueError, match=BLOB) as error:
        from_bnb_state_dict(entries)
    assert type(error.value) is ValueError  # not JSONDecodeError / UnicodeDecodeError


@pytest.mark.parametrize("key", ["quant_type", "blocksize", "dtype", "shape", "nested_offset",
                                 "nested_blocksize", "nested_dtype"])  # fmt: skip
def test_missing_metadata_is_named(key):
    _, entries = entries_of()
    meta = meta_of(entries)
    del meta[key]
    with pytest.raises(ValueError, match=f"lacks '{key}'"):
        from_bnb_state_dict(with_meta(entries, meta))


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"shape": [70, 34]}, r"holds 1155 bytes, but shape \[70, 34\].*needs"),
        ({"shape": [70, 32]}, r"holds 1155 bytes"),  # fewer: refused, never truncated
        ({"blocksize": 128}, r"absmax has shape \[37\].*need \[ceil\(n / blocksize\)\]"),
        ({"blocksize": 48}, "blocksize must be a positive power of two"),
        ({"blocksize": "64"}, "blocksize must be an int"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"quant_type": "fp4"}, "quant_type must be 'nf4' or 'fp4', as in the key"),
        ({"shape": "70x33"}, "shape must be a list"),
        ({"shape": [0, 33]}, "at least one element"),
        ({"nested_blocksize": 128}, "nested_blocksize must be 256"),
        ({"nested_dtype": "float16"}, "nested_dtype must be 'float32'"),
        ({"nested_offset": "0.5"}, "nested_offset must be a number"),
        ({"nested_offset": float("nan")}, "offset must be finite"),
        ({"nested_offset": 1e300}, "offset must be finite"),  # beyond float32
    ],
)
def test_metadata_that_contradicts_the_data_is_refused(changes, match):
    _, entries = entries_of()
    with pytest.raises(ValueError, match=match):
        from_bnb_state_dict(with_meta(entries, meta_of(entries) | changes))


def test_entries_that_contradict_the_metadata_are_refused():
    q, entries = entries_of()
    for key, value, match in [
        ("weight", entries["weight"][:-1], "holds 1154 bytes"),
        ("weight.absmax", entries["weight.absmax"][:-1], r"absmax has shape \[36\]"),
        ("weight.absmax", q.absmax_float32(), "absmax must be torch.uint8"),
        ("weight.nested_absmax", torch.ones(2), r"absmax2 must have shape \[1\]"),
        ("weight.nested_absmax", torch.ones(1, dtype=torch.float64), "nested_absmax must be"),
        ("weight.nested_absmax", torch.full((1,), float("nan")), "absmax2 must be finite"),
        ("weight.nested_quant_map", dynamic_map()[:255], "nested_quant_map must have shape"),
        ("weight.nested_quant_map", dynamic_map().double(), "nested_quant_map must be torch.f"),
        ("weight.quant_map", code_for("nf4")[:8], "quant_map is not"),
        ("weight.absmax", entries["weight.absmax"].tolist(), "weight.absmax must be a tensor"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            from_bnb_state_dict({**entries, key: value})
    nan_map = dynamic_map().clone()
    nan_map[3] = float("nan")  # a "different" 8-bit map, decoded with the file's own values
    with pytest.raises(ValueError, match="nested_quant_map must be finite"):
        from_bnb_state_dict({**entries, "weight.nested_quant_map": nan_map})
    _, plain = entries_of(double_quant=False)
    with pytest.raises(TypeError, match="absmax must be torch.float32 without double"):
        from_bnb_state_dict({**plain, "weight.absmax": plain["weight.absmax"].half()})


def test_to_bnb_state_dict_checks_its_input():
    q, _ = entries_of()
    with pytest.raises(ValueError, match="absmax2"):
        to_bnb_state_dict(dataclasses.replace(q, absmax2=torch.ones(3)))


# a tampering: (what, how) -> a new state dict; every one must be refused
NESTED = ["weight.nested_absmax", "weight.nested_quant_map"]
META_VALUES = {
    "quant_type": ["fp4", "int4", 4, None, "NF4"],
    "blocksize": [48, "64", 64.0, True, None, 0],
    "dtype": ["float64", "int8", None, 3, "torch.float32"],
    "shape": ["70x33", None, [70, -33], [70.0, 33], [[70], [33]], [0]],
    "nested_blocksize": [128, "256", True, None, 256.0],
    "nested_dtype": ["float16", None, 32, "torch.float32"],
    "nested_offset": ["0.5", None, True, [0.5], float("nan"), float("inf"), 1e39],
}


def tamper_entries(entries: dict, blob_key: str, double_quant: bool, n: int, blocksize: int, draw):
    """(kind, entries with one thing made inconsistent), drawn with `draw`."""
    entries = dict(entries)
    meta = meta_of(entries, blob_key)
    kind = draw(st.sampled_from(["drop entry", "drop meta", "meta value", "meta shape",
                                 "meta blocksize", "blob", "tensor", "add nested"]))  # fmt: skip
    if kind == "drop entry":
        del entries[draw(st.sampled_from(sorted(entries)))]
    elif kind == "drop meta":
        del meta[draw(st.sampled_from(sorted(meta)))]
        entries = with_meta(entries, meta, blob_key)
    elif kind == "meta value":
        key = draw(st.sampled_from(sorted(k for k in META_VALUES if k in meta)))
        meta[key] = draw(
            st.sampled_from([v for v in META_VALUES[key] if repr(v) != repr(meta[key])])
        )
        entries = with_meta(entries, meta, blob_key)
    elif kind == "meta shape":  # a shape whose n needs another number of bytes
        meta["shape"] = [n + 2 * draw(st.sampled_from([-1, 1, 2, 50]))]
        if meta["shape"][0] <= 0:
            meta["shape"] = [n + 2]
        entries = with_meta(entries, meta, blob_key)
    elif kind == "meta blocksize":  # another power of two: another number of blocks
        others = [b for b in (16, 32, 64, 128, 256, 512) if -(-n // b) != -(-n // blocksize)]
        meta["blocksize"] = draw(st.sampled_from(others or [48]))  # n = 7: one block at any
        entries = with_meta(entries, meta, blob_key)
    elif kind == "blob":
        how = draw(st.sampled_from(["bytes", "list", "int64", "2-D", "truncated"]))
        blob = entries[blob_key]
        if how == "bytes":
            blob = torch.tensor(list(draw(st.binary(max_size=40))), dtype=torch.uint8)
        elif how == "list":
            blob = torch.tensor(list(json.dumps(list(meta.items())).encode()), dtype=torch.uint8)
        elif how == "int64":
            blob = blob.long()
        elif how == "2-D":
            blob = blob.reshape(1, -1)
        else:
            blob = blob[: draw(st.integers(0, blob.numel() - 1))]
        entries[blob_key] = blob
    elif kind == "tensor":
        key = draw(st.sampled_from(sorted(k for k in entries if k != blob_key)))
        t = entries[key]
        how = draw(st.sampled_from(["shorter", "longer", "dtype", "list", "non-finite"]))
        if how == "shorter":
            t = t.reshape(-1)[: -draw(st.integers(1, t.numel()))]
        elif how == "longer":
            t = torch.cat([t.reshape(-1), t.reshape(-1)[:1]])
        elif how == "dtype":
            wrong = [torch.float16, torch.float64, torch.int32, torch.uint8, torch.float32]
            t = t.to(draw(st.sampled_from([d for d in wrong if d != t.dtype])))
        elif how == "list":
            t = t.tolist()
        elif t.dtype == torch.float32:  # non-finite: a scale, a table entry
            t = t.clone()
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = float("nan")
        else:  # uint8 codes have no non-finite value: a missing byte instead
            t = t.reshape(-1)[:-1]
        entries[key] = t
    else:  # add a mark of double quantization to a plain file, or remove all of one from a DQ
        if double_quant:
            del entries[draw(st.sampled_from(NESTED))]
        else:
            meta[draw(st.sampled_from(["nested_offset", "nested_blocksize", "nested_dtype"]))] = 1
            entries = with_meta(entries, meta, blob_key)
    return kind, entries


@settings(max_examples=100, deadline=None)
@given(
    shape=st.sampled_from([(70, 33), (7,), (1000,), (3, 300)]),
    blocksize=st.sampled_from([32, 64, 256]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    data=st.data(),
)
def test_tampered_state_dict_is_refused(shape, blocksize, quant_type, double_quant, data):
    """Any one entry dropped, any metadata key dropped or given a wrong value, a shape or a
    blocksize that contradicts the data, a broken blob, a tensor cut, grown, retyped or made
    non-finite: ValueError or TypeError, never KeyError, JSONDecodeError or a decode."""
    n = math.prod(shape)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(n))
    q = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    blob_key = f"weight.quant_state.bitsandbytes__{quant_type}"
    entries = to_bnb_state_dict(q)
    kind, bad = tamper_entries(entries, blob_key, double_quant, n, blocksize, data.draw)
    with pytest.raises((ValueError, TypeError)) as error:
        from_bnb_state_dict(bad)
    assert type(error.value) in (ValueError, TypeError, ArgumentTypeError), (kind, error.value)

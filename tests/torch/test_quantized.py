"""lowrank.torch.quantized: the storage cost of a Quantized4bit, its scales, moving it between
devices, and refusal of every inconsistent one before either decoder (the CPU kernels, the
tensor path) is reached; on CUDA without reading values."""

import dataclasses
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank.torch import quant, quant_cpu
from lowrank.torch.codebooks import dynamic_map
from lowrank.torch.quant import dequantize_4bit, quantize_4bit
from lowrank.torch.quantized import Quantized4bit, check_quantized

QUANT_TYPES = ["nf4", "fp4", "int4"]


def test_nbytes_4096_square():
    q = quantize_4bit(torch.randn(4096, 4096), blocksize=64, quant_type="nf4", double_quant=True)
    n = 4096 * 4096
    # 4 + 8 / 64 + 32 / (64 * 256) bits per weight, plus a 4-byte offset
    assert q.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert q.nbytes * 8 / n == pytest.approx(4.127, abs=5e-4)


def test_absmax_float32_rebuild_formula():
    q = quantize_4bit(torch.randn(64 * 300))
    table = dynamic_map()
    expected = table[q.absmax.long()] * q.absmax2.repeat_interleave(256)[:300] + q.offset
    assert torch.equal(q.absmax_float32(), expected)


def test_to_device_and_meta_shapes():
    q = quantize_4bit(torch.randn(10, 10))
    moved = q.to("meta")
    assert moved.packed.is_meta and moved.nbytes == q.nbytes


def valid(double_quant=True, n=200, blocksize=16) -> Quantized4bit:
    w = torch.randn(n, generator=torch.Generator().manual_seed(n))
    return quantize_4bit(w, blocksize=blocksize, double_quant=double_quant)


@pytest.mark.parametrize(
    "double_quant,changes,match",
    [
        (True, dict(double_quant=False), "absmax must be a torch.float32 tensor.*=False"),
        (False, dict(double_quant=True), "absmax must be a torch.uint8 tensor.*=True"),
        (True, dict(double_quant="no"), "double_quant must be True or False"),
        (True, dict(quant_type="fp8"), "quant_type"),
        (True, dict(blocksize=100), "blocksize must be a positive power of two"),
        (True, dict(blocksize=64), r"absmax must have shape \[4\].*ceil\(200 / 64\)"),
        (True, dict(shape=(202,)), r"packed must have shape \[101\]"),
        (True, dict(shape=(10, 10)), r"packed must have shape \[50\].*shape \(10, 10\)"),
        (True, dict(shape=(4, 0)), "at least one element"),
        (True, dict(shape=[200]), "shape must be a tuple of ints"),
        (True, dict(shape=(200.0,)), "shape must be a tuple of ints"),
        (True, dict(dtype=torch.int8), "dtype must be one of"),
        (True, dict(dtype=np.float32), "dtype must be one of"),
        (True, dict(offset=None), "offset is missing"),
        (True, dict(offset=torch.tensor(float("nan"))), "offset must be finite"),
        (True, dict(offset=torch.tensor(0.5, dtype=torch.float64)), "offset must be a torch.f"),
        (True, dict(offset=0.5), "offset must be a torch.float32 tensor.*got float"),
        (True, dict(offset=torch.ones(1)), r"offset must have shape \[\]"),
        (True, dict(absmax2=None), "absmax2 must be a torch.float32 tensor"),
        (True, dict(absmax2=torch.ones(2)), r"absmax2 must have shape \[1\]"),
        (True, dict(absmax2=torch.full((1,), float("inf"))), "absmax2 must be finite"),
        (True, dict(absmax2=torch.ones(1, device="meta")), "absmax2 is on meta"),
        (False, dict(offset=torch.tensor(0.0)), "offset must be None without double quant"),
        (False, dict(absmax2=torch.ones(1)), "absmax2 must be None"),
        (False, dict(absmax=torch.full((13,), float("nan"))), "absmax must be finite"),
        (False, dict(absmax=torch.ones(13, dtype=torch.float16)), "absmax must be a torch.f"),
        (False, dict(absmax=torch.ones(12)), r"absmax must have shape \[13\]"),
        (False, dict(packed=torch.zeros(99, dtype=torch.uint8)), r"packed must have shape"),
        (False, dict(packed=torch.zeros(100, 1, dtype=torch.uint8)), r"packed must have shape"),
        (False, dict(packed=torch.zeros(100, dtype=torch.int8)), "packed must be a torch.uint8"),
        (False, dict(packed=np.zeros(100, np.uint8)), "packed must be a torch.uint8.*ndarray"),
    ],
)
def test_inconsistent_quantized_is_refused(double_quant, changes, match):
    bad = dataclasses.replace(valid(double_quant), **changes)
    with pytest.raises((ValueError, TypeError), match=match):
        dequantize_4bit(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        check_quantized(bad)


def test_every_entry_point_checks():
    bad = dataclasses.replace(valid(), absmax2=torch.ones(5))
    for call in (dequantize_4bit, lambda q: q.absmax_float32(), lambda q: q.nbytes):
        with pytest.raises(ValueError, match="absmax2"):
            call(bad)
    # nbytes reads sizes only (it also works on the meta device, where nothing can be read)
    assert dataclasses.replace(valid(), offset=torch.tensor(float("inf"))).nbytes == valid().nbytes
    with pytest.raises(TypeError, match="Quantized4bit"):
        dequantize_4bit(torch.zeros(4, dtype=torch.uint8))


def tamper(q: Quantized4bit, kind: str, draw) -> tuple[Quantized4bit, tuple[str, ...]]:
    """q with one field made inconsistent as `kind` says, and the words one of which the error
    must contain (the field, or the field it contradicts)."""
    n = q.packed.numel() * 2  # n or n + 1; n itself from the shape:
    n = int(np.prod(q.shape))
    n_blocks = q.absmax.numel()
    if kind == "double_quant flipped":
        return dataclasses.replace(q, double_quant=not q.double_quant), ("double_quant",)
    if kind == "double_quant not a bool":
        value = draw(st.sampled_from(["no", "yes", 1, 0, None, torch.tensor(True)]))
        return dataclasses.replace(q, double_quant=value), ("double_quant",)
    if kind == "quant_type unknown":
        value = draw(st.sampled_from(["nf5", "NF4", "", None, 4, "dynamic"]))
        return dataclasses.replace(q, quant_type=value), ("quant_type",)
    if kind == "blocksize not a power of two":
        value = draw(st.sampled_from([0, -64, 3, 48, 64.0, True, "64", None]))
        return dataclasses.replace(q, blocksize=value), ("blocksize",)
    if kind == "blocksize another power of two":
        value = draw(st.sampled_from([b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
                                      if -(-n // b) != n_blocks]))  # fmt: skip
        return dataclasses.replace(q, blocksize=value), ("blocksize",)
    if kind == "shape needs more codes":
        return dataclasses.replace(q, shape=(n + draw(st.integers(2, 9)),)), ("shape",)
    if kind == "shape needs fewer codes":
        return dataclasses.replace(q, shape=(max(n - draw(st.integers(2, n + 1)), 0),)), ("shape",)
    if kind == "shape not ints":
        value = draw(st.sampled_from([[n], (float(n),), (True,) * n, str(n), None, (n, -1)]))
        return dataclasses.replace(q, shape=value), ("shape",)
    if kind == "dtype not float":
        value = draw(st.sampled_from([torch.int32, torch.uint8, torch.bool, torch.complex64,
                                      "float32", None, float, np.float32]))  # fmt: skip
        return dataclasses.replace(q, dtype=value), ("dtype",)
    if kind in ("packed", "absmax", "absmax2"):
        t = getattr(q, kind)
        if t is None:  # absmax2 without double quantization: must stay None
            return dataclasses.replace(q, absmax2=torch.ones(1)), ("absmax2",)
        how = draw(st.sampled_from(["shorter", "longer", "2-D", "dtype", "numpy", "None", "meta"]))
        if how == "shorter":
            t = t[: -draw(st.integers(1, t.numel()))]
        elif how == "longer":
            t = torch.cat([t, t[: draw(st.integers(1, t.numel()))]])
        elif how == "2-D":
            t = t.reshape(1, -1)
        elif how == "dtype":
            wrong = [torch.int8, torch.int16, torch.float16, torch.float64, torch.float32,
                     torch.uint8, torch.bfloat16]  # fmt: skip
            t = t.to(draw(st.sampled_from([d for d in wrong if d != t.dtype])))
        elif how == "numpy":
            t = t.numpy()
        elif how == "None":
            t = None
        else:  # on another device than packed (or packed away from the scales)
            t = t.to("meta")
        return dataclasses.replace(q, **{kind: t}), (kind, "packed")
    if kind == "scale not finite":
        value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        name = draw(st.sampled_from(["absmax2", "offset"])) if q.double_quant else "absmax"
        t = getattr(q, name).clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = value
        return dataclasses.replace(q, **{name: t}), (name,)
    if kind == "offset":
        if not q.double_quant:
            return dataclasses.replace(q, offset=torch.tensor(0.0)), ("offset",)
        value = draw(st.sampled_from([None, 0.5, torch.tensor(0.5, dtype=torch.float64),
                                      torch.ones(1), torch.ones(()).to("meta")]))  # fmt: skip
        return dataclasses.replace(q, offset=value), ("offset",)
    raise AssertionError(kind)


TAMPERINGS = [
    "double_quant flipped",
    "double_quant not a bool",
    "quant_type unknown",
    "blocksize not a power of two",
    "blocksize another power of two",
    "shape needs more codes",
    "shape needs fewer codes",
    "shape not ints",
    "dtype not float",
    "packed",
    "absmax",
    "absmax2",
    "scale not finite",
    "offset",
]


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 700),
    blocksize=st.sampled_from([2, 16, 64]),
    quant_type=st.sampled_from(QUANT_TYPES),
    double_quant=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    kind=st.sampled_from(TAMPERINGS),
    data=st.data(),
)
def test_tampered_quantized_is_refused_never_decoded(
    n, blocksize, quant_type, double_quant, dtype, kind, data
):
    """Neither decoder (the CPU kernels, the tensor path) is ever reached with a tampered q."""
    w = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    q = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    if kind == "blocksize another power of two" and -(-n // 512) == -(-n // blocksize) == 1:
        kind = "blocksize not a power of two"  # one block at every size: nothing to contradict
    bad, names = tamper(q, kind, data.draw)
    decoded = AssertionError("decoded a tampered Quantized4bit")
    with (
        mock.patch.object(quant_cpu, "dequantize", side_effect=decoded),
        mock.patch.object(quant, "_dequantize", side_effect=decoded),
        pytest.raises((ValueError, TypeError)) as error,
    ):
        dequantize_4bit(bad)
    assert any(name in str(error.value) for name in names), (kind, str(error.value))


@pytest.mark.cuda
def test_cuda_refuses_inconsistent_metadata_without_reading_values():
    q = quantize_4bit(torch.randn(200, device="cuda"), blocksize=16)
    for changes, match in [
        (dict(shape=(202,)), "packed must have shape"),
        (dict(absmax2=q.absmax2.cpu()), "absmax2 is on cpu"),
        (dict(double_quant=False), "absmax must be a torch.float32 tensor"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            dequantize_4bit(dataclasses.replace(q, **changes))
    # the values are not read on CUDA (that would be a host sync): a NaN offset decodes to NaN
    nan = dataclasses.replace(q, offset=torch.tensor(float("nan"), device="cuda"))
    assert torch.isnan(dequantize_4bit(nan)).all()

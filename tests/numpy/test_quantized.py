"""lowrank.numpy.quantized: the storage cost of a Quantized4bit, and refusal of every inconsistent
one (by `check_quantized`, and before anything is decoded by every entry point)."""

import dataclasses
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank.numpy import quant
from lowrank.numpy.quant import dequantize_4bit, quantize_4bit
from lowrank.numpy.quantized import DOUBLE_QUANT_BLOCKSIZE, Quantized4bit, check_quantized

QUANT_TYPES = ["nf4", "fp4", "int4"]


def test_nbytes_nf4_double_quant_bits_per_weight():
    n = 1024 * 1024
    q = quantize_4bit(np.random.default_rng(0).standard_normal(n).astype(np.float32))
    # 4 bits + 8 / 64 (absmax codes) + 32 / (64 * 256) (absmax2) + 32 / n (offset)
    expected_bits = 4 + 8 / 64 + 32 / (64 * DOUBLE_QUANT_BLOCKSIZE) + 32 / n
    assert q.nbytes * 8 / n == pytest.approx(expected_bits, rel=1e-12)
    assert q.nbytes * 8 / n == pytest.approx(4.127, abs=5e-4)
    plain = quantize_4bit(np.ones(n, np.float32), double_quant=False)
    assert plain.nbytes == n // 2 + 4 * n // 64


def valid(double_quant=True, n=200, blocksize=16) -> Quantized4bit:
    w = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    return quantize_4bit(w, blocksize=blocksize, double_quant=double_quant)


@pytest.mark.parametrize(
    "double_quant,changes,match",
    [
        (True, dict(double_quant=False), "absmax must be a float32 array.*double_quant=False"),
        (False, dict(double_quant=True), "absmax must be a uint8 array.*double_quant=True"),
        (True, dict(double_quant="no"), "double_quant must be True or False"),
        (True, dict(quant_type="nf5"), "quant_type"),
        (True, dict(blocksize=48), "blocksize must be a positive power of two"),
        (True, dict(blocksize=32), r"absmax must be 1-D with 7 entries.*ceil\(200 / 32\)"),
        (True, dict(shape=(201,)), r"packed must be 1-D with 101 entries"),
        (True, dict(shape=(10, 10)), r"packed must be 1-D with 50 entries.*shape \(10, 10\)"),
        (True, dict(shape=(0, 3)), "at least one element"),
        (True, dict(shape=[200]), "shape must be a tuple of ints"),
        (True, dict(shape=(200.0,)), "shape must be a tuple of ints"),
        (True, dict(dtype=np.dtype(np.int32)), "dtype must be the floating-point dtype"),
        (True, dict(dtype="float32"), "dtype must be the floating-point dtype"),
        (True, dict(offset=None), "offset is missing"),
        (True, dict(offset=np.float32(np.nan)), "offset must be finite"),
        (True, dict(offset=0.5), "offset must be a float32 scalar"),
        (True, dict(offset=np.ones(1, np.float32)), "offset must be a scalar"),
        (True, dict(absmax2=None), "absmax2 must be a float32 array"),
        (True, dict(absmax2=np.ones(2, np.float32)), "absmax2 must be 1-D with 1 entries"),
        (True, dict(absmax2=np.full(1, np.inf, np.float32)), "absmax2 must be finite"),
        (False, dict(offset=np.float32(0)), "offset must be None without double quantization"),
        (False, dict(absmax2=np.ones(1, np.float32)), "absmax2 must be None"),
        (False, dict(absmax=np.full(13, np.nan, np.float32)), "absmax must be finite"),
        (False, dict(absmax=np.ones(13)), "absmax must be a float32 array.*got float64"),
        (False, dict(absmax=np.ones(12, np.float32)), "absmax must be 1-D with 13 entries"),
        (False, dict(packed=np.zeros(99, np.uint8)), "packed must be 1-D with 100 entries"),
        (False, dict(packed=np.zeros((100, 1), np.uint8)), "packed must be 1-D"),
        (False, dict(packed=np.zeros(100, np.int8)), "packed must be a uint8 array"),
        (False, dict(packed=[0] * 100), "packed must be a uint8 array.*got list"),
    ],
)
def test_inconsistent_quantized_is_refused(double_quant, changes, match):
    bad = dataclasses.replace(valid(double_quant), **changes)
    with pytest.raises((ValueError, TypeError), match=match):
        dequantize_4bit(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        check_quantized(bad)


def test_every_entry_point_checks():
    bad = dataclasses.replace(valid(), absmax2=np.ones(5, np.float32))
    for call in (dequantize_4bit, lambda q: q.absmax_float32(), lambda q: q.nbytes):
        with pytest.raises(ValueError, match="absmax2"):
            call(bad)
    # nbytes reads sizes only: a non-finite scale does not change what must be stored
    assert dataclasses.replace(valid(), offset=np.float32(np.inf)).nbytes == valid().nbytes
    with pytest.raises(TypeError, match="Quantized4bit"):
        dequantize_4bit(np.zeros(4, np.uint8))


def tamper(q: Quantized4bit, kind: str, draw) -> tuple[Quantized4bit, tuple[str, ...]]:
    """q with one field made inconsistent in the way `kind` says, and the words one of which
    the error must contain (the field, or the field it contradicts)."""
    n = int(np.prod(q.shape))
    n_blocks = q.absmax.size
    if kind == "double_quant flipped":
        return dataclasses.replace(q, double_quant=not q.double_quant), ("double_quant",)
    if kind == "double_quant not a bool":
        value = draw(st.sampled_from(["no", "yes", 1, 0, None, 1.0]))
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
        fewer = draw(st.integers(2, n + 1))  # n - fewer + 1 >= 0... down to an empty shape
        return dataclasses.replace(q, shape=(max(n - fewer, 0),)), ("shape",)
    if kind == "shape not ints":
        value = draw(st.sampled_from([[n], (float(n),), (True,) * n, str(n), None, (n, -1)]))
        return dataclasses.replace(q, shape=value), ("shape",)
    if kind == "dtype not float":
        value = draw(st.sampled_from([np.dtype(np.int32), np.dtype(np.uint8), np.dtype(bool),
                                      "float32", None, float, np.dtype(np.complex64)]))  # fmt: skip
        return dataclasses.replace(q, dtype=value), ("dtype",)
    if kind in ("packed", "absmax", "absmax2"):
        a = getattr(q, kind)
        if a is None:  # absmax2 without double quantization: must stay None
            return dataclasses.replace(q, absmax2=np.ones(1, np.float32)), ("absmax2",)
        how = draw(st.sampled_from(["shorter", "longer", "2-D", "dtype", "list", "None"]))
        if how == "shorter":
            a = a[: -draw(st.integers(1, a.size))]
        elif how == "longer":
            a = np.concatenate([a, a[: draw(st.integers(1, a.size))]])
        elif how == "2-D":
            a = a.reshape(1, -1)
        elif how == "dtype":
            wrong = [np.int8, np.uint16, np.float16, np.float64, np.float32, np.uint8]
            a = a.astype(draw(st.sampled_from([d for d in wrong if d != a.dtype])))
        elif how == "list":
            a = a.tolist()
        else:
            a = None
        return dataclasses.replace(q, **{kind: a}), (kind,)
    if kind == "scale not finite":
        value = np.float32(draw(st.sampled_from([np.nan, np.inf, -np.inf])))
        name = draw(st.sampled_from(["absmax2", "offset"])) if q.double_quant else "absmax"
        if name == "offset":
            return dataclasses.replace(q, offset=value), ("offset",)
        a = getattr(q, name).copy()
        a[draw(st.integers(0, a.size - 1))] = value
        return dataclasses.replace(q, **{name: a}), (name,)
    if kind == "offset":
        if not q.double_quant:
            return dataclasses.replace(q, offset=np.float32(0.0)), ("offset",)
        value = draw(st.sampled_from([None, 0.5, np.float64(0.5), np.ones(1, np.float32), "0"]))
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
    kind=st.sampled_from(TAMPERINGS),
    data=st.data(),
)
def test_tampered_quantized_is_refused_never_decoded(
    n, blocksize, quant_type, double_quant, kind, data
):
    w = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    q = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    if kind == "blocksize another power of two" and -(-n // 512) == -(-n // blocksize) == 1:
        kind = "blocksize not a power of two"  # one block at every size: nothing to contradict
    bad, names = tamper(q, kind, data.draw)
    decoded = AssertionError("decoded a tampered Quantized4bit")
    with mock.patch.object(quant, "unpack_4bit", side_effect=decoded):
        with pytest.raises((ValueError, TypeError)) as error:
            dequantize_4bit(bad)
    assert any(name in str(error.value) for name in names), (kind, str(error.value))

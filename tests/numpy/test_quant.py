"""lowrank.numpy.quant against independent oracles: the paper's NF4 formula, the dynamic map's
formula, a brute-force nearest-level search, explicit byte layouts, a derived error bound (also
at the edges of float32), and refusal of every inconsistent Quantized4bit.
(Bit-identity with bitsandbytes is in tests/interop/test_bitsandbytes.py.)"""

import dataclasses
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from quant_bounds import EDGE_VALUES, FLOAT16_MAX, error_bound, extreme_weights

from lowrank.numpy import quant
from lowrank.numpy.quant import (
    DOUBLE_QUANT_BLOCKSIZE,
    Quantized4bit,
    check_quantized,
    code_for,
    dequantize_4bit,
    derive_dynamic_map,
    derive_nf4_code,
    dynamic_map,
    fp4_code,
    int4_code,
    nf4_code,
    pack_4bit,
    quantize_4bit,
    unpack_4bit,
)

QUANT_TYPES = ["nf4", "fp4", "int4"]


def brute_force_codes(w: np.ndarray, blocksize: int, table: np.ndarray) -> np.ndarray:
    """Nearest level by exhaustive float64 distances to all 16 levels, ties to the lower level
    (argmin returns the first minimum, and the levels are listed in ascending order)."""
    x = w.reshape(-1).astype(np.float32)
    n_blocks = -(-x.size // blocksize)
    absmax = np.array(
        [np.abs(x[b * blocksize : (b + 1) * blocksize]).max() for b in range(n_blocks)]
    )
    inverse = np.float32(1) / np.maximum(absmax, np.float32(1e-38)).astype(np.float32)
    scaled = x * np.repeat(inverse, blocksize)[: x.size]
    ascending = np.argsort(table, kind="stable")
    distance = np.abs(scaled[:, None].astype(np.float64) - table[ascending][None, :])
    codes = ascending[np.argmin(distance, axis=1)].astype(np.uint8)
    if np.array_equal(table, fp4_code()):
        # FP4 has two codes for 0.0; bitsandbytes gives (0, 0.0026] the second one (code 8)
        codes[(codes == 0) & (scaled > 0)] = 8
    return codes


def brute_force_codes_loop(w: np.ndarray, blocksize: int, table: np.ndarray) -> np.ndarray:
    x = w.reshape(-1).astype(np.float32)
    codes = []
    for i, value in enumerate(x):
        block = x[(i // blocksize) * blocksize : (i // blocksize + 1) * blocksize]
        absmax = np.abs(block).max()
        s = float(value * (np.float32(1) / max(absmax, np.float32(1e-38))))
        best = min(range(16), key=lambda c: (abs(s - float(table[c])), float(table[c]), c))
        codes.append(8 if best == 0 and s > 0 and np.array_equal(table, fp4_code()) else best)
    return np.array(codes, dtype=np.uint8)


# ---- the tables ----


def test_nf4_table_shape_and_derivation():
    code = nf4_code()
    assert code.dtype == np.float32 and code.shape == (16,)
    assert np.all(np.diff(code) > 0)
    assert code[0] == -1.0 and code[7] == 0.0 and code[15] == 1.0
    assert (code < 0).sum() == 7 and (code > 0).sum() == 8
    # the paper's construction from normal quantiles reproduces the stored table
    np.testing.assert_allclose(derive_nf4_code(), code, rtol=0, atol=1e-7)


def test_nf4_levels_are_equal_probability_bins():
    # NF4's point: a N(0, 1) weight, scaled by the block's absmax, lands about equally often on
    # each level. With a large block almost no bin is starved (uniform would be 1/16 each).
    rng = np.random.default_rng(0)
    q = quantize_4bit(rng.standard_normal(1 << 16), blocksize=64, double_quant=False)
    counts = np.bincount(unpack_4bit(q.packed, 1 << 16), minlength=16) / (1 << 16)
    # (the two ends are rarer: only a block's largest value reaches them)
    assert counts.min() > 0.015 and counts.max() < 0.1


def test_fp4_table_is_sign_exponent_mantissa():
    code = fp4_code()
    assert code.dtype == np.float32
    # bit 3 is the sign: code c and c + 8 have equal magnitude and opposite sign
    np.testing.assert_array_equal(code[8:], -code[:8] + 0.0)
    # the 3 low bits (2 exponent, 1 mantissa) as bitsandbytes documents them, then / 12
    magnitude = {
        0b000: 0,
        0b001: 0.0625,
        0b010: 8,
        0b011: 12,
        0b100: 4,
        0b101: 6,
        0b110: 2,
        0b111: 3,
    }
    for bits, value in magnitude.items():
        assert code[bits] == np.float32(value / 12)
    assert np.signbit(code[8]) == False  # noqa: E712  (bitsandbytes stores +0.0 there)


def test_int4_table_is_symmetric_sevenths():
    code = int4_code()
    np.testing.assert_array_equal(code[1:], (np.arange(-7, 8) / 7).astype(np.float32))
    q = quantize_4bit(np.random.default_rng(1).standard_normal(4096), quant_type="int4")
    assert 0 not in unpack_4bit(q.packed, 4096)  # code 0 (-8/7) is unreachable


def test_dynamic_map_formula():
    table = dynamic_map()
    assert table.dtype == np.float32 and table.shape == (256,)
    assert np.all(np.diff(table) > 0)
    assert table[-1] == 1.0 and 0.0 in table
    exact = derive_dynamic_map()
    assert exact.shape == (256,)
    # float32 linspace rounding: within 2 units in the last place of float32 (2 * 2^-23 rel.)
    np.testing.assert_allclose(table, exact, rtol=2.5e-7, atol=0)


def test_code_for_rejects_unknown():
    with pytest.raises(ValueError, match="quant_type"):
        code_for("nf3")


# ---- quantize / dequantize ----


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("shape,blocksize", [((1,), 64), ((7,), 4), ((65,), 64), ((9, 13), 16)])
def test_codes_match_brute_force(quant_type, shape, blocksize):
    rng = np.random.default_rng(sum(shape) + blocksize)
    w = rng.standard_normal(shape) * rng.exponential(size=shape)
    q = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=False)
    n = w.size
    expected = brute_force_codes_loop(w, blocksize, code_for(quant_type))
    np.testing.assert_array_equal(unpack_4bit(q.packed, n), expected)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_codes_match_vectorised_brute_force_large(quant_type):
    w = np.random.default_rng(3).standard_normal((37, 300))
    q = quantize_4bit(w, blocksize=128, quant_type=quant_type, double_quant=False)
    expected = brute_force_codes(w, 128, code_for(quant_type))
    np.testing.assert_array_equal(unpack_4bit(q.packed, w.size), expected)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_exact_ties_take_the_lower_level(quant_type):
    table = code_for(quant_type)
    levels = np.unique(table[np.abs(table) <= 1])  # sorted; FP4's two zeros are one level
    midpoints = (levels[:-1] + levels[1:]) / np.float32(2)  # float32, exactly representable
    w = np.concatenate([[1.0], midpoints]).astype(np.float32)  # absmax 1: scaled == w
    q = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=False)
    decoded = table[unpack_4bit(q.packed, w.size)]
    np.testing.assert_array_equal(decoded[1:], levels[:-1])


def test_all_zero_block_and_partial_last_block():
    w = np.zeros(64 + 64 + 10, dtype=np.float32)
    w[64:128] = np.linspace(-3, 2, 64)
    w[128:] = [0.5, -0.25, 0, 0, 0, 0, 0, 0, 0, 0.125]
    q = quantize_4bit(w, blocksize=64, double_quant=False)
    assert q.absmax.tolist() == [0.0, 3.0, 0.5]
    out = dequantize_4bit(q)
    assert np.all(out[:64] == 0) and not np.any(np.signbit(out[:64]))
    # the last block is scaled by its own absmax 0.5: 0.5 -> level 1.0 exactly
    assert out[128] == 0.5


def test_packing_layout_high_nibble_first_and_odd_pad():
    codes = np.array([1, 2, 3], dtype=np.uint8)
    np.testing.assert_array_equal(pack_4bit(codes, pad_code=7), [0x12, 0x37])
    np.testing.assert_array_equal(unpack_4bit(np.array([0xAB, 0xC0], np.uint8), 3), [10, 11, 12])
    # an odd-length NF4 tensor pads its last low nibble with the code of 0.0 (7)
    q = quantize_4bit(np.array([1.0, -1.0, 1.0]), double_quant=False)
    np.testing.assert_array_equal(q.packed, [0xF0, 0xF7])


def test_shape_and_dtype_preserved():
    for dtype in (np.float16, np.float32, np.float64):
        w = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(dtype)
        q = quantize_4bit(w, blocksize=8)
        assert q.shape == (3, 5, 7) and q.dtype == dtype
        out = dequantize_4bit(q)
        assert out.shape == (3, 5, 7) and out.dtype == np.float32


def test_double_quant_layout():
    w = np.random.default_rng(2).standard_normal(64 * 600)
    q = quantize_4bit(w, blocksize=64, double_quant=True)
    plain = quantize_4bit(w, blocksize=64, double_quant=False)
    assert q.absmax.dtype == np.uint8 and q.absmax.shape == (600,)
    assert q.absmax2.dtype == np.float32 and q.absmax2.shape == (3,)  # ceil(600 / 256)
    assert q.offset == np.float32(plain.absmax.astype(np.float64).mean())
    centred = plain.absmax - q.offset
    for j in range(3):
        assert q.absmax2[j] == np.abs(centred[256 * j : 256 * (j + 1)]).max()
    # the contract's rebuild formula, written out here
    rebuilt = dynamic_map()[q.absmax] * np.repeat(q.absmax2, 256)[:600] + q.offset
    np.testing.assert_array_equal(q.absmax_float32(), rebuilt)
    # decoding multiplies each level by its block's rebuilt scale
    expected = nf4_code()[unpack_4bit(q.packed, w.size)] * np.repeat(rebuilt, 64)
    np.testing.assert_array_equal(dequantize_4bit(q), expected)


def test_nbytes_nf4_double_quant_bits_per_weight():
    n = 1024 * 1024
    q = quantize_4bit(np.random.default_rng(0).standard_normal(n).astype(np.float32))
    # 4 bits + 8 / 64 (absmax codes) + 32 / (64 * 256) (absmax2) + 32 / n (offset)
    expected_bits = 4 + 8 / 64 + 32 / (64 * DOUBLE_QUANT_BLOCKSIZE) + 32 / n
    assert q.nbytes * 8 / n == pytest.approx(expected_bits, rel=1e-12)
    assert q.nbytes * 8 / n == pytest.approx(4.127, abs=5e-4)
    plain = quantize_4bit(np.ones(n, np.float32), double_quant=False)
    assert plain.nbytes == n // 2 + 4 * n // 64


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.array([1.0, np.nan]), "NaN or inf"),
        (np.array([np.inf, 1.0]), "NaN or inf"),
        (np.array([1e300, 1.0]), "float32 range"),
        (np.zeros((0, 3)), "empty"),
    ],
)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_bad_values(bad, match, quant_type):
    with pytest.raises(ValueError, match=match):
        quantize_4bit(bad, quant_type=quant_type)


@pytest.mark.parametrize("blocksize", [0, -64, 3, 48, 64.0, True, "64"])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="power of two"):
        quantize_4bit(np.ones(8), blocksize=blocksize)


def test_bad_quant_type_and_dtype():
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(np.ones(8), quant_type="NF4")
    with pytest.raises(TypeError, match="floating"):
        quantize_4bit(np.ones(8, dtype=np.int64))
    with pytest.raises(ValueError, match="0..15"):
        pack_4bit(np.array([16], np.uint8))


# ---- properties ----

# every finite float32, subnormals included, and the edges of the range more often than chance
finite_floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(EDGE_VALUES),
)


@settings(max_examples=60, deadline=None)
@given(
    w=hnp.arrays(np.float32, st.integers(1, 300), elements=finite_floats),
    blocksize=st.sampled_from([1, 2, 8, 64, 256]),
    quant_type=st.sampled_from(QUANT_TYPES),
    double_quant=st.booleans(),
)
def test_error_bound(w, blocksize, quant_type, double_quant):
    """Decoding a quantization of finite input is finite and within `quant_bounds.error_bound`
    (nearest-level rounding, the rebuilt double-quantized scale, float32 rounding)."""
    q = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    out = dequantize_4bit(q).astype(np.float64).reshape(-1)
    assert np.all(np.isfinite(out))
    bound = error_bound(w, blocksize, code_for(quant_type), dynamic_map(), double_quant)
    assert np.all(np.abs(out - w.astype(np.float64).reshape(-1)) <= bound)


# ---- the edges of float32 (the rebuilt scale once overflowed to inf) ----


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("case", list(extreme_weights()))
def test_extremes_decode_finite_within_bound(case, double_quant, quant_type):
    w = extreme_weights()[case].astype(np.float32)
    q = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    assert np.all(np.isfinite(q.absmax_float32()))
    out = dequantize_4bit(q).astype(np.float64)
    assert np.all(np.isfinite(out)), case
    bound = error_bound(w, 64, code_for(quant_type), dynamic_map(), double_quant)
    assert np.all(np.abs(out - w.astype(np.float64)) <= bound), case


def test_float32_max_with_double_quant_was_inf():
    """The regression itself: 20 blocks at float32's max and one zero block. offset = 20/21 of
    the max, absmax2 = offset, so a full block's scaled centred absmax is 1/20; its nearest
    8-bit level is 0.0508, above 0.05, and the rebuilt scale level * absmax2 + offset lay 1.6%
    above 3.4e38: inf, and every weight of the block with it."""
    w = extreme_weights()["float32 max"].astype(np.float32)
    q = quantize_4bit(w, double_quant=True)
    exact = dynamic_map()[q.absmax].astype(np.float64) * np.float64(q.absmax2[0]) + q.offset
    assert exact.max() > np.finfo(np.float32).max  # the exact rebuild does not fit float32
    assert q.absmax_float32().max() == np.finfo(np.float32).max  # clamped, not inf
    np.testing.assert_array_equal(np.abs(dequantize_4bit(q)[:64]), np.finfo(np.float32).max)


def test_subnormal_blocks_keep_their_values():
    """A block of subnormals (absmax < 1e-38) has no float32 reciprocal; it was scaled by the
    1e-38 guard's 1e38 instead, to ~1e-2 at most, and decoded to zeros. Lifted by 2 ** 64
    first, it is scaled to [-1, 1] like any block: its largest value decodes exactly."""
    w = np.array([1e-40, -6e-41, 2e-41, 0.0], np.float32)
    for quant_type, expected in [("int4", [1, -4 / 7, 1 / 7, 0]), ("nf4", [1, -0.5250730514526367,
                                 0.16093020141124725, 0])]:  # fmt: skip
        q = quantize_4bit(w, quant_type=quant_type, double_quant=False)
        out = dequantize_4bit(q)
        np.testing.assert_array_equal(out, np.float32(expected) * w[0])
        assert out[0] == w[0]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_float16_near_its_max_decodes_within_float16(quant_type, double_quant):
    """float16 weights at 65504: the rebuilt scale (65552 here) fitted float32 but not float16,
    so casting the decoded weight back to its dtype gave inf. Scales are clamped to 65504."""
    w = np.full(64 * 21, FLOAT16_MAX, np.float16)
    w[1::2] *= -1
    w[-64:] = 0
    q = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    assert q.dtype == np.float16
    out = dequantize_4bit(q)  # float32
    assert np.abs(out).max() <= FLOAT16_MAX
    with np.errstate(over="raise"):
        assert np.all(np.isfinite(out.astype(np.float16)))
    bound = error_bound(w, 64, code_for(quant_type), dynamic_map(), double_quant)
    assert np.all(np.abs(out - w.astype(np.float64)) <= bound)


def test_clamp_leaves_ordinary_scales_alone():
    """The clamp only touches scales beyond the dtype's range: ordinary decodes are unchanged
    (the contract's formula, written out)."""
    w = np.random.default_rng(4).standard_normal(64 * 300).astype(np.float16)
    q = quantize_4bit(w)
    rebuilt = dynamic_map()[q.absmax] * np.repeat(q.absmax2, 256)[:300] + q.offset
    expected = nf4_code()[unpack_4bit(q.packed, w.size)] * np.repeat(rebuilt, 64)
    np.testing.assert_array_equal(dequantize_4bit(q), expected)


# ---- arguments and inconsistent Quantized4bit objects ----


@pytest.mark.parametrize("double_quant", ["no", "False", 1, 0, None, np.array([True])])
def test_double_quant_must_be_a_bool(double_quant):
    with pytest.raises(TypeError, match="double_quant must be True or False"):
        quantize_4bit(np.ones(8), double_quant=double_quant)
    with pytest.raises(ValueError, match="double_quant"):  # ArgumentTypeError is both
        quantize_4bit(np.ones(8), double_quant=double_quant)
    assert quantize_4bit(np.ones(8), double_quant=np.bool_(False)).double_quant is np.bool_(False)


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


@settings(max_examples=60, deadline=None)
@given(codes=hnp.arrays(np.uint8, st.integers(0, 101), elements=st.integers(0, 15)))
def test_pack_unpack_round_trip(codes):
    packed = pack_4bit(codes, pad_code=7)
    assert packed.shape == ((codes.size + 1) // 2,) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_4bit(packed, codes.size), codes)


@settings(max_examples=30, deadline=None)
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
)
def test_shape_dtype_property(shape, dtype):
    w = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    q = quantize_4bit(w, blocksize=4)
    assert q.shape == tuple(shape) and q.dtype == dtype
    assert dequantize_4bit(q).shape == tuple(shape)

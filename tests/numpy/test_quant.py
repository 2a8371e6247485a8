"""lowrank.numpy.quant against independent oracles: the paper's NF4 formula, the dynamic map's
formula, a brute-force nearest-level search, explicit byte layouts and a derived error bound.
(Bit-identity with bitsandbytes is in tests/interop/test_bitsandbytes.py.)"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowrank.numpy.quant import (
    DOUBLE_QUANT_BLOCKSIZE,
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


def worst_rounding(table: np.ndarray) -> float:
    """The largest distance from a point of [-1, 1] to its nearest level: half the widest gap
    between neighbouring levels, or the distance from an end of [-1, 1] to the outermost level."""
    levels = np.sort(table.astype(np.float64))
    return max(np.diff(levels).max() / 2, levels[0] + 1, 1 - levels[-1])


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

# subnormal float32s are left out: below 1.2e-38 a block's scale has no finite reciprocal
finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=32, allow_subnormal=False)


@settings(max_examples=60, deadline=None)
@given(
    w=hnp.arrays(np.float32, st.integers(1, 300), elements=finite_floats),
    blocksize=st.sampled_from([1, 2, 8, 64, 256]),
    quant_type=st.sampled_from(QUANT_TYPES),
    double_quant=st.booleans(),
)
def test_error_bound(w, blocksize, quant_type, double_quant):
    """|w - dequant| <= e4 * a + e8 * a2 for every element, where a is the block's absmax,
    e4 = worst_rounding(4-bit table); with double quantization the scale itself is off by at
    most e8 * a2 (e8 = worst_rounding(dynamic map), a2 = largest |absmax - offset| among the
    256 scales sharing its absmax2), and every level is at most 1 in magnitude. Plus float32
    rounding of the few multiplies: 4 units in the last place of the terms."""
    q = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    out = dequantize_4bit(q).astype(np.float64).reshape(-1)
    x = w.astype(np.float64).reshape(-1)
    n_blocks = -(-x.size // blocksize)
    padded = np.zeros(n_blocks * blocksize)
    padded[: x.size] = np.abs(x)
    a = padded.reshape(n_blocks, blocksize).max(axis=1)  # true block absmax
    bound = worst_rounding(code_for(quant_type)) * a
    if double_quant:
        offset = a.mean()
        groups = -(-n_blocks // 256)
        centred = np.zeros(groups * 256)
        centred[:n_blocks] = np.abs(a - offset)
        a2 = np.repeat(centred.reshape(groups, 256).max(axis=1), 256)[:n_blocks]
        bound = bound + worst_rounding(dynamic_map()) * a2 + 4 * 2.0**-23 * (a2 + abs(offset))
    slack = 4 * 2.0**-23 * a
    assert np.all(np.abs(out - x) <= np.repeat(bound + slack, blocksize)[: x.size])


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

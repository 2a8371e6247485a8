"""lowrank.numpy.quant against independent oracles: a brute-force nearest-level search, explicit
byte layouts, a derived error bound (also at the edges of float32). The code tables against
their formulas are in tests/numpy/test_codebooks.py, refusal of inconsistent Quantized4bit
objects in tests/numpy/test_quantized.py; bit-identity with bitsandbytes in
tests/interop/test_bitsandbytes.py."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from quant_bounds import EDGE_VALUES, FLOAT16_MAX, error_bound, extreme_weights

from lowrank.numpy.codebooks import code_for, dynamic_map, fp4_code, nf4_code
from lowrank.numpy.quant import dequantize_4bit, pack_4bit, quantize_4bit, unpack_4bit

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


# ---- arguments ----


@pytest.mark.parametrize("double_quant", ["no", "False", 1, 0, None, np.array([True])])
def test_double_quant_must_be_a_bool(double_quant):
    with pytest.raises(TypeError, match="double_quant must be True or False"):
        quantize_4bit(np.ones(8), double_quant=double_quant)
    with pytest.raises(ValueError, match="double_quant"):  # ArgumentTypeError is both
        quantize_4bit(np.ones(8), double_quant=double_quant)
    assert quantize_4bit(np.ones(8), double_quant=np.bool_(False)).double_quant is np.bool_(False)


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

"""lowrank.numpy.codebooks against independent oracles: the paper's NF4 formula (and NF4's point,
equally filled bins), FP4's sign / exponent / mantissa bits, int4's sevenths, the dynamic map's
formula. (Bit-identity with bitsandbytes' tables is in tests/interop/test_bitsandbytes.py.)"""

import numpy as np
import pytest

from lowrank.numpy.codebooks import (
    code_for,
    derive_dynamic_map,
    derive_nf4_code,
    dynamic_map,
    fp4_code,
    int4_code,
    nf4_code,
)
from lowrank.numpy.quant import quantize_4bit, unpack_4bit


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

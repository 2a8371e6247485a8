"""Tests for lowrank._validate: the argument checks both halves share.

Oracle: the rules written out in each test (which values are acceptable, by hand).
"""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank._validate import (
    ArgumentTypeError,
    RankWarning,
    check_adapter,
    check_blocksize,
    check_bool,
    check_choice,
    check_dropout,
    check_int,
    check_positive_number,
    check_quant_type,
    check_rank,
)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 50), st.integers(1, 50), st.integers(-5, 60))
def test_check_rank_accepts_any_positive_int_and_warns_above_min(n_in, n_out, r) -> None:
    if r < 1:
        with pytest.raises(ValueError, match="rank r must be a positive int"):
            check_rank(r, n_in, n_out)
    elif r <= min(n_in, n_out):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning within the bound
            assert check_rank(r, n_in, n_out) == r
    else:
        with pytest.warns(RankWarning, match=f"rank at most {min(n_in, n_out)}"):
            assert check_rank(r, n_in, n_out) == r


@pytest.mark.parametrize("value", [True, 2.0, "2", None, np.float64(2.0)])
def test_a_wrong_type_is_both_a_type_error_and_a_value_error(value) -> None:
    for check in (lambda v: check_int("n", v), lambda v: check_rank(v, 4, 4)):
        with pytest.raises(ArgumentTypeError) as caught:
            check(value)
        assert isinstance(caught.value, TypeError) and isinstance(caught.value, ValueError)


def test_check_int_bounds_and_messages() -> None:
    assert check_int("n", np.int64(3)) == 3 and type(check_int("n", np.int64(3))) is int
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        check_int("n", 0)
    with pytest.raises(ValueError, match="n must be a non-negative int, got -1"):
        check_int("n", -1, low=0)
    with pytest.raises(ValueError, match=r"n must be an int in \[2, 4\], got 5"):
        check_int("n", 5, low=2, high=4)
    assert check_int("n", 0, low=0) == 0


@pytest.mark.parametrize("value", [0, -1.5, math.inf, -math.inf, math.nan])
def test_positive_numbers_are_positive_and_finite(value) -> None:
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        check_positive_number("alpha", value)


def test_positive_number_accepts_ints_and_floats() -> None:
    assert check_positive_number("alpha", 16) == 16.0
    assert check_positive_number("alpha", 1e-300) == 1e-300
    with pytest.raises(ArgumentTypeError):
        check_positive_number("alpha", True)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, math.nan])
def test_dropout_must_be_in_zero_one(p) -> None:
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        check_dropout(p)


def test_bool_is_only_a_bool() -> None:
    assert check_bool("double_quant", np.bool_(True)) is True
    for value in ("no", 1, 0, None):
        with pytest.raises(ArgumentTypeError, match="double_quant must be True or False"):
            check_bool("double_quant", value)


@pytest.mark.parametrize("blocksize", [0, -64, 3, 48, 64.0, True, None])
def test_blocksize_must_be_a_power_of_two(blocksize) -> None:
    with pytest.raises(ValueError, match="positive power of two"):
        check_blocksize(blocksize)


def test_choices_are_exact() -> None:
    assert check_quant_type("nf4") == "nf4"
    for bad in ("NF4", "nf8", None, ["nf4"]):
        with pytest.raises(ValueError, match="unknown quant_type"):
            check_quant_type(bad)
    with pytest.raises(ValueError, match=r"method must be one of \['a', 'b'\]"):
        check_choice("method", "c", ("a", "b"))


def test_check_adapter_names_the_first_bad_field() -> None:
    good = dict(r=2, alpha=4, dropout=0.1, init="kaiming", in_features=8, out_features=3)
    check_adapter(**good)
    for field, value, message in [
        ("r", 0, "rank r"),
        ("alpha", math.inf, "alpha"),
        ("dropout", 1.0, "dropout"),
        ("init", "orthogonal", "init must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_adapter(**(good | {field: value}))

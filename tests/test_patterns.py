"""Tests for lowrank._patterns: PEFT's two pattern rules, with a time limit.

Oracles: Python's `re` itself, run as PEFT runs it (`re.fullmatch(pattern, name)` for a str
target_modules; the first key with `re.match(rf"(.*\\.)?({key})$", name)` for rank_pattern /
alpha_pattern), on hand-picked and on seeded random patterns and names; the clock for hostile
patterns.
"""

import random
import re
import time

import pytest

from lowrank import _patterns
from lowrank._patterns import (
    compile_pattern,
    fullmatch_names,
    pattern_value,
    pattern_values,
    time_limit,
)

# Wall time of a call whose deadline is ~1 s (TIME_LIMIT_S, and the error message, pin that).
# The bound only tells "ended" from "hung" (re takes hours on these patterns), so it is
# generous: the tests run on 2 busy cores next to other workers and subprocesses.
WALL_BOUND_S = 10.0

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.10.self_attn.v_proj",
    "model.layers.1.mlp.down_proj",
    "transformer.h.0.attn.c_attn",
    "lm_head",
    "embed_tokens",
    "0",
    "1",
    "0.1",
    "encoder.layer.5.attention.self.query",
    "q_proj",
    "a.b",
    "ab",
    "a\nb.q_proj",  # a newline: `.` does not cross it
    "q_proj\n",  # `$` also matches before a final newline
    "x.",
    "",
    "Ünïcode.wëight",
    "layers.0.Q_PROJ",
]

PATTERNS = [
    r".*q_proj",
    r".*\.(q_proj|v_proj)",
    r"model\.layers\.\d+\.self_attn\.(q|v)_proj",
    r"model.layers.1.*",
    r"(?i).*q_proj",
    r"lm_head|embed_tokens",
    r"q_proj",
    r"q_proj$",
    r"1",
    r"0\.1|1",
    r"(?!lm_head).*",
    r"(.)\1",
    r"(?P<x>a)\.(?P=x)?b",
    r"a\.b|",
    r"",
    r"\w+",
    r".*\.",
    r"[^.]*",
    r"^lm_head",
    r"layers\.(?:[02-9]|1\d)\..*",
    re.escape("a.b") + "|" + re.escape("q_proj\n"),
    r"Ünïcode\.wëight",
    r"x?",
    r"(a|b)*\.b",
]


def _peft_value(patterns, name, default):
    """PEFT's get_pattern_key, with re (the oracle)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@pytest.mark.parametrize("pattern", PATTERNS)
def test_fullmatch_is_re_fullmatch(pattern):
    assert fullmatch_names(pattern, NAMES) == [n for n in NAMES if re.fullmatch(pattern, n)]


@pytest.mark.parametrize("key", PATTERNS)
def test_a_pattern_key_matches_as_in_peft(key):
    try:
        expected = {n: _peft_value({key: 1}, n, 0) for n in NAMES}
    except re.error:  # e.g. (?i) inside PEFT's group: PEFT fails, lowrank names the key
        with pytest.raises(ValueError, match="pattern key"):
            pattern_values({key: 1}, NAMES, 0)
        return
    assert pattern_values({key: 1}, NAMES, 0) == expected


def test_the_first_matching_key_wins_as_in_peft():
    patterns = {"q_proj": 1, r".*\d\.self_attn\.q_proj": 2, "1": 3, "^1": 4, "0\\.1": 5, "": 6}
    for order in range(6):  # every rotation of the keys
        keys = list(patterns)[order:] + list(patterns)[:order]
        rotated = {k: patterns[k] for k in keys}
        expected = {n: _peft_value(rotated, n, 0) for n in NAMES}
        assert pattern_values(rotated, NAMES, 0) == expected
        assert {n: pattern_value(rotated, n, 0) for n in NAMES} == expected


def _random_pattern(rng: random.Random, depth: int = 0) -> str:
    """A random pattern in which only single atoms repeat: no nested quantifiers, so that the
    oracle (re) itself ends (random nesting soon makes re run for hours: the point of it all)."""
    atoms = ["a", "b", ".", r"\.", r"\d", r"\w", "[ab]", "[^.]", "q_proj", "1", "0"]
    pieces = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.15 and depth < 2:
            piece = f"({_random_pattern(rng, depth + 1)}|{_random_pattern(rng, depth + 1)})"
        elif kind < 0.25 and depth < 2:
            piece = f"(?:{_random_pattern(rng, depth + 1)}){rng.choice(['', '?'])}"
        else:
            piece = rng.choice(atoms) + rng.choice(["", "", "*", "+", "?", "{1,2}", "*?"])
        pieces.append(piece)
    return "".join(pieces)


def _random_name(rng: random.Random) -> str:
    parts = ["a", "b", "ab", "q_proj", "1", "0", "10", "layers", "ba", "a1"]
    return ".".join(rng.choice(parts) for _ in range(rng.randint(1, 4)))


def test_random_patterns_agree_with_re():
    rng = random.Random(7)
    names = sorted({_random_name(rng) for _ in range(60)})
    for _ in range(400):
        pattern = _random_pattern(rng)
        assert fullmatch_names(pattern, names) == [n for n in names if re.fullmatch(pattern, n)], (
            pattern
        )
        assert pattern_values({pattern: 1}, names, 0) == {
            n: _peft_value({pattern: 1}, n, 0) for n in names
        }, pattern


def test_plain_string_patterns_agree_with_re():
    # what re.escape makes (and lowrank writes): matched as a set, must mean the same
    rng = random.Random(3)
    pool = ["a.b", "a+b", "(x)", "q_proj", "b", "1", "0.1", "[z]", "a|b", "x y", "é.ü", ""]
    names = [*pool, "c.a.b", "c.a+b", "0.0.1", "k.(x)", "x.a|b", "a", "ab", "a.b\n", "n\n.b"]
    for _ in range(200):
        chosen = rng.sample(pool, rng.randint(1, 4))
        pattern = "|".join(re.escape(s) for s in chosen)
        assert compile_pattern(pattern).literals == frozenset(chosen)  # the fast path
        assert fullmatch_names(pattern, names) == [n for n in names if re.fullmatch(pattern, n)]
        patterns = {pattern: 1, re.escape(rng.choice(pool)): 2}
        assert pattern_values(patterns, names, 0) == {
            n: _peft_value(patterns, n, 0) for n in names
        }, patterns


def test_invalid_syntax_is_a_value_error_naming_the_pattern():
    for pattern in ["(", "a{2,1}", "[z-a]", r"\1", "*a"]:
        with pytest.raises(ValueError, match=re.escape(repr(pattern))):
            fullmatch_names(pattern, NAMES)
    with pytest.raises(ValueError, match=r"pattern key '\('"):
        pattern_values({"(": 1}, NAMES, 0)
    with pytest.raises(ValueError, match="must be a str"):
        fullmatch_names(3, NAMES)
    # a key that only makes sense inside PEFT's (.*\.)?(key)$ is accepted, as PEFT does
    assert pattern_values({"a)|(b": 1}, ["x.a", "b"], 0) == {
        n: _peft_value({"a)|(b": 1}, n, 0) for n in ["x.a", "b"]
    }


# Patterns that take exponential time in a backtracking engine (on Python's re, each runs for
# minutes to hours on the names below), with what re would answer, worked out by hand:
# {pattern: (whole-name rule, PEFT key rule)}.
ALL_A = lambda n: n and set(n) == {"a"}  # noqa: E731
HOSTILE = {
    r"([a-z_.]|[a-z_.]{2})+\d$": (lambda n: False, lambda n: False),  # no name ends in a digit
    r"(.|..)*\d$": (lambda n: False, lambda n: False),
    r"(a|aa)+$": (ALL_A, ALL_A),  # a run of a's (no dot in the names that match)
    r"(.*a){20}": (lambda n: n.endswith("a") and n.count("a") >= 20,) * 2,
}


@pytest.mark.parametrize("pattern", HOSTILE)
def test_a_hostile_pattern_ends_within_about_a_second_on_10000_names(pattern):
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(9990)]
    names += [name for i in range(5) for name in ("a" * (40 + i) + "b", "a" * (30 + i))]
    whole, key = HOSTILE[pattern]
    for call, rule in (
        (lambda: fullmatch_names(pattern, names), whole),
        (lambda: list(pattern_values({pattern: 1}, names, 0).values()), key),
    ):
        start = time.perf_counter()
        try:
            got = call()
        except ValueError as error:  # the usual end: the deadline, with the pattern named
            assert "took more than 1 s" in str(error) and repr(pattern) in str(error)
        else:  # `regex` found the answer in time: it must be re's
            assert got in ([n for n in names if rule(n)], [int(bool(rule(n))) for n in names])
        assert time.perf_counter() - start < WALL_BOUND_S


def test_a_nested_quantifier_on_a_long_name_of_as_ends_with_re_s_answer_or_an_error():
    # (a+)+$ is the textbook case; `regex` finds the answer at once, re would not end
    names = ["a" * 5000 + "b"] * 100
    start = time.perf_counter()
    try:
        assert fullmatch_names(r"(a+)+$", names) == []
    except ValueError as error:
        assert "(a+)+$" in str(error)
    assert time.perf_counter() - start < WALL_BOUND_S


def test_one_deadline_for_a_block_of_calls():
    names = [f"layer.{i}.q" for i in range(2000)] + ["a" * 40 + "b"]
    start = time.perf_counter()
    with pytest.raises(ValueError, match="took more than"), time_limit(1.0):
        fullmatch_names(r".*\.q", names)  # fast
        pattern_values({r"(a|aa)+$": 1}, names, 0)  # uses what is left of the same second
    assert time.perf_counter() - start < WALL_BOUND_S


def test_patterns_too_big_to_compile_are_refused_before_compiling():
    start = time.perf_counter()
    for pattern in [r"((a{1000}){1000}){1000}", r"(?:x{0,60000}){60000}", "x" * 30_000 + "."]:
        with pytest.raises(ValueError, match="repeats that multiply out|characters long"):
            compile_pattern(pattern)
    assert time.perf_counter() - start < WALL_BOUND_S
    # a union of escaped names is not compiled at all, however long
    long_union = "|".join(re.escape(f"model.layers.{i}.q_proj") for i in range(20_000))
    start = time.perf_counter()
    assert fullmatch_names(long_union, ["model.layers.7.q_proj", "x"]) == ["model.layers.7.q_proj"]
    assert time.perf_counter() - start < WALL_BOUND_S


def test_the_time_limit_is_a_module_constant():
    assert _patterns.TIME_LIMIT_S == 1.0

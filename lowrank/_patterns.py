"""Regular expressions that select layers, matched as PEFT matches them but with a time limit
(framework-free).

PEFT reads two kinds of patterns from `adapter_config.json` and matches them against every
module name of a model:

- `target_modules` given as a str: `re.fullmatch(pattern, name)` (`fullmatch_names`);
- the keys of `rank_pattern` / `alpha_pattern`: `re.match(rf"(.*\\.)?({key})$", name)`, the
  first key (in the file's order) that matches gives the value (`pattern_value(s)`).

A pattern from a file is untrusted input, and a backtracking engine can take exponential time
on one: `(a|aa)+$` against a name of 40 a's and a b, or `(.*a){20}`, runs for hours in
Python's `re`, which cannot be interrupted. So the matching here is bounded:

- It uses the `regex` package (a re-compatible backtracking engine, already installed with
  transformers) because its matching takes a `timeout=`. Every public call gets ONE deadline,
  `TIME_LIMIT_S` after it starts, shared by all the names it matches (not one per name), so a
  hostile pattern on a model with 10,000 modules still ends in about a second, with a
  ValueError that names the pattern. `time_limit()` makes several calls share one deadline
  (the PEFT loader validates a whole config under one).
- `regex` unrolls counted repeats when it compiles, which no timeout covers: a pattern whose
  repeats multiply to more than `MAX_EXPANSION` (`((a{100}){100}){100}`), or that is longer
  than `MAX_PATTERN_LENGTH` characters, is refused before it is compiled.
- A pattern that is only plain strings joined by `|` (what `re.escape` makes, which is what
  lowrank and the loader write) is matched by set lookups, without any regex engine: exact
  and linear time, however many names it lists.

Why not the alternatives: google-re2 runs in linear time, but its syntax and semantics differ
from `re` (no backreferences or lookarounds, different `$`), so some PEFT configs would select
different layers; a subprocess running `re` under a kill timer is exact but costs a process per
call. With `regex`, a pattern is first compiled by `re` (so exactly the patterns PEFT accepts
are accepted; a syntax error is a ValueError naming the pattern) and then matched by `regex`'s
VERSION0, which follows `re`'s semantics; the two agree on the names torch modules have (the
tests compare them on many patterns). Known difference, outside module names in practice:
`regex`'s `\\w` also matches Unicode combining marks, `re`'s does not.
"""

import contextlib
import contextvars
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import regex

try:  # the parser behind re.compile (private, but stable): used to size a pattern
    from re import _parser as _sre_parse  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

TIME_LIMIT_S = 1.0  # per public call (or per `time_limit()` block), all names together
MAX_PATTERN_LENGTH = 20_000  # characters of a pattern that needs the regex engine
MAX_EXPANSION = 100_000  # the pattern's size with its counted repeats multiplied out

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "lowrank_pattern_deadline", default=None
)


@contextlib.contextmanager
def time_limit(seconds: float = TIME_LIMIT_S) -> Iterator[None]:
    """Let every match inside the block share one deadline, `seconds` from now (a block
    inside another keeps the outer, earlier deadline)."""
    outer = _deadline.get()
    mine = time.monotonic() + seconds
    token = _deadline.set(mine if outer is None else min(outer, mine))
    try:
        yield
    finally:
        _deadline.reset(token)


def _start() -> float:
    """The deadline of one public call: the enclosing `time_limit`'s, or a fresh one."""
    scoped = _deadline.get()
    return time.monotonic() + TIME_LIMIT_S if scoped is None else scoped


@dataclass(frozen=True)
class Compiled:
    """A checked pattern: a set of plain strings (`literals`), or a compiled `regex`."""

    source: str
    literals: frozenset[str] | None
    engine: "regex.Pattern | None"


def _plain_alternatives(pattern: str) -> frozenset[str] | None:
    """The strings of a pattern made only of plain characters, backslash-escaped special
    characters and top-level `|` (e.g. `re.escape(a) + "|" + re.escape(b)`), or None."""
    pieces, current, i = [], [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 == len(pattern):
                return None
            following = pattern[i + 1]
            if re.escape(following) != "\\" + following:
                return None  # \d, \n, \1, \A ...: a class, an escape or a reference
            current.append(following)
            i += 2
        elif char == "|":
            pieces.append("".join(current))
            current = []
            i += 1
        elif re.escape(char) != char:
            return None  # a special character: . * ( [ ^ $ ...
        else:
            current.append(char)
            i += 1
    pieces.append("".join(current))
    return frozenset(pieces)


def _expansion(items: Iterable) -> int:
    """The size of a parsed pattern with every counted repeat multiplied out."""
    total = 0
    for op, argument in items:
        if str(op) in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, body = argument
            count = low if high is _sre_parse.MAXREPEAT else high
            total += max(1, count) * max(1, _expansion(body))
        else:
            total += 1 + sum(_expansion(body) for body in _bodies(argument))
    return total


def _bodies(argument: object) -> Iterator:
    """The sub-patterns inside a parsed item's argument (groups, branches, lookarounds)."""
    if isinstance(argument, _sre_parse.SubPattern):
        yield argument
    elif isinstance(argument, (list, tuple)):
        for part in argument:
            yield from _bodies(part)


def compile_pattern(pattern: str) -> Compiled:
    """Check `pattern` as Python's `re` would and prepare it for bounded matching.

    ValueError (naming the pattern) for a non-str, invalid syntax, or a pattern too long or
    with too large counted repeats to compile safely."""
    if not isinstance(pattern, str):
        raise ValueError(f"a regular expression must be a str, got {pattern!r}")
    return _compile(pattern)


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> Compiled:
    literals = _plain_alternatives(pattern)
    if literals is not None:
        return Compiled(pattern, literals, None)
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(
            f"regular expression {pattern[:60]!r}... is {len(pattern)} characters long; "
            f"at most {MAX_PATTERN_LENGTH} are matched (list the layers instead)"
        )
    try:
        re.compile(pattern)
        size = _expansion(_sre_parse.parse(pattern))
    except re.error as error:
        raise ValueError(f"{pattern!r} is not a valid regular expression: {error}") from None
    except RecursionError:
        raise ValueError(f"regular expression {pattern[:60]!r} is nested too deeply") from None
    if size > MAX_EXPANSION:
        raise ValueError(
            f"regular expression {pattern[:60]!r} has counted repeats that multiply out to "
            f"{size} elements (at most {MAX_EXPANSION}); it would take too long to compile"
        )
    return Compiled(pattern, None, regex.compile(pattern, flags=regex.VERSION0))


def _timed_out(pattern: str, names: int) -> ValueError:
    return ValueError(
        f"regular expression {pattern[:200]!r} took more than {TIME_LIMIT_S:g} s to match "
        f"{names} module names; nested quantifiers like (a+)+ make matching take exponential "
        "time: use a simpler pattern or a list of names"
    )


def _run(engine: "regex.Pattern", method: str, name: str, deadline: float, source: str, n: int):
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _timed_out(source, n)
    try:
        return getattr(engine, method)(name, timeout=remaining)
    except TimeoutError:
        raise _timed_out(source, n) from None


def fullmatch_names(pattern: str, names: Sequence[str]) -> list[str]:
    """The names `pattern` matches whole (`re.fullmatch`, PEFT's rule for a str
    target_modules), in order, all under one deadline."""
    compiled = compile_pattern(pattern)
    if compiled.literals is not None:
        return [name for name in names if name in compiled.literals]
    deadline = _start()
    engine = compiled.engine
    return [
        name
        for name in names
        if _run(engine, "fullmatch", name, deadline, pattern, len(names)) is not None
    ]


@lru_cache(maxsize=1024)
def _suffix_pattern(key: str) -> Compiled:
    """PEFT's pattern-key rule as one pattern: `(.*\\.)?({key})$`, built as PEFT builds it
    (so group numbers and everything else are the same); plain keys stay string sets."""
    if not isinstance(key, str):
        raise ValueError(f"a pattern key must be a str, got {key!r}")
    literals = _plain_alternatives(key)
    if literals is not None:
        return Compiled(key, literals, None)
    try:
        return compile_pattern(rf"(.*\.)?({key})$")
    except ValueError as error:
        raise ValueError(f"pattern key {key!r}: {error}") from None


def _suffixes(name: str) -> Iterator[str]:
    r"""Every string s for which `(.*\.)?(s)$` matches `name` (re.match): the name itself and
    each part after a dot that no newline precedes (`.` stops at one), and the same for the
    name without a final newline (`$` also matches just before it)."""
    for text in (name, name[:-1]) if name.endswith("\n") else (name,):
        yield text
        start = 0
        while (dot := text.find(".", start)) != -1 and "\n" not in text[start:dot]:
            yield text[dot + 1 :]
            start = dot + 1


@lru_cache(maxsize=64)
def _table(keys: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[int, Compiled]]]:
    """For pattern keys in order: {plain string: index of the first key holding it} and the
    (index, compiled) of the keys that need the regex engine."""
    plain, engines = {}, []
    for index, key in enumerate(keys):
        compiled = _suffix_pattern(key)  # every key is checked, even one no name reaches
        if compiled.literals is None:
            engines.append((index, compiled))
        else:
            for literal in compiled.literals:
                plain.setdefault(literal, index)
    return plain, engines


def check_pattern_keys(patterns: Mapping[str, object]) -> None:
    """ValueError naming the first key of `patterns` that is no valid pattern key."""
    _table(tuple(patterns))


def pattern_value(patterns: Mapping[str, object], name: str, default: object) -> object:
    r"""The value of the first key of `patterns` that matches `name` by PEFT's rule
    (`re.match(rf"(.*\.)?({key})$", name)`), else `default`; one deadline for the call."""
    return pattern_values(patterns, [name], default)[name]


def pattern_values(
    patterns: Mapping[str, object], names: Sequence[str], default: object
) -> dict[str, object]:
    """`pattern_value` for many names under one deadline: {name: value}."""
    if not patterns:
        return dict.fromkeys(names, default)
    keys = tuple(patterns)
    plain, engines = _table(keys)
    deadline = _start()
    values = {}
    for name in names:
        first = min((plain[s] for s in _suffixes(name) if s in plain), default=len(keys))
        for index, compiled in engines:
            if index >= first:
                break
            if _run(compiled.engine, "match", name, deadline, keys[index], len(names)):
                first = index
                break
        values[name] = patterns[keys[first]] if first < len(keys) else default
    return values

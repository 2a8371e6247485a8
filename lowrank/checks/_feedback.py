"""What every check shares: the failure it raises, how it calls a student's function, the
per-student variants, and the two guards (is it filled in yet? is it the student's own work?).

A check never answers the question it grades. It compares what the student's function returns
with an independent value (finite differences, a hand-derived formula, bitsandbytes, a model
that transformers builds), and when they differ it says, in plain words, what it checked, what
it expected, what came back, and a hint that names the usual mistake. Nothing here is an
implementation a student could call instead of writing their own: `check_own_work` refuses a
graded function that calls into lowrank (this package included), bitsandbytes or, where the
question is about counting, the framework that would count for them.

Variants: `student_rng(student_id, assignment)` seeds a generator from a SHA-256 of the id, so
the same id always gets the same sizes and data (on every machine, in every process), and two
ids get different ones: answers copied from another student's notebook do not fit.
"""

import dis
import hashlib
import math
import numbers
import types
from collections.abc import Callable, Iterable
from typing import NoReturn

import numpy as np

FORBIDDEN = ("lowrank", "bitsandbytes")  # a graded function must not call these


class CheckFailed(AssertionError):
    """A student's implementation gave a wrong answer. The message says which check, the case,
    what was expected, what came back and a hint. An AssertionError, so test runners (otter,
    pytest) report it as a failed test, not as a crash."""


def fail(
    check: str, problem: str, *, expected: object, got: object, hint: str, case: str = ""
) -> NoReturn:
    """Raise `CheckFailed` with the four parts every message has."""
    lines = [f"{check}: {problem}"]
    if case:
        lines.append(f"  case:     {case}")
    lines += [f"  expected: {expected}", f"  got:      {got}", f"  hint:     {hint}"]
    raise CheckFailed("\n".join(lines))


def describe(value: object) -> str:
    """A short description of what came back: arrays by shape and dtype, the rest by repr."""
    if isinstance(value, np.ndarray):
        if value.size <= 6:
            return f"array {np.array2string(value, precision=6)} ({value.dtype})"
        return f"array of shape {value.shape}, dtype {value.dtype}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # a torch tensor
        return f"{type(value).__name__} of shape {tuple(value.shape)}, dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_callable(check: str, fn: object) -> None:
    """The thing to check must be a function (TypeError otherwise: that is a usage error)."""
    if not callable(fn):
        raise TypeError(f"{check} needs your function, got {type(fn).__name__}")


def call(check: str, fn: Callable, *args: object, case: str, **kwargs: object) -> object:
    """fn(*args, **kwargs); an exception inside the student's code, or a None result (the
    unfilled stub returns None), becomes a `CheckFailed` that says so."""
    try:
        result = fn(*args, **kwargs)
    except Exception as error:  # the student's code raised: report it as feedback
        fail(
            check,
            f"your function raised {type(error).__name__}: {error}",
            expected="a result",
            got=f"{type(error).__name__}",
            hint="run the case above yourself and read the traceback",
            case=case,
        )
    if result is None:
        fail(
            check,
            "your function returned None",
            expected="a result",
            got="None",
            hint="fill in the body (replace the ...) and end it with `return`",
            case=case,
        )
    return result


def as_array(check: str, value: object, name: str, *, case: str) -> np.ndarray:
    """`value` must be a NumPy array (lists and torch tensors are refused with a hint)."""
    if not isinstance(value, np.ndarray):
        fail(
            check,
            f"{name} is not a NumPy array",
            expected="a numpy.ndarray",
            got=describe(value),
            hint="build it with NumPy operations (np.asarray turns a list into an array)",
            case=case,
        )
    return value


def as_number(check: str, value: object, name: str, *, case: str) -> float:
    """`value` must be a real number (a Python or NumPy scalar, not an array or a bool)."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(
            check,
            f"{name} is not a number",
            expected="a float",
            got=describe(value),
            hint="return a single number, not an array or a tuple",
            case=case,
        )
    return float(value)


def scaled_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / (max |a| + max |b|), 0 for two zero arrays: an error relative to the
    arrays' scale, so an entry that should be zero cannot make it blow up."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.max(np.abs(a)) + np.max(np.abs(b))
    return 0.0 if scale == 0 else float(np.max(np.abs(a - b)) / scale)


def close(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    """Same shape, all finite, and `scaled_error` below `tol`."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return False
    return scaled_error(a, b) < tol


def student_rng(student_id: str | None, assignment: str) -> np.random.Generator:
    """A generator seeded by `student_id` (None: the public variant everyone shares)."""
    if student_id is not None and not isinstance(student_id, str):
        raise TypeError(f"student_id must be a str or None, got {type(student_id).__name__}")
    if student_id is not None and not student_id.strip():
        raise ValueError("student_id is empty: put your student id (or email) in STUDENT_ID")
    key = "public" if student_id is None else student_id.strip().lower()
    digest = hashlib.sha256(f"lowrank/{assignment}/{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


_CONST_OPS = {"LOAD_CONST", "RETURN_CONST"}
_STUB_OPS = {"RESUME", "NOP", "CACHE", "RETURN_VALUE", *_CONST_OPS}  # what `...` compiles to


def is_implemented(*fns: Callable) -> bool:
    """True when every function has a body: a stub whose body is only `...` or `pass` (what
    `otter assign` leaves in the student's notebook) is not. Notebooks use it to skip the cells
    that need an answer that is not written yet, so an unfilled notebook still runs."""
    for fn in fns:
        code = getattr(fn, "__code__", None)
        if code is None:
            raise TypeError(f"is_implemented needs functions, got {type(fn).__name__}")
        if all(
            i.opname in _STUB_OPS and (i.opname not in _CONST_OPS or i.argval is None)
            for i in dis.get_instructions(code)
        ):
            return False  # it only returns None
    return True


def _code_objects(code: types.CodeType) -> Iterable[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _module_of(obj: object) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    return getattr(obj, "__module__", None) or getattr(type(obj), "__module__", "") or ""


def check_own_work(check: str, fn: Callable, forbidden: tuple[str, ...] = FORBIDDEN) -> None:
    """Refuse a graded function that calls a library doing the work for it: any global it
    reads, any module it imports and any value it closes over, from a `forbidden` package."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return  # a builtin or a callable object: nothing to inspect
    scope = getattr(fn, "__globals__", {})
    used = set()
    for inner in _code_objects(code):
        for name in inner.co_names:
            used.add(name)  # also IMPORT_NAME's dotted names, e.g. "lowrank.numpy"
            if name in scope:
                used.add(_module_of(scope[name]))
    for cell in fn.__closure__ or ():
        try:
            used.add(_module_of(cell.cell_contents))
        except ValueError:  # an empty cell
            pass
    for name in sorted(used):
        root = name.split(".")[0]
        if root in forbidden:
            fail(
                check,
                f"{fn.__name__} uses {name}",
                expected="your own implementation (NumPy / plain Python)",
                got=f"a call into {root}",
                hint=f"this question asks you to write it yourself; {root} is what the answer "
                "is checked against, so calling it proves nothing",
            )


def fmt(value: float) -> str:
    """A number for a message: integers with separators, the rest with 6 significant digits."""
    if isinstance(value, numbers.Integral) or (math.isfinite(value) and value == int(value)):
        return f"{int(value):,}"
    return f"{value:.6g}"

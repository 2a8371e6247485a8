"""Argument checks and the vocabularies every part of lowrank shares (framework-free).

One home for "is this a usable rank / alpha / dropout / blocksize / choice?", so that the NumPy
half, the torch half, the accounting and the CLI refuse the same inputs with the same words.
Each check returns the value it accepted (as a plain Python type) or raises an error that says
what was wrong, what was expected and what was given.

A value of the wrong type raises `ArgumentTypeError`, which is both a `TypeError` (what it
is) and a `ValueError` (what callers that catch "a bad argument" catch, like the CLI). bool is
never taken for a number: `True` is not a rank and `4.0` is a sign that something upstream
computed it.
"""

import math
import numbers
import warnings
from collections.abc import Iterable

QUANT_TYPES = ("nf4", "fp4", "int4")  # the 4-bit codebooks (`codebooks.code_for`)
INITS = ("kaiming", "gaussian")  # how LoRA's A is drawn (B always starts at zero)
METHODS = ("full", "lora", "qlora")  # fine-tuning methods (accounting, estimator, CLI)
FLOAT_DTYPES = ("fp32", "fp16", "bf16")  # storage names used by accounting and the estimator
PARALLEL_MODES = ("ddp", "fsdp")  # several GPUs: the trainer's `parallel`, the estimator's strategy


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a TypeError that `except ValueError` also catches)."""


class RankWarning(UserWarning):
    """A LoRA rank above min(in, out): allowed (PEFT allows it), but it buys nothing."""


def check_int(name: str, value: object, *, low: int = 1, high: int | None = None) -> int:
    """`value` as an int in [low, high] (high=None: no upper bound); bool is refused."""
    if high is not None:
        wanted = f"an int in [{low}, {high}]"
    else:
        wanted = {1: "a positive int", 0: "a non-negative int"}.get(low, f"an int >= {low}")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {wanted}, got {value}")
    return int(value)


def check_positive_number(name: str, value: object) -> float:
    """`value` as a finite float > 0 (alpha, a learning rate, eps)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"{name} must be a positive number, got {value!r} ({type(value).__name__})"
        )
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number (and finite), got {value!r}")
    return float(value)


def check_dropout(p: object, name: str = "dropout") -> float:
    """A dropout probability in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a float in [0, 1), got {p!r}")
    if not 0 <= p < 1:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def check_bool(name: str, value: object) -> bool:
    """A real bool (or NumPy bool): "no" or 1 are not taken for one."""
    if type(value).__name__ not in ("bool", "bool_"):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """`value` if it is one of `choices` (compared as given: no case folding)."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_quant_type(quant_type: object, choices: Iterable[str] = QUANT_TYPES) -> str:
    """A 4-bit codebook name ("nf4", "fp4", "int4")."""
    choices = tuple(choices)
    if not isinstance(quant_type, str) or quant_type not in choices:
        raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {choices}")
    return quant_type


def check_blocksize(blocksize: object) -> int:
    """A quantization block size: a positive power of two."""
    if (
        isinstance(blocksize, bool)
        or not isinstance(blocksize, numbers.Integral)
        or blocksize <= 0
        or blocksize & (blocksize - 1)
    ):
        raise ValueError(f"blocksize must be a positive power of two, got {blocksize!r}")
    return int(blocksize)


def check_rank(r: object, in_features: int, out_features: int) -> int:
    """A LoRA rank for a [out_features, in_features] weight: any positive int, as in PEFT.

    B @ A can never have a rank above min(in, out), so a larger r only adds parameters (and
    changes the scale alpha / r): that is allowed, because PEFT allows it and its files must
    load (its default r=8 on a 2-class head, say), but it warns.
    """
    largest = min(in_features, out_features)
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise ArgumentTypeError(f"rank r must be a positive int, got {r!r} ({type(r).__name__})")
    if r < 1:
        raise ValueError(f"rank r must be a positive int, got {r}")
    if r > largest:
        warnings.warn(
            f"r={r} exceeds min(in_features, out_features) = {largest} for a "
            f"{out_features}x{in_features} weight: the update B @ A has rank at most {largest}, "
            "so the extra rank adds parameters but no expressive power",
            RankWarning,
            stacklevel=3,
        )
    return int(r)


def check_adapter_name(name: object) -> str:
    """An adapter name: a non-empty str without '.' (it becomes part of parameter names)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty str without '.', got {name!r}")
    return name


def check_adapter(
    *, r: object, alpha: object, dropout: object, init: object, in_features: int, out_features: int
) -> None:
    """Every hyperparameter of one LoRA adapter on a [out, in] weight (both halves use this)."""
    check_rank(r, in_features, out_features)
    check_positive_number("alpha", alpha)
    check_dropout(dropout)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")

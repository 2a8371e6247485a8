"""lowrank.checks as a student meets it: silent on a right answer, a CheckFailed with expected /
got / hint on a wrong one, a TypeError on misuse; stable per-student variants; stubs told apart
from answers; answers that call the library refused; and the brute-force NF4 oracle used
without bitsandbytes agreeing with bitsandbytes byte for byte. (Each check is exercised
against real mistakes by the bug zoo in tests/assignments/.)"""

import builtins
import math

import numpy as np
import pytest

from lowrank import checks
from lowrank.checks import nf4


def scale(alpha, r, use_rslora=False):
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def stub(alpha, r, use_rslora=False):
    """An unfilled answer, as otter assign leaves it."""
    ...


def test_a_right_answer_passes_silently_and_a_wrong_one_says_why():
    assert checks.check_lora_scale(scale, student_id="ada") is None
    with pytest.raises(checks.CheckFailed) as failure:
        checks.check_lora_scale(lambda alpha, r, use_rslora=False: alpha, student_id="ada")
    message = str(failure.value)
    assert isinstance(failure.value, AssertionError)  # test runners report a failed test
    for part in (
        "check_lora_scale: wrong scale",
        "expected: 2",
        "got:      16",
        "hint:",
        "alpha / r",
    ):
        assert part in message


def test_an_unfilled_or_crashing_answer_is_feedback_not_a_crash():
    with pytest.raises(checks.CheckFailed, match="returned None"):
        checks.check_lora_scale(stub)
    with pytest.raises(checks.CheckFailed, match="raised ZeroDivisionError"):
        checks.check_lora_scale(lambda alpha, r, use_rslora=False: alpha / 0)


def test_misuse_of_a_check_is_a_type_or_value_error():
    with pytest.raises(TypeError, match="needs your function"):
        checks.check_lora_forward(np.zeros(3))
    with pytest.raises(TypeError, match="student_id must be a str"):
        checks.lora_variant(12345)
    with pytest.raises(ValueError, match="STUDENT_ID"):
        checks.nf4_variant("   ")
    with pytest.raises(TypeError):
        checks.is_implemented(42)


def test_variants_are_stable_per_student_and_differ_between_students():
    assert checks.lora_variant("Ada@Example.edu ") == checks.lora_variant("ada@example.edu")
    assert checks.lora_variant(None) == checks.lora_variant(None)
    ids = [f"student-{k}" for k in range(8)]
    for variant in (checks.lora_variant, checks.nf4_variant, checks.finetune_variant):
        assert len({variant(i) for i in ids}) == len(ids), variant.__name__
    v = checks.lora_variant("ada")
    assert len({v.batch, v.in_features, v.out_features, v.r}) == 4  # a transpose changes shape
    w = checks.nf4_variant("ada")
    assert (w.rows * w.cols) % 2 == 1 and (w.rows * w.cols) % w.blocksize  # odd, short block


def test_is_implemented_tells_a_stub_from_an_answer():
    def pass_stub(x):
        pass

    assert not checks.is_implemented(stub) and not checks.is_implemented(pass_stub)
    assert checks.is_implemented(scale) and checks.is_implemented(lambda: 0)
    assert not checks.is_implemented(scale, stub)


def test_an_answer_that_calls_the_library_is_refused():
    from lowrank.numpy import quantize_4bit

    def delegating(w, levels, blocksize):
        q = quantize_4bit(w, blocksize=blocksize, double_quant=False)
        return q.packed, q.absmax

    def importing(w, levels, blocksize):
        import lowrank.numpy as ln

        return ln.quantize_4bit(w, blocksize=blocksize)

    for answer in (delegating, importing):
        with pytest.raises(checks.CheckFailed, match="write it yourself"):
            checks.check_quantize_blockwise(answer)


def test_brute_force_nf4_oracle_matches_bitsandbytes(monkeypatch):
    pytest.importorskip("bitsandbytes")
    real_import = builtins.__import__

    def without_bitsandbytes(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    cases = [
        (nf4._weights(checks.nf4_variant(s)), checks.nf4_variant(s).blocksize)
        for s in ("ada", "bob", None)
    ]
    cases.append((nf4._ties(), 64))  # every value on a midpoint: ties go to the lower code
    for w, blocksize in cases:
        with_bnb = nf4.reference_codes(w, blocksize)
        monkeypatch.setattr(builtins, "__import__", without_bitsandbytes)
        brute = nf4.reference_codes(w, blocksize)
        monkeypatch.setattr(builtins, "__import__", real_import)
        assert brute[3].startswith("brute force") and with_bnb[3].startswith("bitsandbytes")
        np.testing.assert_array_equal(brute[0], with_bnb[0])
        np.testing.assert_array_equal(brute[1], with_bnb[1])
        assert brute[2] == with_bnb[2]

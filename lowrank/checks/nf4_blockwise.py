"""Checks for "NF4 by hand", part 2: blockwise absmax quantization (codes and scales of every
block, ties, the short last block, the all-zero block). Part 1 (`nf4.py`) holds the levels'
check and what both share: the variant, the tables, the test tensors and the reference codes,
whose oracle is bitsandbytes itself (see its docstring).

QLoRA: Dettmers et al. 2023, arXiv:2305.14314.

    check_quantize_blockwise(quantize_blockwise, student_id="ada@example.edu")  # or CheckFailed
"""

import numpy as np

from ._feedback import (
    as_array,
    call,
    check_callable,
    check_own_work,
    describe,
    fail,
)
from .nf4 import (
    _blocks_scaled,
    _first_bad,
    _midpoints,
    _ties,
    _weights,
    nf4_table,
    nf4_variant,
    reference_codes,
)

__all__ = ["check_quantize_blockwise"]


def check_quantize_blockwise(quantize_blockwise, *, student_id: str | None = None) -> None:
    """quantize_blockwise(w, levels, blocksize) -> (codes uint8 (n,), absmax float32
    (n_blocks,)): bit-identical to bitsandbytes' NF4 codes and scales.

    w is float32 of any shape (blocks run over it flattened row-major), levels the 16 NF4
    levels (`nf4_table()`). QLoRA's blockwise absmax quantization (Dettmers et al. 2023,
    arXiv:2305.14314). With `student_id` also on the student's tensor and on exact ties.

    Examples:
        >>> def quantize_blockwise(w, levels, blocksize):
        ...     x = w.reshape(-1).astype(np.float32)  # (n,)
        ...     n_blocks = -(-x.size // blocksize)
        ...     padded = np.zeros(n_blocks * blocksize, np.float32)
        ...     padded[: x.size] = x
        ...     absmax = np.abs(padded.reshape(n_blocks, blocksize)).max(axis=1)  # (n_blocks,)
        ...     safe = np.maximum(absmax, np.float32(1e-38))  # an all-zero block: 0 / tiny = 0
        ...     scaled = x / np.repeat(safe, blocksize)[: x.size]
        ...     midpoints = (levels[:-1] + levels[1:]) / np.float32(2)
        ...     codes = np.searchsorted(midpoints, scaled, side="left")  # ties: the lower code
        ...     return codes.astype(np.uint8), absmax
        >>> check_quantize_blockwise(quantize_blockwise, student_id="ada@example.edu")  # right
        >>> def per_tensor(w, levels, blocksize):
        ...     x = w.reshape(-1).astype(np.float32)
        ...     midpoints = (levels[:-1] + levels[1:]) / np.float32(2)
        ...     codes = np.searchsorted(midpoints, x / np.abs(x).max()).astype(np.uint8)
        ...     return codes, np.array([np.abs(x).max()])
        >>> check_quantize_blockwise(per_tensor)
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_quantize_blockwise: absmax has the wrong shape
          case:     public tensor: w (15, 41) float32 (n = 615), blocksize 32 (20 blocks, the
                    last holding 7)
          expected: (20,)
          got:      (1,)
          hint:     one absmax for the whole tensor (per-tensor); QLoRA scales each block of 64
                    by its own absmax, so one outlier only coarsens its own block
    """
    check = "check_quantize_blockwise"
    check_callable(check, quantize_blockwise)
    check_own_work(check, quantize_blockwise)
    levels = nf4_table()
    public = nf4_variant(None)
    cases = [("public tensor", _weights(public), public.blocksize)]
    if student_id is not None:
        v = nf4_variant(student_id)
        cases += [("your tensor", _weights(v), v.blocksize), ("exact ties", _ties(), 64)]
    for name, w, blocksize in cases:
        n, n_blocks = w.size, -(-w.size // blocksize)
        want_codes, want_absmax, _, oracle = reference_codes(w, blocksize)
        case = f"{name}: w {w.shape} float32 (n = {n}), blocksize {blocksize} ({n_blocks} blocks, "
        case += f"the last holding {n % blocksize or blocksize})"
        result = call(check, quantize_blockwise, w.copy(), levels.copy(), blocksize, case=case)
        if not isinstance(result, tuple | list) or len(result) != 2:
            fail(
                check,
                "expected two arrays",
                expected="(codes, absmax)",
                got=describe(result),
                hint="return codes, absmax",
                case=case,
            )
        codes = as_array(check, result[0], "codes", case=case)
        absmax = as_array(check, result[1], "absmax", case=case)
        if absmax.shape != (n_blocks,):
            hint = f"one absmax per block of {blocksize}: ceil(n / blocksize) = {n_blocks}"
            if absmax.size == 1:
                hint = (
                    "one absmax for the whole tensor (per-tensor); QLoRA scales each block "
                    "of 64 by its own absmax, so one outlier only coarsens its own block"
                )
            elif absmax.shape == (n // blocksize,):
                hint = (
                    f"the last, short block ({n % blocksize} values) needs an absmax too: "
                    f"use ceil(n / blocksize), not n // blocksize"
                )
            fail(
                check,
                "absmax has the wrong shape",
                expected=(n_blocks,),
                got=absmax.shape,
                hint=hint,
                case=case,
            )
        if codes.shape != (n,):
            hint = "one code per element of w, flattened row-major"
            if codes.shape == (n - n % blocksize,):
                hint = "the last, short block is missing: quantize it with its own absmax"
            elif codes.shape == w.shape:
                hint = "flatten w first (w.reshape(-1)): blocks run over the flattened tensor"
            fail(
                check,
                "codes have the wrong shape",
                expected=(n,),
                got=codes.shape,
                hint=hint,
                case=case,
            )
        for label, array, dtype in (("codes", codes, np.uint8), ("absmax", absmax, np.float32)):
            if array.dtype != dtype:
                fail(
                    check,
                    f"{label} have the wrong dtype",
                    expected=np.dtype(dtype).name,
                    got=array.dtype,
                    hint=f"bitsandbytes stores {label} as "
                    f"{np.dtype(dtype).name}: .astype(np.{np.dtype(dtype).name})",
                    case=case,
                )
        flat = w.reshape(-1)
        blocks_of = np.arange(n) // blocksize
        zero_blocks = np.flatnonzero(want_absmax == 0)
        if not np.array_equal(absmax, want_absmax):
            k = _first_bad(absmax != want_absmax)
            hint = (
                f"absmax of block k is max |w| over elements [k * {blocksize}, (k+1) * {blocksize})"
            )
            if np.all(absmax == np.abs(flat).max()):
                hint = (
                    "every block got the tensor's absmax (per-tensor); each block of "
                    f"{blocksize} needs its own, so small blocks keep their resolution"
                )
            elif np.array_equal(absmax, _blocks_scaled(w.T.reshape(-1), blocksize)[1]):
                hint = "blocks run over w flattened row-major (w.reshape(-1)), not column-major"
            fail(
                check,
                f"absmax[{k}] is wrong (oracle: {oracle})",
                expected=f"{want_absmax[k]!r}",
                got=f"{absmax[k]!r}",
                hint=hint,
                case=case,
            )
        if np.array_equal(codes, want_codes):
            continue
        bad = codes != want_codes
        k = _first_bad(bad)
        scaled = flat[k] / want_absmax[blocks_of[k]] if want_absmax[blocks_of[k]] else 0.0
        mids = _midpoints(levels)
        ties = np.isin(_blocks_scaled(flat, blocksize)[0], mids)
        hint = (
            "each scaled value w / absmax takes the code of the nearest level: compare it "
            "with the 15 midpoints between neighbouring levels (np.searchsorted)"
        )
        if np.all(ties[bad]) and np.all(codes[bad] == want_codes[bad] + 1):
            hint = (
                "ties broken the wrong way: a value exactly on the midpoint between levels i "
                "and i+1 takes the LOWER code i, as bitsandbytes' torch.bucketize does; "
                "np.searchsorted(midpoints, scaled, side='left') does that, and argmin of "
                "|scaled - level| does not (the float32 midpoint is not exactly halfway)"
            )
        elif zero_blocks.size and np.all(np.isin(blocks_of[bad], zero_blocks)):
            hint = (
                "an all-zero block: its absmax is 0, and 0 / 0 is NaN; such a block must "
                "take the code of 0.0 (7), e.g. divide by max(absmax, tiny)"
            )
        fail(
            check,
            f"{np.sum(bad)} of {n} codes differ from bitsandbytes' (oracle: {oracle}); the first "
            f"at element {k} (block {blocks_of[k]}), w = {flat[k]:.6g}, scaled = {scaled:.6g}",
            expected=f"code {want_codes[k]} (level {levels[want_codes[k]]:.6g})",
            got=f"code {codes[k]}" + (f" (level {levels[codes[k]]:.6g})" if codes[k] < 16 else ""),
            hint=hint,
            case=case,
        )

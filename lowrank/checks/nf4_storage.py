"""Checks for the storage half of "NF4 by hand": packing two 4-bit codes per byte, double
quantization of the block scales, and the exact bits-per-weight budget.

QLoRA: Dettmers et al. 2023, arXiv:2305.14314 (double quantization, section 3; 4.127 bits).

Oracles: bitsandbytes' packed bytes (via `nf4.reference_codes`) and a hand-packed example for
the nibble order; for double quantization the definition (offset = mean, absmax2 = the exact
max of each block of 256, codes = the exact nearest level of the dynamic map, ties to the lower
code; codes within 1e-6 of a midpoint may go either way, as float32 rounding decides them);
for the budget, the byte count written out.

    check_pack_nibbles(pack_nibbles, student_id="ada@example.edu")  # None, or CheckFailed
"""

import math

import numpy as np

from ._feedback import (
    as_array,
    as_number,
    call,
    check_callable,
    check_own_work,
    describe,
    fail,
    fmt,
)
from .nf4 import (
    DQ_BLOCKSIZE,
    NF4Variant,
    _blocks_scaled,
    _first_bad,
    _midpoints,
    _weights,
    dynamic_map_table,
    nf4_variant,
    reference_codes,
)

__all__ = [
    "check_bits_answer",
    "check_bits_per_weight",
    "check_double_quantize",
    "check_pack_nibbles",
]


def check_pack_nibbles(pack_nibbles, *, student_id: str | None = None) -> None:
    """pack_nibbles(codes, pad_code) -> uint8 (ceil(n / 2),): element 2j in the HIGH nibble,
    2j+1 in the low one; an odd n pads the last low nibble with pad_code. Bit-identical to
    bitsandbytes' packed bytes.

    codes is uint8 (n,), values 0..15. QLoRA's storage: two 4-bit codes a byte (Dettmers et
    al. 2023, arXiv:2305.14314). Checked on a hand-packed example and on the NF4 codes of the
    (student's or public) test tensor.

    Examples:
        >>> def pack_nibbles(codes, pad_code):
        ...     if codes.size % 2:
        ...         codes = np.append(codes, np.uint8(pad_code))
        ...     return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)
        >>> check_pack_nibbles(pack_nibbles, student_id="ada@example.edu")  # silent: right
        >>> def low_nibble_first(codes, pad_code):
        ...     if codes.size % 2:
        ...         codes = np.append(codes, np.uint8(pad_code))
        ...     return ((codes[1::2] << 4) | codes[0::2]).astype(np.uint8)
        >>> check_pack_nibbles(low_nibble_first)
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_pack_nibbles: byte 0 differs (oracle: by hand)
          case:     three codes, pad_code 7 (the code of 0.0)
          expected: 0x12
          got:      0x21
          hint:     nibbles in the wrong order: bitsandbytes puts element 2j in the HIGH nibble
                    (bits 7-4) and 2j+1 in the low nibble (bits 3-0)
    """
    check = "check_pack_nibbles"
    check_callable(check, pack_nibbles)
    check_own_work(check, pack_nibbles)
    cases = [("three codes", np.array([1, 2, 3], np.uint8), bytes([0x12, 0x37]), "by hand")]
    v = nf4_variant(student_id)
    w = _weights(v)
    codes, _, packed, oracle = reference_codes(w, v.blocksize)
    cases.append(
        (
            f"the codes of {'your' if student_id else 'the public'} tensor (n = {w.size})",
            codes,
            packed,
            oracle,
        )
    )
    for name, c, want, oracle in cases:
        case = f"{name}, pad_code 7 (the code of 0.0)"
        got = as_array(
            check, call(check, pack_nibbles, c.copy(), 7, case=case), "packed", case=case
        )
        want = np.frombuffer(want, np.uint8)
        if got.shape != want.shape:
            hint = "two codes per byte: ceil(n / 2) bytes"
            if got.size == c.size // 2:
                hint = "an odd n leaves one code over: pad it with pad_code to a full byte"
            fail(
                check,
                "wrong number of bytes",
                expected=want.shape,
                got=got.shape,
                hint=hint,
                case=case,
            )
        if got.dtype != np.uint8:
            fail(
                check,
                "wrong dtype",
                expected="uint8",
                got=got.dtype,
                hint="bytes are uint8: .astype(np.uint8)",
                case=case,
            )
        if np.array_equal(got, want):
            continue
        swapped = ((want & 15) << 4) | (want >> 4)
        hint = "byte j = (codes[2j] << 4) | codes[2j+1]"
        if np.array_equal(got, swapped):
            hint = (
                "nibbles in the wrong order: bitsandbytes puts element 2j in the HIGH "
                "nibble (bits 7-4) and 2j+1 in the low nibble (bits 3-0)"
            )
        elif np.array_equal(got[:-1], want[:-1]) and c.size % 2:
            hint = (
                f"the last byte: n is odd, so its low nibble is padding and must hold "
                f"pad_code (7, the code of 0.0), got {got[-1] & 15}"
            )
        k = _first_bad(got != want)
        fail(
            check,
            f"byte {k} differs (oracle: {oracle})",
            expected=f"0x{want[k]:02x}",
            got=f"0x{got[k]:02x}",
            hint=hint,
            case=case,
        )


def _scales(v: NF4Variant) -> np.ndarray:
    """n_scales absmax values as a 4-bit quantizer produces them (positive, ~2-5)."""
    rng = np.random.default_rng(v.seed + 1)
    return np.abs(rng.standard_t(df=5, size=(v.n_scales, 64))).max(axis=1).astype(np.float32)


def _nearest(levels: np.ndarray, scaled: np.ndarray) -> np.ndarray:
    return np.searchsorted(_midpoints(levels), scaled, side="left").astype(np.uint8)


def _round_trip(values: np.ndarray, dmap: np.ndarray) -> np.ndarray:
    """`values` through one more round of double quantization (what "applied twice" does)."""
    offset = np.float32(values.mean(dtype=np.float64))
    centred = (values - offset).astype(np.float32)
    top = np.abs(centred).max()
    scaled = centred / top if top > 0 else centred
    return (dmap[_nearest(dmap, scaled)] * top + offset).astype(np.float32)


def check_double_quantize(double_quantize, *, student_id: str | None = None) -> None:
    """double_quantize(absmax, dmap) -> (codes uint8 (n_blocks,), absmax2 float32
    (ceil(n_blocks / 256),), offset float32): offset = mean(absmax), and absmax - offset
    quantized blockwise (blocks of 256) to the nearest level of the dynamic map.

    absmax is float32 (n_blocks,), dmap the 256 levels of `dynamic_map_table()`. QLoRA's double
    quantization (Dettmers et al. 2023, arXiv:2305.14314, section 3) with the dynamic map of
    8-bit block-wise quantization (Dettmers et al. 2022, arXiv:2110.02861).

    Examples:
        >>> def double_quantize(absmax, dmap):
        ...     offset = np.float32(absmax.mean(dtype=np.float64))
        ...     centred = (absmax - offset).astype(np.float32)  # (n_blocks,)
        ...     n2 = -(-centred.size // 256)
        ...     padded = np.zeros(n2 * 256, np.float32)
        ...     padded[: centred.size] = centred
        ...     absmax2 = np.abs(padded.reshape(n2, 256)).max(axis=1)  # (n2,)
        ...     scaled = centred / np.repeat(absmax2, 256)[: centred.size]
        ...     midpoints = (dmap[:-1] + dmap[1:]) / np.float32(2)
        ...     codes = np.searchsorted(midpoints, scaled, side="left").astype(np.uint8)
        ...     return codes, absmax2, offset
        >>> check_double_quantize(double_quantize, student_id="ada@example.edu")  # right
        >>> check_double_quantize(
        ...     lambda absmax, dmap: (np.zeros(absmax.size, np.uint8), np.ones(3, np.float32), 0.0)
        ... )
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_double_quantize: wrong offset
          case:     absmax: 619 float32 values (~4.43 each), dmap: 256 levels
          expected: 4.427467 (mean of absmax)
          got:      0
          hint:     without the offset: absmax values are all positive, so quantizing them
                    directly wastes the dynamic map's negative half; subtract their mean first
                    and store it (one float32)
    """
    check = "check_double_quantize"
    check_callable(check, double_quantize)
    check_own_work(check, double_quantize)
    dmap = dynamic_map_table()
    v = nf4_variant(student_id)
    absmax = _scales(v)
    nb = absmax.size
    n2 = -(-nb // DQ_BLOCKSIZE)
    case = f"absmax: {nb} float32 values (~{absmax.mean():.2f} each), dmap: 256 levels"
    result = call(check, double_quantize, absmax.copy(), dmap.copy(), case=case)
    if not isinstance(result, tuple | list) or len(result) != 3:
        fail(
            check,
            "expected three values",
            expected="(codes, absmax2, offset)",
            got=describe(result),
            hint="return codes, absmax2, offset",
            case=case,
        )
    codes, absmax2, offset = result
    want_offset = absmax.mean(dtype=np.float64)
    offset = as_number(check, offset, "offset", case=case)
    if not math.isclose(offset, want_offset, rel_tol=1e-6):
        hint = "offset = the mean of the absmax values (QLoRA centres them before quantizing)"
        if offset == 0:
            hint = (
                "without the offset: absmax values are all positive, so quantizing them "
                "directly wastes the dynamic map's negative half; subtract their mean first "
                "and store it (one float32)"
            )
        fail(
            check,
            "wrong offset",
            expected=f"{want_offset:.7g} (mean of absmax)",
            got=f"{offset:.7g}",
            hint=hint,
            case=case,
        )
    absmax2 = as_array(check, absmax2, "absmax2", case=case)
    codes = as_array(check, codes, "codes", case=case)
    centred = (absmax - np.float32(offset)).astype(np.float32)
    want2 = np.array(
        [np.abs(centred[i : i + DQ_BLOCKSIZE]).max() for i in range(0, nb, DQ_BLOCKSIZE)],
        np.float32,
    )
    if absmax2.shape != (n2,) or absmax2.dtype != np.float32:
        fail(
            check,
            "absmax2 has the wrong shape or dtype",
            expected=f"float32 ({n2},): one scale per block of 256 absmax values",
            got=f"{absmax2.dtype} {absmax2.shape}",
            hint="the second-level scales stay float32: there are only n_blocks / 256 of them",
            case=case,
        )
    if not np.allclose(absmax2, want2, rtol=1e-6, atol=0):
        hint = "absmax2[j] = max |absmax - offset| over absmax values [256 j, 256 (j+1))"
        if np.allclose(absmax2, _round_trip(want2, dmap), rtol=1e-6, atol=0):
            hint = (
                "double quantization applied twice: absmax2 went through 8-bit quantization "
                "itself. Only the first-level scales are quantized; the few second-level "
                "scales stay exact float32 (quantizing them saves nothing and loses precision)"
            )
        fail(
            check,
            "wrong absmax2",
            expected=np.round(want2, 6),
            got=np.round(absmax2, 6),
            hint=hint,
            case=case,
        )
    if codes.shape != (nb,) or codes.dtype != np.uint8:
        fail(
            check,
            "codes have the wrong shape or dtype",
            expected=f"uint8 ({nb},): one 8-bit code per absmax",
            got=f"{codes.dtype} {codes.shape}",
            hint="one byte per block scale",
            case=case,
        )
    scaled, _ = _blocks_scaled(centred, DQ_BLOCKSIZE)
    want_codes = _nearest(dmap, scaled)
    mids = _midpoints(dmap)
    ambiguous = np.min(np.abs(scaled[:, None] - mids[None, :]), axis=1) < 1e-6
    bad = (codes != want_codes) & ~ambiguous
    if bad.any():
        k = _first_bad(bad)
        fail(
            check,
            f"{np.sum(bad)} of {nb} codes are not the nearest dynamic-map level (the first at "
            f"{k}: (absmax - offset) / absmax2 = {scaled[k]:.6g})",
            expected=f"code {want_codes[k]} (level {dmap[want_codes[k]]:.6g})",
            got=f"code {codes[k]} (level {dmap[codes[k]]:.6g})",
            hint="quantize (absmax - offset) exactly as the 4-bit codes: blocks of 256, divide "
            "by the block's absmax2, nearest level with ties to the lower code",
            case=case,
        )


def check_bits_per_weight(bits_per_weight, *, student_id: str | None = None) -> None:
    """bits_per_weight(n, blocksize=64, double_quant=True): exact storage per weight of an
    n-element NF4 tensor: ceil(n/2) bytes of codes, plus per block an fp32 absmax, or with
    double quantization a uint8 code, an fp32 absmax2 per 256 blocks and an fp32 offset.

    QLoRA's budget (Dettmers et al. 2023, arXiv:2305.14314): 4.127 bits per weight for large
    tensors with blocks of 64 and double quantization.

    Examples:
        >>> def bits_per_weight(n, blocksize=64, double_quant=True):
        ...     n_blocks = -(-n // blocksize)
        ...     scales = n_blocks + 4 * -(-n_blocks // 256) + 4 if double_quant else 4 * n_blocks
        ...     return 8 * (-(-n // 2) + scales) / n
        >>> check_bits_per_weight(bits_per_weight, student_id="ada@example.edu")  # right
        >>> round(bits_per_weight(2**30), 3)
        4.127
        >>> check_bits_per_weight(lambda n, blocksize=64, double_quant=True: 4 + 8 / blocksize)
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_bits_per_weight: wrong bits per weight
          case:     n=1073741824, blocksize=64, double_quant=True
          expected: 4.126953
          got:      4.125000
          hint:     4 + 8/blocksize leaves out the second level: one fp32 absmax2 per 256
                    blocks (32 / (blocksize * 256) bits per weight) and the fp32 offset
    """
    check = "check_bits_per_weight"
    check_callable(check, bits_per_weight)
    check_own_work(check, bits_per_weight)
    v = nf4_variant(student_id)
    cases = [
        (2**30, 64, True),
        (2**30, 64, False),
        (v.rows * v.cols, v.blocksize, True),
        (v.rows * v.cols, v.blocksize, False),
        (4097, 64, True),
    ]
    for n, blocksize, dq in cases:
        nb = -(-n // blocksize)
        scales = nb + 4 * (-(-nb // DQ_BLOCKSIZE)) + 4 if dq else 4 * nb
        want = 8 * (-(-n // 2) + scales) / n
        case = f"n={n}, blocksize={blocksize}, double_quant={dq}"
        got = as_number(
            check,
            call(check, bits_per_weight, n, blocksize=blocksize, double_quant=dq, case=case),
            "bits per weight",
            case=case,
        )
        if math.isclose(got, want, rel_tol=1e-9):
            continue
        hint = "count every byte that must be stored, then 8 * bytes / n"
        if dq and math.isclose(got, 4 + 8 / blocksize, rel_tol=1e-6):
            hint = (
                "4 + 8/blocksize leaves out the second level: one fp32 absmax2 per 256 "
                "blocks (32 / (blocksize * 256) bits per weight) and the fp32 offset"
            )
        elif dq and math.isclose(got, 4 + 32 / blocksize, rel_tol=1e-6):
            hint = "with double quantization each block's absmax costs 8 bits, not 32"
        elif n < 2**20 and math.isclose(
            got,
            4 + (8 / blocksize + 32 / (blocksize * 256) if dq else 32 / blocksize),
            rel_tol=1e-6,
        ):
            hint = (
                "that is the large-tensor limit; for this n count exactly: ceil(n / 2) bytes, "
                "ceil(n / blocksize) scales, ceil(n_blocks / 256) second-level scales"
            )
        fail(
            check,
            "wrong bits per weight",
            expected=f"{want:.6f}",
            got=f"{got:.6f}",
            hint=hint,
            case=case,
        )


def check_bits_answer(my_bits_per_weight, *, student_id: str) -> None:
    """The bits per weight of the student's own tensor (rows x cols, their blocksize, double
    quantization on).

    `my_bits_per_weight` is the student's number (not a function), for the sizes of
    `nf4_variant(student_id)`.

    Examples:
        >>> nf4_variant("ada@example.edu")  # 13 x 33 = 429 weights, blocks of 32
        NF4Variant(rows=13, cols=33, blocksize=32, n_scales=634, seed=1676301819, offset=0.975)
        >>> n, n_blocks = 13 * 33, -(-13 * 33 // 32)  # 14 blocks: 215 + 14 + 4 + 4 bytes
        >>> my_bits_per_weight = 8 * (-(-n // 2) + n_blocks + 4 + 4) / n
        >>> check_bits_answer(my_bits_per_weight, student_id="ada@example.edu")  # silent: right
        >>> check_bits_answer(4.127, student_id="ada@example.edu")
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_bits_answer: wrong value
          case:     your tensor: 13 x 33 = 429 weights, blocksize 32
          expected: 4.419580
          got:      4.127
          hint:     bits_per_weight(rows * cols, blocksize) for YOUR sizes (see `variant`)
    """
    check = "check_bits_answer"
    v = nf4_variant(student_id)
    n = v.rows * v.cols
    nb = -(-n // v.blocksize)
    want = 8 * (-(-n // 2) + nb + 4 * (-(-nb // DQ_BLOCKSIZE)) + 4) / n
    case = f"your tensor: {v.rows} x {v.cols} = {n} weights, blocksize {v.blocksize}"
    got = as_number(check, my_bits_per_weight, "my_bits_per_weight", case=case)
    if not math.isclose(got, want, rel_tol=1e-9):
        fail(
            check,
            "wrong value",
            expected=f"{want:.6f}",
            got=fmt(got),
            hint="bits_per_weight(rows * cols, blocksize) for YOUR sizes (see `variant`)",
            case=case,
        )

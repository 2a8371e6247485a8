"""lowrank.torch.quant: dtypes, devices, packing, errors and the storage cost, the edges of
the float32 / float16 / bfloat16 ranges, refusal of inconsistent Quantized4bit objects, and
CUDA against CPU. Its CPU fast path against the plain tensor path is in
tests/torch/test_quant_cpu.py; NumPy-vs-torch identity in
tests/equivalence/test_quant_equivalence.py; bitsandbytes in tests/interop."""

import dataclasses
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from quant_bounds import BFLOAT16_MAX, FLOAT16_MAX, error_bound, extreme_weights

from lowrank.numpy import quant as np_quant
from lowrank.torch import quant, quant_cpu
from lowrank.torch.quant import (
    Quantized4bit,
    check_quantized,
    code_for,
    dequantize_4bit,
    nf4_code,
    pack_4bit,
    quantize_4bit,
    unpack_4bit,
)

QUANT_TYPES = ["nf4", "fp4", "int4"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtype_and_shape_preserved(dtype):
    w = torch.randn(3, 5, 7).to(dtype)
    q = quantize_4bit(w, blocksize=16)
    assert q.shape == (3, 5, 7) and q.dtype == dtype
    out = dequantize_4bit(q)
    assert out.shape == (3, 5, 7) and out.dtype == dtype
    # decoding is float32 arithmetic, then one cast: level * absmax rounded to the dtype
    float32 = dequantize_4bit(quantize_4bit(w.float(), blocksize=16))
    assert torch.equal(out, float32.to(dtype))


def test_layout_example():
    q = quantize_4bit(torch.tensor([1.0, -1.0, 1.0]), double_quant=False)
    assert q.packed.tolist() == [0xF0, 0xF7]  # 15, 0 | 15, pad = code of 0.0 (7)
    assert q.absmax.tolist() == [1.0]
    assert dequantize_4bit(q).tolist() == [1.0, -1.0, 1.0]
    zero = quantize_4bit(torch.zeros(130), double_quant=False)
    assert zero.absmax.tolist() == [0.0, 0.0, 0.0] and not dequantize_4bit(zero).any()


def test_nbytes_4096_square():
    q = quantize_4bit(torch.randn(4096, 4096), blocksize=64, quant_type="nf4", double_quant=True)
    n = 4096 * 4096
    # 4 + 8 / 64 + 32 / (64 * 256) bits per weight, plus a 4-byte offset
    assert q.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert q.nbytes * 8 / n == pytest.approx(4.127, abs=5e-4)


def test_absmax_float32_rebuild_formula():
    q = quantize_4bit(torch.randn(64 * 300))
    table = quant.dynamic_map()
    expected = table[q.absmax.long()] * q.absmax2.repeat_interleave(256)[:300] + q.offset
    assert torch.equal(q.absmax_float32(), expected)


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.tensor([1.0, float("nan")]), "NaN or inf"),
        (torch.tensor([float("-inf"), 1.0]), "NaN or inf"),
        (torch.tensor([1e300, 1.0], dtype=torch.float64), "float32 range"),
        (torch.zeros(0, 4), "empty"),
    ],
)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_bad_values(bad, match, quant_type):
    with pytest.raises(ValueError, match=match):
        quantize_4bit(bad, quant_type=quant_type)


@pytest.mark.parametrize("blocksize", [0, -64, 3, 100, 64.0, True])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="power of two"):
        quantize_4bit(torch.ones(8), blocksize=blocksize)


def test_bad_quant_type_and_types():
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(torch.ones(8), quant_type="fp8")
    with pytest.raises(TypeError, match="float"):
        quantize_4bit(torch.ones(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_4bit([1.0, 2.0])
    with pytest.raises(ValueError, match="uint8"):
        unpack_4bit(torch.zeros(2, dtype=torch.int32), 3)


def test_tables():
    assert torch.equal(nf4_code(), torch.from_numpy(quant.reference.nf4_code()))
    assert code_for("fp4").shape == (16,) and quant.dynamic_map().shape == (256,)


@settings(max_examples=40, deadline=None)
@given(codes=st.lists(st.integers(0, 15), min_size=0, max_size=75), pad=st.integers(0, 15))
def test_pack_unpack_round_trip(codes, pad):
    codes = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_4bit(codes, pad_code=pad)
    assert packed.shape == ((len(codes) + 1) // 2,) and packed.dtype == torch.uint8
    assert torch.equal(unpack_4bit(packed, len(codes)), codes)
    if len(codes) % 2:
        assert packed[-1].item() & 15 == pad


def test_to_device_and_meta_shapes():
    q = quantize_4bit(torch.randn(10, 10))
    moved = q.to("meta")
    assert moved.packed.is_meta and moved.nbytes == q.nbytes


# ---- the edges of the float ranges (rebuilt scales once overflowed to inf) ----


def edge_cases() -> list[tuple[str, torch.Tensor]]:
    """(name, w): the float32 edge cases of tests/quant_bounds.py in float32, and the same
    story at float16's and bfloat16's own edges (their max, their smallest values)."""
    cases = [
        (name, torch.from_numpy(w.astype(np.float32))) for name, w in extreme_weights().items()
    ]
    g = torch.Generator().manual_seed(0)
    for dtype, top in ((torch.float16, FLOAT16_MAX), (torch.bfloat16, BFLOAT16_MAX)):
        w = torch.full((64 * 21,), top)
        w[1::2] *= -1
        w[-64:] = 0  # one all-zero block: the other rebuilt scales overshoot the max
        cases.append((f"{dtype} max", w.to(dtype)))
        near = torch.randn(64 * 21, generator=g).abs().mul(top / 8).clamp(max=top)
        near[::64] = top
        cases.append((f"near {dtype} max", near.to(dtype)))
        tiny = torch.finfo(dtype).tiny
        cases.append((f"{dtype} smallest", (torch.rand(64 * 4, generator=g) * 4 * tiny).to(dtype)))
    return cases


EDGE_CASES = edge_cases()


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("name,w", EDGE_CASES, ids=[name for name, _ in EDGE_CASES])
def test_edges_decode_finite_within_bound_on_both_paths(name, w, double_quant, quant_type):
    """Both decoders (the CPU kernels and the tensor path CUDA runs) give finite values of the
    input's dtype, bit-identical to each other and to the NumPy reference cast to that dtype
    (float32, float16), and within the error bound of tests/quant_bounds.py (float64)."""
    q = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    cpu, tensor_path = dequantize_4bit(q), quant._dequantize(q)
    assert cpu.dtype == tensor_path.dtype == w.dtype
    assert torch.isfinite(cpu).all() and torch.isfinite(tensor_path).all(), name
    assert torch.equal(cpu.view(torch.uint8), tensor_path.view(torch.uint8)), name
    x = w.float().numpy()
    if w.dtype != torch.bfloat16:  # NumPy has no bfloat16; its float16 clamps to 65504 too
        kwargs = dict(blocksize=64, quant_type=quant_type, double_quant=double_quant)
        ref = np_quant.dequantize_4bit(np_quant.quantize_4bit(w.numpy(), **kwargs))
        assert torch.equal(cpu, torch.from_numpy(ref).to(w.dtype)), name
    # the float32 decode is within the bound; the final cast adds at most half a unit of the
    # dtype (2 ** -9 for float16, 2 ** -8 for bfloat16, relative), or of its subnormal spacing
    bound = error_bound(x, 64, quant.reference.code_for(quant_type), quant.reference.dynamic_map(),
                        double_quant)  # fmt: skip
    finfo = torch.finfo(w.dtype)
    out = cpu.double().numpy().reshape(-1)
    cast = finfo.eps * np.abs(out) + finfo.smallest_normal * finfo.eps
    assert np.all(np.abs(out - x.astype(np.float64)) <= bound + cast), name


def test_float16_at_its_max_was_inf():
    """The regression: the float32 decode of a double-quantized float16 weight at 65504 was
    65552 (finite), and the cast to float16 made it inf."""
    w = torch.full((64 * 21,), FLOAT16_MAX, dtype=torch.float16)
    w[-64:] = 0
    q = quantize_4bit(w)
    assert q.absmax_float32().max() > FLOAT16_MAX  # the rebuilt scale overshoots, in float32
    for out in (dequantize_4bit(q), quant._dequantize(q)):
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        assert torch.equal(out[:-64], w[:-64])  # every level 1.0: the clamped scale, 65504


def test_float32_max_rebuilt_scale_is_clamped_not_inf():
    w = torch.from_numpy(extreme_weights()["float32 max"].astype(np.float32))
    q = quantize_4bit(w)
    scales = q.absmax_float32()
    assert torch.isfinite(scales).all() and scales.max() == torch.finfo(torch.float32).max
    assert torch.equal(dequantize_4bit(q).abs()[:-64], w.abs()[:-64])


# ---- arguments and inconsistent Quantized4bit objects ----


@pytest.mark.parametrize("double_quant", ["no", "False", 1, 0, None, torch.tensor(True)])
def test_double_quant_must_be_a_bool(double_quant):
    with pytest.raises(TypeError, match="double_quant must be True or False"):
        quantize_4bit(torch.ones(8), double_quant=double_quant)
    with pytest.raises(ValueError, match="double_quant"):  # ArgumentTypeError is both
        quantize_4bit(torch.ones(8), double_quant=double_quant)


def valid(double_quant=True, n=200, blocksize=16) -> Quantized4bit:
    w = torch.randn(n, generator=torch.Generator().manual_seed(n))
    return quantize_4bit(w, blocksize=blocksize, double_quant=double_quant)


@pytest.mark.parametrize(
    "double_quant,changes,match",
    [
        (True, dict(double_quant=False), "absmax must be a torch.float32 tensor.*=False"),
        (False, dict(double_quant=True), "absmax must be a torch.uint8 tensor.*=True"),
        (True, dict(double_quant="no"), "double_quant must be True or False"),
        (True, dict(quant_type="fp8"), "quant_type"),
        (True, dict(blocksize=100), "blocksize must be a positive power of two"),
        (True, dict(blocksize=64), r"absmax must have shape \[4\].*ceil\(200 / 64\)"),
        (True, dict(shape=(202,)), r"packed must have shape \[101\]"),
        (True, dict(shape=(10, 10)), r"packed must have shape \[50\].*shape \(10, 10\)"),
        (True, dict(shape=(4, 0)), "at least one element"),
        (True, dict(shape=[200]), "shape must be a tuple of ints"),
        (True, dict(shape=(200.0,)), "shape must be a tuple of ints"),
        (True, dict(dtype=torch.int8), "dtype must be one of"),
        (True, dict(dtype=np.float32), "dtype must be one of"),
        (True, dict(offset=None), "offset is missing"),
        (True, dict(offset=torch.tensor(float("nan"))), "offset must be finite"),
        (True, dict(offset=torch.tensor(0.5, dtype=torch.float64)), "offset must be a torch.f"),
        (True, dict(offset=0.5), "offset must be a torch.float32 tensor.*got float"),
        (True, dict(offset=torch.ones(1)), r"offset must have shape \[\]"),
        (True, dict(absmax2=None), "absmax2 must be a torch.float32 tensor"),
        (True, dict(absmax2=torch.ones(2)), r"absmax2 must have shape \[1\]"),
        (True, dict(absmax2=torch.full((1,), float("inf"))), "absmax2 must be finite"),
        (True, dict(absmax2=torch.ones(1, device="meta")), "absmax2 is on meta"),
        (False, dict(offset=torch.tensor(0.0)), "offset must be None without double quant"),
        (False, dict(absmax2=torch.ones(1)), "absmax2 must be None"),
        (False, dict(absmax=torch.full((13,), float("nan"))), "absmax must be finite"),
        (False, dict(absmax=torch.ones(13, dtype=torch.float16)), "absmax must be a torch.f"),
        (False, dict(absmax=torch.ones(12)), r"absmax must have shape \[13\]"),
        (False, dict(packed=torch.zeros(99, dtype=torch.uint8)), r"packed must have shape"),
        (False, dict(packed=torch.zeros(100, 1, dtype=torch.uint8)), r"packed must have shape"),
        (False, dict(packed=torch.zeros(100, dtype=torch.int8)), "packed must be a torch.uint8"),
        (False, dict(packed=np.zeros(100, np.uint8)), "packed must be a torch.uint8.*ndarray"),
    ],
)
def test_inconsistent_quantized_is_refused(double_quant, changes, match):
    bad = dataclasses.replace(valid(double_quant), **changes)
    with pytest.raises((ValueError, TypeError), match=match):
        dequantize_4bit(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        check_quantized(bad)


def test_every_entry_point_checks():
    bad = dataclasses.replace(valid(), absmax2=torch.ones(5))
    for call in (dequantize_4bit, lambda q: q.absmax_float32(), lambda q: q.nbytes):
        with pytest.raises(ValueError, match="absmax2"):
            call(bad)
    # nbytes reads sizes only (it also works on the meta device, where nothing can be read)
    assert dataclasses.replace(valid(), offset=torch.tensor(float("inf"))).nbytes == valid().nbytes
    with pytest.raises(TypeError, match="Quantized4bit"):
        dequantize_4bit(torch.zeros(4, dtype=torch.uint8))


def tamper(q: Quantized4bit, kind: str, draw) -> tuple[Quantized4bit, tuple[str, ...]]:
    """q with one field made inconsistent as `kind` says, and the words one of which the error
    must contain (the field, or the field it contradicts)."""
    n = q.packed.numel() * 2  # n or n + 1; n itself from the shape:
    n = int(np.prod(q.shape))
    n_blocks = q.absmax.numel()
    if kind == "double_quant flipped":
        return dataclasses.replace(q, double_quant=not q.double_quant), ("double_quant",)
    if kind == "double_quant not a bool":
        value = draw(st.sampled_from(["no", "yes", 1, 0, None, torch.tensor(True)]))
        return dataclasses.replace(q, double_quant=value), ("double_quant",)
    if kind == "quant_type unknown":
        value = draw(st.sampled_from(["nf5", "NF4", "", None, 4, "dynamic"]))
        return dataclasses.replace(q, quant_type=value), ("quant_type",)
    if kind == "blocksize not a power of two":
        value = draw(st.sampled_from([0, -64, 3, 48, 64.0, True, "64", None]))
        return dataclasses.replace(q, blocksize=value), ("blocksize",)
    if kind == "blocksize another power of two":
        value = draw(st.sampled_from([b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
                                      if -(-n // b) != n_blocks]))  # fmt: skip
        return dataclasses.replace(q, blocksize=value), ("blocksize",)
    if kind == "shape needs more codes":
        return dataclasses.replace(q, shape=(n + draw(st.integers(2, 9)),)), ("shape",)
    if kind == "shape needs fewer codes":
        return dataclasses.replace(q, shape=(max(n - draw(st.integers(2, n + 1)), 0),)), ("shape",)
    if kind == "shape not ints":
        value = draw(st.sampled_from([[n], (float(n),), (True,) * n, str(n), None, (n, -1)]))
        return dataclasses.replace(q, shape=value), ("shape",)
    if kind == "dtype not float":
        value = draw(st.sampled_from([torch.int32, torch.uint8, torch.bool, torch.complex64,
                                      "float32", None, float, np.float32]))  # fmt: skip
        return dataclasses.replace(q, dtype=value), ("dtype",)
    if kind in ("packed", "absmax", "absmax2"):
        t = getattr(q, kind)
        if t is None:  # absmax2 without double quantization: must stay None
            return dataclasses.replace(q, absmax2=torch.ones(1)), ("absmax2",)
        how = draw(st.sampled_from(["shorter", "longer", "2-D", "dtype", "numpy", "None", "meta"]))
        if how == "shorter":
            t = t[: -draw(st.integers(1, t.numel()))]
        elif how == "longer":
            t = torch.cat([t, t[: draw(st.integers(1, t.numel()))]])
        elif how == "2-D":
            t = t.reshape(1, -1)
        elif how == "dtype":
            wrong = [torch.int8, torch.int16, torch.float16, torch.float64, torch.float32,
                     torch.uint8, torch.bfloat16]  # fmt: skip
            t = t.to(draw(st.sampled_from([d for d in wrong if d != t.dtype])))
        elif how == "numpy":
            t = t.numpy()
        elif how == "None":
            t = None
        else:  # on another device than packed (or packed away from the scales)
            t = t.to("meta")
        return dataclasses.replace(q, **{kind: t}), (kind, "packed")
    if kind == "scale not finite":
        value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        name = draw(st.sampled_from(["absmax2", "offset"])) if q.double_quant else "absmax"
        t = getattr(q, name).clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = value
        return dataclasses.replace(q, **{name: t}), (name,)
    if kind == "offset":
        if not q.double_quant:
            return dataclasses.replace(q, offset=torch.tensor(0.0)), ("offset",)
        value = draw(st.sampled_from([None, 0.5, torch.tensor(0.5, dtype=torch.float64),
                                      torch.ones(1), torch.ones(()).to("meta")]))  # fmt: skip
        return dataclasses.replace(q, offset=value), ("offset",)
    raise AssertionError(kind)


TAMPERINGS = [
    "double_quant flipped",
    "double_quant not a bool",
    "quant_type unknown",
    "blocksize not a power of two",
    "blocksize another power of two",
    "shape needs more codes",
    "shape needs fewer codes",
    "shape not ints",
    "dtype not float",
    "packed",
    "absmax",
    "absmax2",
    "scale not finite",
    "offset",
]


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 700),
    blocksize=st.sampled_from([2, 16, 64]),
    quant_type=st.sampled_from(QUANT_TYPES),
    double_quant=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    kind=st.sampled_from(TAMPERINGS),
    data=st.data(),
)
def test_tampered_quantized_is_refused_never_decoded(
    n, blocksize, quant_type, double_quant, dtype, kind, data
):
    """Neither decoder (the CPU kernels, the tensor path) is ever reached with a tampered q."""
    w = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    q = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    if kind == "blocksize another power of two" and -(-n // 512) == -(-n // blocksize) == 1:
        kind = "blocksize not a power of two"  # one block at every size: nothing to contradict
    bad, names = tamper(q, kind, data.draw)
    decoded = AssertionError("decoded a tampered Quantized4bit")
    with (
        mock.patch.object(quant_cpu, "dequantize", side_effect=decoded),
        mock.patch.object(quant, "_dequantize", side_effect=decoded),
        pytest.raises((ValueError, TypeError)) as error,
    ):
        dequantize_4bit(bad)
    assert any(name in str(error.value) for name in names), (kind, str(error.value))


# ---- CUDA (run by the lead on a GPU) ----


@pytest.mark.cuda
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_equals_cpu(quant_type, dtype):
    for shape in [(1,), (7,), (65,), (33, 77), (1024, 1000)]:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        cpu = quantize_4bit(w, blocksize=64, quant_type=quant_type)
        gpu = quantize_4bit(w.cuda(), blocksize=64, quant_type=quant_type)
        assert torch.equal(gpu.packed.cpu(), cpu.packed)
        assert torch.equal(gpu.absmax.cpu(), cpu.absmax)
        assert torch.equal(gpu.absmax2.cpu(), cpu.absmax2) and torch.equal(
            gpu.offset.cpu(), cpu.offset
        )
        assert torch.equal(dequantize_4bit(gpu).cpu(), dequantize_4bit(cpu))
    # the per-byte gather used on CUDA equals the CPU's two-byte table
    packed = torch.randint(0, 256, (999,), dtype=torch.uint8)
    assert torch.equal(
        quant._levels(packed.cuda(), quant_type).cpu(), quant_cpu._levels(packed, quant_type)
    )


@pytest.mark.cuda
def test_cuda_quantize_syncs_once_and_dequantize_never():
    """The only host round-trip is quantize's NaN/inf check, which the contract's ValueError
    needs; dequantize runs entirely on the device."""
    w = torch.randn(512, 1000, device="cuda")
    quantize_4bit(w)  # build the cached tables first (copying them to the GPU may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q = quantize_4bit(w, double_quant=True)
            q2 = quantize_4bit(w.bfloat16(), blocksize=128, quant_type="fp4", double_quant=False)
        syncs = [c for c in caught if "synchroniz" in str(c.message)]
        assert len(syncs) == 2, [str(c.message) for c in caught]
        torch.cuda.set_sync_debug_mode("error")
        out = dequantize_4bit(q)
        dequantize_4bit(q2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == w.shape


@pytest.mark.cuda
def test_cuda_rejects_non_finite_input():
    w = torch.randn(64, 64, device="cuda")
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_4bit(w)


@pytest.mark.cuda
@pytest.mark.parametrize("name,w", EDGE_CASES, ids=[name for name, _ in EDGE_CASES])
def test_cuda_edges_equal_cpu(name, w):
    for double_quant in (True, False):
        cpu = quantize_4bit(w, double_quant=double_quant)
        gpu = quantize_4bit(w.cuda(), double_quant=double_quant)
        assert torch.equal(gpu.packed.cpu(), cpu.packed) and torch.equal(
            gpu.absmax.cpu(), cpu.absmax
        )
        out = dequantize_4bit(gpu)
        assert torch.isfinite(out).all(), name
        assert torch.equal(out.cpu().view(torch.uint8), dequantize_4bit(cpu).view(torch.uint8))


@pytest.mark.cuda
def test_cuda_refuses_inconsistent_metadata_without_reading_values():
    q = quantize_4bit(torch.randn(200, device="cuda"), blocksize=16)
    for changes, match in [
        (dict(shape=(202,)), "packed must have shape"),
        (dict(absmax2=q.absmax2.cpu()), "absmax2 is on cpu"),
        (dict(double_quant=False), "absmax must be a torch.float32 tensor"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            dequantize_4bit(dataclasses.replace(q, **changes))
    # the values are not read on CUDA (that would be a host sync): a NaN offset decodes to NaN
    nan = dataclasses.replace(q, offset=torch.tensor(float("nan"), device="cuda"))
    assert torch.isnan(dequantize_4bit(nan)).all()

"""lowrank.torch.quant: dtypes, devices, packing, errors, the edges of the float32 / float16 /
bfloat16 ranges, and CUDA against CPU. The storage cost and refusal of inconsistent
Quantized4bit objects are in tests/torch/test_quantized.py, the tables in
tests/torch/test_codebooks.py; the CPU fast path against the plain tensor path in
tests/torch/test_quant_cpu.py; NumPy-vs-torch identity in
tests/equivalence/test_quant_equivalence.py; bitsandbytes in tests/interop."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from quant_bounds import BFLOAT16_MAX, FLOAT16_MAX, error_bound, extreme_weights

from lowrank.numpy import codebooks as np_codebooks
from lowrank.numpy import quant as np_quant
from lowrank.torch import quant
from lowrank.torch.quant import dequantize_4bit, pack_4bit, quantize_4bit, unpack_4bit

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


@settings(max_examples=40, deadline=None)
@given(codes=st.lists(st.integers(0, 15), min_size=0, max_size=75), pad=st.integers(0, 15))
def test_pack_unpack_round_trip(codes, pad):
    codes = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_4bit(codes, pad_code=pad)
    assert packed.shape == ((len(codes) + 1) // 2,) and packed.dtype == torch.uint8
    assert torch.equal(unpack_4bit(packed, len(codes)), codes)
    if len(codes) % 2:
        assert packed[-1].item() & 15 == pad


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
    bound = error_bound(x, 64, np_codebooks.code_for(quant_type), np_codebooks.dynamic_map(),
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


# ---- arguments ----


@pytest.mark.parametrize("double_quant", ["no", "False", 1, 0, None, torch.tensor(True)])
def test_double_quant_must_be_a_bool(double_quant):
    with pytest.raises(TypeError, match="double_quant must be True or False"):
        quantize_4bit(torch.ones(8), double_quant=double_quant)
    with pytest.raises(ValueError, match="double_quant"):  # ArgumentTypeError is both
        quantize_4bit(torch.ones(8), double_quant=double_quant)


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
    # the per-byte gather used on CUDA equals the NumPy reference's table, nibble by nibble
    packed = torch.randint(0, 256, (999,), dtype=torch.uint8)
    nibbles = np.stack([packed.numpy() >> 4, packed.numpy() & 15], 1).reshape(-1)
    expected = torch.from_numpy(np_codebooks.code_for(quant_type)[nibbles])
    assert torch.equal(quant._levels(packed.cuda(), quant_type).cpu(), expected)


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

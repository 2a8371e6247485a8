"""lowrank.torch.quant: dtypes, devices, packing, errors and the storage cost, and CUDA against
CPU. Its CPU fast path against the plain tensor path is in tests/torch/test_quant_cpu.py;
NumPy-vs-torch identity in tests/equivalence/test_quant_equivalence.py; bitsandbytes in
tests/interop."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank.torch import quant, quant_cpu
from lowrank.torch.quant import (
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

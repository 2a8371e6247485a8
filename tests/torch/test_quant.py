"""lowrank.torch.quant: its CPU fast paths against the plain tensor paths (which CUDA runs),
dtypes, devices, packing, errors and the storage cost. NumPy-vs-torch identity is in
tests/equivalence/test_quant_equivalence.py; bitsandbytes in tests/interop."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank.torch import quant
from lowrank.torch.quant import (
    code_for,
    dequantize_4bit,
    nf4_code,
    pack_4bit,
    quantize_4bit,
    unpack_4bit,
)

QUANT_TYPES = ["nf4", "fp4", "int4"]


def tricky_scaled_values(table: str) -> torch.Tensor:
    """Values in [-1, 1] that test a nearest-level search: every float32 midpoint and its two
    neighbouring floats, the levels, zeros, the ends, and random values."""
    search = quant._search_table(table, torch.device("cpu"))
    mids = search.midpoints
    up = torch.nextafter(mids, torch.tensor(2.0))
    down = torch.nextafter(mids, torch.tensor(-2.0))
    levels = torch.from_numpy(
        quant.reference.dynamic_map() if table == "dynamic" else quant.reference.code_for(table)
    )
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1.0000001, -1.0000001])
    rand = torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tiny = rand * 1e-3
    return torch.cat([mids, up, down, levels.clamp(-1, 1), special, rand, tiny])


@pytest.mark.parametrize("table", ["nf4", "fp4", "int4", "dynamic"])
def test_cpu_cell_lookup_equals_bucketize(table):
    scaled = tricky_scaled_values(table)
    fast = quant._nearest_code_cpu(scaled.numpy(), table)
    assert torch.equal(fast, quant._nearest_code(scaled, table))


@pytest.mark.parametrize("table", ["nf4", "fp4", "int4", "dynamic"])
@pytest.mark.parametrize("n,blocksize", [(1, 64), (7, 2), (130, 64), (20000, 256), (999, 1)])
def test_cpu_blocks_equal_tensor_blocks(table, n, blocksize):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4) * 10
    x[: n // 3] = 0  # all-zero blocks
    x[n // 2 :: 5] = x[n // 2 :: 5].bfloat16().float()  # short mantissas: more exact ties
    codes_cpu, absmax_cpu = quant._quantize_blocks_cpu(x, blocksize, table)
    codes, absmax = quant._quantize_blocks_tensor(x, blocksize, table)
    assert torch.equal(codes_cpu, codes) and torch.equal(absmax_cpu, absmax)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("n_bytes", [1, 2, 7, 1000])
def test_cpu_level_lookup_equals_per_nibble_gather(quant_type, n_bytes):
    packed = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8)
    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1).long()
    assert torch.equal(quant._levels(packed, quant_type), code_for(quant_type)[codes])


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
        quant._levels(packed.cuda(), quant_type).cpu(), quant._levels(packed, quant_type)
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


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_many_chunks_on_threads_equal_the_numpy_reference(
    monkeypatch, quant_type, dtype, double_quant
):
    """The CPU path splits work into chunks run on threads; tiny chunks force dozens of them
    (and a short last block) so chunk seams are covered. Oracle: lowrank.numpy, unchunked."""
    import numpy as np

    from lowrank.numpy import quant as reference

    monkeypatch.setattr(quant, "_QUANTIZE_CHUNK", 64)
    monkeypatch.setattr(quant, "_DEQUANTIZE_CHUNK", 128)
    w = torch.randn(10_001, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    expected = reference.quantize_4bit(
        w.float().numpy(), blocksize=64, quant_type=quant_type, double_quant=double_quant
    )
    np.testing.assert_array_equal(ours.packed.numpy(), expected.packed)
    np.testing.assert_array_equal(ours.absmax.numpy(), expected.absmax)
    values = reference.dequantize_4bit(expected)  # float32
    # torch's own float32 -> dtype cast of the reference values is the oracle for rounding
    assert torch.equal(dequantize_4bit(ours), torch.from_numpy(values).to(dtype))


def test_non_finite_value_in_a_later_chunk_is_caught(monkeypatch):
    monkeypatch.setattr(quant, "_QUANTIZE_CHUNK", 64)
    w = torch.randn(5_000)
    w[4_321] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_4bit(w)

"""lowrank.torch.quant_cpu, the CPU fast path, against the plain tensor path of
lowrank.torch.quant (which CUDA runs, and which also runs on CPU tensors): the same codes,
scales, packed bytes and dequantized bits, across chunk seams and threads. Every test runs
twice: with the C++ kernels (quant_native) and with the numba loops they stand in for."""

import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from quant_bounds import BFLOAT16_MAX, EDGE_VALUES

from lowrank.numpy import codebooks as np_codebooks
from lowrank.torch import codebooks, quant, quant_cpu, quant_native, quant_numba
from lowrank.torch.codebooks import code_for
from lowrank.torch.quant import dequantize_4bit, quantize_4bit
from lowrank.torch.quantized import Quantized4bit

QUANT_TYPES = ["nf4", "fp4", "int4"]


@pytest.fixture(autouse=True, params=["native", "numba"])
def kernels(request, monkeypatch):
    """The C++ kernels where they build, and the numba loops (what runs where they do not)."""
    if request.param == "numba":
        monkeypatch.setattr(quant_native, "kernels", lambda: None)
    elif quant_native.kernels() is None:
        pytest.skip(f"the C++ kernels do not build here: {quant_native.unavailable_reason()}")
    return request.param


def test_native_kernels_build_where_a_compiler_is(kernels):
    """CI has g++ and ninja: there the C++ kernels must build (else the tests above would only
    skip them)."""
    if kernels == "numba":
        pytest.skip("asks for the C++ kernels")
    if not (shutil.which("c++") or shutil.which("g++")) or not shutil.which("ninja"):
        pytest.skip("no C++ compiler or no ninja")
    assert quant_native.kernels() is not None, quant_native.unavailable_reason()


def tricky_scaled_values(table: str) -> torch.Tensor:
    """Values in [-1, 1] that test a nearest-level search: every float32 midpoint and its two
    neighbouring floats, the levels, zeros, the ends, and random values."""
    search = codebooks._search_table(table, torch.device("cpu"))
    mids = search.midpoints
    up = torch.nextafter(mids, torch.tensor(2.0))
    down = torch.nextafter(mids, torch.tensor(-2.0))
    levels = torch.from_numpy(
        np_codebooks.dynamic_map() if table == "dynamic" else np_codebooks.code_for(table)
    )
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1.0000001, -1.0000001])
    rand = torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tiny = rand * 1e-3
    return torch.cat([mids, up, down, levels.clamp(-1, 1), special, rand, tiny])


def weights(n: int) -> torch.Tensor:
    """[n] values of many magnitudes, all-zero blocks, and short mantissas (more exact ties)."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4) * 10
    x[: n // 3] = 0  # all-zero blocks
    x[n // 2 :: 5] = x[n // 2 :: 5].bfloat16().float()  # short mantissas: more exact ties
    return x


@pytest.mark.parametrize("table", ["nf4", "fp4", "int4", "dynamic"])
@pytest.mark.parametrize("pack", [False, True])
def test_cpu_nearest_level_equals_bucketize(table, pack):
    """Every midpoint, its two float neighbours, the levels and random values, in one short
    block whose absmax is exactly 1 (so each value is its own scaled value): the compiled
    comparison count (pack, 16-level tables) and the cell lookup give torch.bucketize's codes."""
    if pack and table == "dynamic":
        pytest.skip("the dynamic map has 256 levels: never packed into nibbles")
    scaled = torch.cat([tricky_scaled_values(table).clamp(-1, 1), torch.tensor([1.0])])
    codes, absmax = quant_cpu.quantize_blocks(scaled, 2**16, table, pack=pack)
    assert torch.equal(absmax, torch.tensor([1.0]))
    expected = quant._nearest_code(scaled, table)
    if pack:
        expected = quant.pack_4bit(expected, pad_code=quant_cpu._search_table(table).pad_code)
    assert torch.equal(codes, expected)


@pytest.mark.parametrize("table", ["nf4", "fp4", "int4", "dynamic"])
@pytest.mark.parametrize("n,blocksize", [(1, 64), (7, 2), (130, 64), (20000, 256), (999, 1)])
def test_cpu_blocks_equal_tensor_blocks(table, n, blocksize):
    x = weights(n)
    codes_cpu, absmax_cpu = quant_cpu.quantize_blocks(x, blocksize, table)
    codes, absmax = quant._quantize_blocks(x, blocksize, table)
    assert torch.equal(codes_cpu, codes) and torch.equal(absmax_cpu, absmax)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n,blocksize", [(1, 64), (7, 2), (131, 64), (20001, 256)])
def test_cpu_packed_blocks_equal_tensor_packed_blocks(quant_type, dtype, n, blocksize):
    x = weights(n).to(dtype)  # odd n: the last byte's low nibble is the code of 0.0
    packed_cpu, absmax_cpu = quant_cpu.quantize_blocks(x, blocksize, quant_type, pack=True)
    packed, absmax = quant._quantize_blocks(x, blocksize, quant_type, pack=True)
    assert packed.shape == ((n + 1) // 2,)
    assert torch.equal(packed_cpu, packed) and torch.equal(absmax_cpu, absmax)


def test_float16_rounding_equals_torch_cast():
    """The compiled float32 -> float16 rounding (nearest even, float16's subnormals) against
    torch's cast, on every 61st float32 bit pattern from 2 ** -27 to 65504 (both signs) and on
    the exact ties between float16 neighbours: each value is the scale of a block of 2 whose
    codes are 15 (NF4's level 1.0), so both its elements decode to the value itself. (Blocks
    of 2, not 1: a blocksize of 1 is half a byte and is decoded in NumPy, cast by torch.)"""
    start, stop = np.float32(2.0**-27).view(np.uint32), np.float32(65504.0).view(np.uint32)
    patterns = np.arange(start, stop, 61, dtype=np.uint32)
    halves = np.arange(1, 0x7BFF, dtype=np.uint16).view(np.float16).astype(np.float32)
    ties = (halves[:-1] + (halves[1:] - halves[:-1]) / 2).astype(np.float32)  # exact midpoints
    values = np.concatenate([patterns.view(np.float32), ties, [0.0, 65504.0]]).astype(np.float32)
    values = np.concatenate([values, -values])
    packed = torch.full((values.size,), 0xFF, dtype=torch.uint8)  # two codes 15 per block
    decoded = quant_cpu.dequantize(
        packed, torch.from_numpy(values), None, None, shape=(2 * values.size,),
        dtype=torch.float16, blocksize=2, quant_type="nf4", double_quant=False,
    )  # fmt: skip
    expected = torch.from_numpy(np.repeat(values, 2)).to(torch.float16)
    assert torch.equal(decoded.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("double_quant", [False, True])
def test_cpu_dequantize_equals_tensor_dequantize(monkeypatch, quant_type, dtype, double_quant):
    monkeypatch.setattr(quant_numba, "_DEQUANTIZE_CHUNK", 128)  # many chunks, and one short block
    for shape, blocksize in [((1,), 64), ((7,), 2), ((33, 77), 64), ((3, 1001), 128)]:
        w = weights(int(np.prod(shape))).reshape(shape).to(dtype)
        q = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
        fast, plain = dequantize_4bit(q), quant._dequantize(q)
        assert fast.dtype == plain.dtype == dtype and fast.shape == plain.shape == shape
        assert torch.equal(fast.view(-1).view(torch.uint8), plain.view(-1).view(torch.uint8))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0 * inf
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_dequantize_non_finite_scales_equal_tensor_dequantize(dtype):
    """Scales that are not finite (only a hand-made Quantized4bit has them, and
    `dequantize_4bit` refuses it): the two kernels, called directly, still agree (inf clamped
    to the dtype's max for float16/bfloat16, NaN through torch's cast)."""
    q = quantize_4bit(torch.randn(4, 64), blocksize=64, double_quant=False)
    absmax = torch.tensor([1.0, float("inf"), float("nan"), 0.5])
    q = Quantized4bit(q.packed, absmax, None, None, (4, 64), dtype, 64, "nf4", False)
    with pytest.raises(ValueError, match="absmax must be finite"):
        dequantize_4bit(q)
    fast = quant_cpu.dequantize(
        q.packed, absmax, None, None, shape=(4, 64), dtype=dtype, blocksize=64,
        quant_type="nf4", double_quant=False,
    )  # fmt: skip
    plain = quant._dequantize(q)
    assert torch.equal(fast.view(-1).view(torch.uint8), plain.view(-1).view(torch.uint8))


def edge_weights(n: int) -> torch.Tensor:
    """[n] float32 values at the edges of the range: blocks at float32's max, blocks of
    subnormals (absmax < 1e-38: lifted by 2 ** 64 before scaling), zero blocks."""
    g = torch.Generator().manual_seed(n)
    kind = torch.arange(n) // 64 % 4
    top = torch.finfo(torch.float32).max
    huge = torch.randn(n, generator=g).clamp(-1, 1) * top
    huge[::64] = top
    tiny = torch.randn(n, generator=g) * 1e-41
    x = torch.where(kind == 0, huge, torch.where(kind == 1, tiny, torch.randn(n, generator=g)))
    return torch.where(kind == 3, 0.0, x)


@pytest.mark.parametrize("table", ["nf4", "fp4", "int4", "dynamic"])
@pytest.mark.parametrize("n,blocksize", [(300, 2), (1000, 64), (20001, 64), (999, 1)])
def test_cpu_blocks_equal_tensor_blocks_at_the_edges(monkeypatch, table, n, blocksize):
    monkeypatch.setattr(quant_numba, "_QUANTIZE_CHUNK", 256)  # chunk seams, short last blocks
    x = edge_weights(n)
    codes_cpu, absmax_cpu = quant_cpu.quantize_blocks(x, blocksize, table)
    codes, absmax = quant._quantize_blocks(x, blocksize, table)
    assert torch.equal(codes_cpu, codes) and torch.equal(absmax_cpu, absmax)
    subnormal = torch.nonzero((absmax > 0) & (absmax < 1e-38)).view(-1)
    assert subnormal.numel() > 0
    if table == "dynamic":  # its levels stop at -0.993: no exact -1 to test against
        return
    # a subnormal block is scaled by its own absmax: its largest value takes the level +-1
    # (with the old 1e38 guard it was scaled to ~1e-3 and took the level 0)
    levels = code_for(table)
    for block in subnormal[:20].tolist():
        values = x[block * blocksize : (block + 1) * blocksize]
        i = block * blocksize + int(values.abs().argmax())
        assert levels[codes[i].long()] == x[i].sign()


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_cpu_dequantize_equals_tensor_dequantize_at_the_edges(
    monkeypatch, quant_type, dtype, double_quant
):
    """Values at float32's max (and so beyond float16's and bfloat16's, whose scales are then
    clamped to the dtype's max), subnormal blocks: both decoders give the same finite bits."""
    monkeypatch.setattr(quant_numba, "_DEQUANTIZE_CHUNK", 128)
    limit = torch.finfo(dtype).max
    x = edge_weights(3001).clamp(-limit, limit).to(dtype)
    q = quantize_4bit(x, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    fast, plain = dequantize_4bit(q), quant._dequantize(q)
    assert torch.isfinite(fast).all()
    assert torch.equal(fast.view(-1).view(torch.uint8), plain.view(-1).view(torch.uint8))


def test_cpu_scale_decoding_equals_absmax_float32():
    q = quantize_4bit(torch.randn(64 * 300))
    scales = quant_cpu._scales(q.absmax, q.offset, q.absmax2, q.double_quant)
    assert torch.equal(torch.from_numpy(scales), q.absmax_float32())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_many_chunks_on_threads_equal_the_numpy_reference(
    monkeypatch, quant_type, dtype, double_quant
):
    """The CPU path splits work into chunks run on threads; tiny chunks force dozens of them
    (and a short last block) so chunk seams are covered. Oracle: lowrank.numpy, unchunked."""
    from lowrank.numpy import quant as reference

    monkeypatch.setattr(quant_numba, "_QUANTIZE_CHUNK", 64)
    monkeypatch.setattr(quant_numba, "_DEQUANTIZE_CHUNK", 128)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunks_on_several_threads_equal_one_thread(monkeypatch, dtype):
    """The test run uses one torch thread (conftest), which runs the chunks in a loop: here
    three threads share them, and the results must not change."""
    monkeypatch.setattr(quant_numba, "_QUANTIZE_CHUNK", 64)
    monkeypatch.setattr(quant_numba, "_DEQUANTIZE_CHUNK", 128)
    # the C++ kernels share blocks among threads from 2 ** 16 elements on
    w = torch.randn(200_001, generator=torch.Generator().manual_seed(2)).to(dtype)
    one = quantize_4bit(w, blocksize=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        three = quantize_4bit(w, blocksize=64)
        decoded = dequantize_4bit(three)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(three.packed, one.packed) and torch.equal(three.absmax, one.absmax)
    assert torch.equal(decoded, dequantize_4bit(one))


def test_non_finite_value_in_a_later_chunk_is_caught(monkeypatch):
    monkeypatch.setattr(quant_numba, "_QUANTIZE_CHUNK", 64)
    w = torch.randn(5_000)
    w[4_321] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_4bit(w)


@settings(max_examples=60, deadline=None)
@given(
    w=hnp.arrays(
        np.float32,
        st.integers(1, 700),
        elements=st.one_of(
            st.floats(allow_nan=False, allow_infinity=False, width=32),  # subnormals too
            st.sampled_from(EDGE_VALUES),
        ),
    ),
    blocksize=st.sampled_from([1, 4, 64]),
    quant_type=st.sampled_from(QUANT_TYPES),
    double_quant=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_cpu_path_equals_tensor_path_and_numpy_on_any_floats(
    w, blocksize, quant_type, double_quant, dtype
):
    """Any finite floats, the edges of the range included: the CPU kernels, the tensor path and
    the NumPy reference (whose error bound tests/numpy/test_quant.py checks) agree bit for bit,
    and decode to finite values."""
    x = torch.from_numpy(w)
    if dtype == torch.bfloat16:  # float32's max would round to a bfloat16 inf
        x = x.clamp(-BFLOAT16_MAX, BFLOAT16_MAX).to(dtype)
    kwargs = dict(blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    q = quantize_4bit(x, **kwargs)
    packed, absmax = quant._quantize_blocks(x.reshape(-1), blocksize, quant_type, pack=True)
    if not double_quant:
        assert torch.equal(packed, q.packed) and torch.equal(absmax, q.absmax)
    fast, plain = dequantize_4bit(q), quant._dequantize(q)
    assert torch.isfinite(fast).all()
    assert torch.equal(fast.view(-1).view(torch.uint8), plain.view(-1).view(torch.uint8))
    ref = quant.reference.quantize_4bit(x.float().numpy(), **kwargs)
    np.testing.assert_array_equal(q.packed.numpy(), ref.packed)
    np.testing.assert_array_equal(q.absmax.numpy(), ref.absmax)
    if dtype == torch.float32:
        expected = quant.reference.dequantize_4bit(ref)
        np.testing.assert_array_equal(fast.numpy().view(np.uint32), expected.view(np.uint32))


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(kernels, tmp_path):
    """torch's cpp_extension waits without end on a `lock` file that a killed build left; one
    older than five minutes is removed before building, a fresh one (a build running now) kept."""
    if kernels == "numba":
        pytest.skip("about the build: once is enough")
    import os
    import time

    lock = tmp_path / "lock"
    lock.write_text("")
    quant_native._remove_stale_lock(tmp_path)
    assert lock.exists()
    old = time.time() - 10 * 60
    os.utime(lock, (old, old))
    quant_native._remove_stale_lock(tmp_path)
    assert not lock.exists()
    quant_native._remove_stale_lock(tmp_path)  # no lock: nothing to do


def test_without_a_compiler_numba_runs_quietly_and_gives_the_same_bits(kernels, tmp_path):
    """A fresh machine with no C++ compiler: `kernels()` is None with the shell's complaint as
    its reason, torch's build warnings stay quiet, and quantize and dequantize give the tensor
    path's bits through numba. (A fresh process: the library is cached once loaded.)"""
    if kernels == "numba":
        pytest.skip("builds in its own process: once is enough")
    import os
    import subprocess
    import sys

    script = """
import torch
from lowrank.torch import quant, quant_native
from lowrank.torch.quant import dequantize_4bit, quantize_4bit
assert quant_native.kernels() is None
print(quant_native.unavailable_reason())
w = torch.randn(300, 70, generator=torch.Generator().manual_seed(0))
q = quantize_4bit(w.to(torch.float16), blocksize=64)
packed, absmax = quant._quantize_blocks(w.to(torch.float16).reshape(-1), 64, "nf4", pack=True)
assert torch.equal(q.packed, packed)
assert torch.equal(dequantize_4bit(q), quant._dequantize(q))
"""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"))
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")  # no cached build to find
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "no-such-compiler: not found" in done.stdout
    assert "WARNING" not in done.stderr, done.stderr

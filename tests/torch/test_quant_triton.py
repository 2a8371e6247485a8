"""lowrank.torch.quant_triton, the Triton kernels CUDA runs, against two oracles that share no
code with them: the plain tensor path of lowrank.torch.quant and the NumPy reference
(lowrank.numpy.quant). Codes, packed bytes, absmax / absmax2 / offset and dequantized bits must
be identical, on the shapes and edge cases of tests/torch/test_quant_cpu.py.

Without a GPU the kernels run on CPU tensors in Triton's interpreter: quant_triton decorates
its kernels on first use, once per mode, so this holds whatever imported triton first and
whether or not TRITON_INTERPRET=1 is set (one test runs in a fresh process with it set, as CI
may). The interpreter is slow: sizes here are small. The @pytest.mark.cuda tests at the end run
the compiled kernels on a GPU.
"""

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from quant_bounds import BFLOAT16_MAX, FLOAT16_MAX, extreme_weights

pytest.importorskip("triton")
# the interpreter computes in NumPy, which warns where the kernels overflow on purpose (a
# rebuilt scale beyond float32, clamped next) or meet the inf of a refused input
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

from lowrank.numpy import codebooks as np_codebooks  # noqa: E402
from lowrank.numpy import quant as reference  # noqa: E402
from lowrank.torch import codebooks, quant, quant_triton  # noqa: E402
from lowrank.torch.quant import dequantize_4bit, quantize_4bit  # noqa: E402
from lowrank.torch.quantized import Quantized4bit  # noqa: E402

QUANT_TYPES = ["nf4", "fp4", "int4"]
TABLES = QUANT_TYPES + ["dynamic"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """quant.quantize_4bit / dequantize_4bit dispatch CPU tensors to the Triton kernels (which
    then run in the interpreter), as they dispatch CUDA tensors."""
    monkeypatch.setattr(quant_triton, "DEVICES", ("cuda", "cpu"))


def weights(n: int) -> torch.Tensor:
    """[n] values of many magnitudes, all-zero blocks, and short mantissas (more exact ties)."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4) * 10
    x[: n // 3] = 0  # all-zero blocks
    x[n // 2 :: 5] = x[n // 2 :: 5].bfloat16().float()  # short mantissas: more exact ties
    return x


def edge_weights(n: int) -> torch.Tensor:
    """[n] float32 values at the edges of the range, in runs of 64: values up to float32's max,
    subnormals (absmax < 1e-38: lifted by 2 ** 64 before scaling), normal values, zeros."""
    g = torch.Generator().manual_seed(n)
    kind = torch.arange(n) // 64 % 4
    top = torch.finfo(torch.float32).max
    huge = torch.randn(n, generator=g).clamp(-1, 1) * top
    huge[::64] = top
    tiny = torch.randn(n, generator=g) * 1e-41
    x = torch.where(kind == 0, huge, torch.where(kind == 1, tiny, torch.randn(n, generator=g)))
    return torch.where(kind == 3, 0.0, x)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


# ---- quantize: the block kernel against the tensor path ----


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("n,blocksize", [(1, 64), (7, 2), (130, 64), (999, 1), (5000, 256)])
def test_blocks_equal_tensor_blocks(table, n, blocksize):
    x = weights(n)
    codes, absmax = quant_triton.quantize_blocks(x, blocksize, table)
    expected_codes, expected_absmax = quant._quantize_blocks(x, blocksize, table)
    assert torch.equal(codes, expected_codes) and same_bits(absmax, expected_absmax)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("n,blocksize", [(1, 64), (7, 2), (131, 64), (3001, 128)])
def test_packed_blocks_equal_tensor_packed_blocks(quant_type, dtype, n, blocksize):
    x = weights(n).to(dtype)  # odd n: the last byte's low nibble is the code of 0.0
    packed, absmax = quant_triton.quantize_blocks(x, blocksize, quant_type, pack=True)
    expected_packed, expected_absmax = quant._quantize_blocks(x, blocksize, quant_type, pack=True)
    assert packed.shape == ((n + 1) // 2,)
    assert torch.equal(packed, expected_packed) and same_bits(absmax, expected_absmax)


@pytest.mark.parametrize("table", TABLES)
def test_ties_and_midpoints_take_the_codes_of_bucketize(table):
    """Blocks whose absmax is exactly 1 (scaled = x, exactly), holding every float32 midpoint
    and its two neighbouring floats, the levels, zeros and the ends: a tie takes the lower
    level, as torch.bucketize over the midpoints (the oracle) gives."""
    mids = codebooks._search_table(table, torch.device("cpu")).midpoints
    levels = torch.from_numpy(
        np_codebooks.dynamic_map() if table == "dynamic" else np_codebooks.code_for(table)
    )
    values = torch.cat(
        [
            mids,
            torch.nextafter(mids, torch.tensor(2.0)),
            torch.nextafter(mids, torch.tensor(-2.0)),
            levels.clamp(-1, 1),
            torch.tensor([0.0, -0.0, 1e-30, -1e-30, -1.0]),
            torch.rand(500, generator=torch.Generator().manual_seed(0)) * 2 - 1,
        ]
    )
    values = values[values.abs() <= 1]  # int4's lowest midpoint lies below -1
    blocks = torch.cat([torch.ones(values.numel(), 1), values[:, None]], dim=1)  # [m, 2]
    x = blocks.reshape(-1)  # blocks of 2: (1.0, value)
    codes, absmax = quant_triton.quantize_blocks(x, 2, table)
    assert torch.all(absmax == 1.0)
    assert torch.equal(codes[1::2], quant._nearest_code(values, table))


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("n,blocksize", [(300, 2), (1000, 64), (4001, 64), (999, 1)])
def test_blocks_equal_tensor_blocks_at_the_edges(table, n, blocksize):
    """float32's max, subnormal blocks (lifted by 2 ** 64), zero blocks, a short last block."""
    x = edge_weights(n)
    codes, absmax = quant_triton.quantize_blocks(x, blocksize, table)
    expected_codes, expected_absmax = quant._quantize_blocks(x, blocksize, table)
    assert torch.equal(codes, expected_codes) and same_bits(absmax, expected_absmax)
    assert torch.any((absmax > 0) & (absmax < 1e-38))  # the lifted blocks were there


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_value_makes_its_absmax_non_finite(bad):
    """The kernel never drops a NaN (its bits are above inf's): quantize's check sees it."""
    x = torch.randn(1000)
    x[777] = bad
    _, absmax = quant_triton.quantize_blocks(x, 64, "nf4", pack=True)
    assert torch.isfinite(absmax).tolist() == [i != 777 // 64 for i in range(absmax.numel())]


# ---- dequantize: the decode kernel against the tensor path ----


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_equals_tensor_dequantize(quant_type, dtype, double_quant):
    for shape, blocksize in [((1,), 64), ((7,), 2), ((33, 77), 64), ((3, 1001), 128)]:
        w = weights(math.prod(shape)).reshape(shape).to(dtype)
        q = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
        out = quant_triton.dequantize(
            q.packed, q.absmax, q.offset, q.absmax2, shape=q.shape, dtype=q.dtype,
            blocksize=q.blocksize, quant_type=q.quant_type, double_quant=q.double_quant,
        )  # fmt: skip
        assert out.shape == shape and same_bits(out, quant._dequantize(q))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_equals_tensor_dequantize_at_the_edges(
    triton_on_cpu, quant_type, dtype, double_quant
):
    """Values at float32's max (beyond float16's and bfloat16's: their scales are clamped to
    the dtype's max), subnormal blocks, zero blocks: the same finite bits."""
    limit = torch.finfo(dtype).max
    x = edge_weights(2001).clamp(-limit, limit).to(dtype)
    q = quantize_4bit(x, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    out = dequantize_4bit(q)
    assert torch.isfinite(out).all() and same_bits(out, quant._dequantize(q))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0 * inf
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_non_finite_scales_equal_tensor_dequantize(dtype):
    """Scales that are not finite (only a hand-made Quantized4bit has them): inf clamped to the
    dtype's max for float16 / bfloat16, NaN where the tensor path has NaN (NaN bits may
    differ: torch's own casts differ between CPU and CUDA)."""
    q = quantize_4bit(torch.randn(4, 64), blocksize=64, double_quant=False)
    absmax = torch.tensor([1.0, float("inf"), float("nan"), 0.5])
    q = Quantized4bit(q.packed, absmax, None, None, (4, 64), dtype, 64, "nf4", False)
    out = quant_triton.dequantize(
        q.packed, absmax, None, None, shape=(4, 64), dtype=dtype, blocksize=64,
        quant_type="nf4", double_quant=False,
    )  # fmt: skip
    expected = quant._dequantize(q)
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert same_bits(out[finite], expected[finite])


# ---- through quantize_4bit / dequantize_4bit, against the NumPy reference ----


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dispatch_equals_the_numpy_reference(triton_on_cpu, quant_type, dtype, double_quant):
    """quantize_4bit on the Triton kernels (double quantization included: several absmax2
    blocks) gives the reference's fields, and decodes to its float32 values cast by torch."""
    n = 64 * 260 + 3 if double_quant else 2003  # 261 blocks: two absmax2 blocks
    w = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    expected = reference.quantize_4bit(
        w.float().numpy(), blocksize=64, quant_type=quant_type, double_quant=double_quant
    )
    np.testing.assert_array_equal(ours.packed.numpy(), expected.packed)
    np.testing.assert_array_equal(ours.absmax.numpy(), expected.absmax)
    if double_quant:
        assert ours.absmax2.numel() == 2
        np.testing.assert_array_equal(ours.absmax2.numpy(), expected.absmax2)
        np.testing.assert_array_equal(ours.offset.numpy(), expected.offset)
    values = torch.from_numpy(reference.dequantize_4bit(expected))  # float32
    assert same_bits(dequantize_4bit(ours), values.to(dtype))


@pytest.mark.parametrize("blocksize", [64, 128, 256, 512, 1024, 2048, 4096])
def test_every_blocksize_equals_the_numpy_reference(triton_on_cpu, blocksize):
    w = weights(4096 * 3 + 5)  # three whole blocks of 4096, a short one
    ours = quantize_4bit(w, blocksize=blocksize)
    expected = reference.quantize_4bit(w.numpy(), blocksize=blocksize)
    for name in ("packed", "absmax", "absmax2", "offset"):
        np.testing.assert_array_equal(getattr(ours, name).numpy(), getattr(expected, name))
    values = reference.dequantize_4bit(expected)
    assert same_bits(dequantize_4bit(ours), torch.from_numpy(values))


def edge_cases() -> list[tuple[str, torch.Tensor]]:
    """The float32 edges of tests/quant_bounds.py and float16's / bfloat16's own (their max,
    where rebuilt scales overshoot; their smallest values), as tests/torch/test_quant.py."""
    cases = [
        (name, torch.from_numpy(w.astype(np.float32))) for name, w in extreme_weights().items()
    ]
    g = torch.Generator().manual_seed(0)
    for dtype, top in ((torch.float16, FLOAT16_MAX), (torch.bfloat16, BFLOAT16_MAX)):
        w = torch.full((64 * 21,), top)
        w[1::2] *= -1
        w[-64:] = 0
        cases.append((f"{dtype} max", w.to(dtype)))
        tiny = torch.finfo(dtype).tiny
        cases.append((f"{dtype} smallest", (torch.rand(64 * 4, generator=g) * 4 * tiny).to(dtype)))
    return cases


EDGE_CASES = edge_cases()


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("name,w", EDGE_CASES, ids=[name for name, _ in EDGE_CASES])
def test_edges_equal_the_cpu_kernels(monkeypatch, name, w, double_quant):
    """Oracle: quant_cpu (itself checked against the tensor path and NumPy)."""
    expected = quantize_4bit(w, double_quant=double_quant)  # quant_cpu
    expected_values = dequantize_4bit(expected)
    monkeypatch.setattr(quant_triton, "DEVICES", ("cuda", "cpu"))
    ours = quantize_4bit(w, double_quant=double_quant)
    for field in ("packed", "absmax", "absmax2", "offset"):
        a, b = getattr(ours, field), getattr(expected, field)
        assert (a is None and b is None) or same_bits(a, b), (name, field)
    out = dequantize_4bit(ours)
    assert torch.isfinite(out).all() and same_bits(out, expected_values), name


def test_non_finite_input_is_refused(triton_on_cpu):
    w = torch.randn(64, 64)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_4bit(w)


def test_dispatch_rules(monkeypatch):
    assert not quant_triton.handles(torch.device("cpu"), 64)  # CPU keeps quant_cpu
    assert quant_triton.handles(torch.device("cuda"), 64)  # triton is installed here
    assert not quant_triton.handles(torch.device("cuda"), 2 * quant_triton.MAX_BLOCKSIZE)
    monkeypatch.setattr(quant_triton, "available", lambda: False)
    assert not quant_triton.handles(torch.device("cuda"), 64)  # the tensor path, then


def test_interpreter_with_triton_interpret_set_before_import():
    """CI may set TRITON_INTERPRET=1 for the whole run (triton's standard library is then
    interpreted too): the kernels still give the tensor path's bits, in a fresh process."""
    script = (
        "import torch\n"
        "from lowrank.torch import quant, quant_triton\n"
        "x = torch.randn(999, generator=torch.Generator().manual_seed(0))\n"
        "got = quant_triton.quantize_blocks(x, 64, 'fp4', pack=True)\n"
        "want = quant._quantize_blocks(x, 64, 'fp4', pack=True)\n"
        "q = quant.quantize_4bit(x.bfloat16())\n"
        "out = quant_triton.dequantize(q.packed, q.absmax, q.offset, q.absmax2, shape=q.shape,\n"
        "    dtype=q.dtype, blocksize=64, quant_type='nf4', double_quant=True)\n"
        "assert all(torch.equal(a, b) for a, b in zip(got, want))\n"
        "assert torch.equal(out.view(torch.int16), quant._dequantize(q).view(torch.int16))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


KERNEL_VARIANTS = [  # (kernel, pointer types, constexprs): what CUDA compiles most often
    ("quantize", ["*i16", "*fp32", "*u8", "*fp32", "*u8"],
     dict(BLOCKSIZE=64, BLOCKS=16, N_MIDPOINTS=15, SORTED=False, BFLOAT16=True, PACK=True,
          TINY_BITS=quant_triton._TINY_BITS)),
    ("quantize", ["*fp32", "*fp32", "*u8", "*fp32", "*u8"],
     dict(BLOCKSIZE=256, BLOCKS=4, N_MIDPOINTS=255, SORTED=False, BFLOAT16=False, PACK=False,
          TINY_BITS=quant_triton._TINY_BITS)),
    ("dequantize", ["*u8", "*u8", "*fp32", "*fp32", "*fp32", "*fp32", "*i16"],
     dict(BLOCKSIZE=64, BLOCKS=32, DOUBLE_QUANT=True, SCALE_BLOCKSIZE=256,
          FLOAT32_LIMIT=quant_triton.FLOAT32_MAX, LIMIT=BFLOAT16_MAX, CLAMP=True, BFLOAT16=True)),
    ("dequantize", ["*u8", "*fp32", "*fp32", "*fp32", "*fp32", "*fp32", "*fp16"],
     dict(BLOCKSIZE=1, BLOCKS=2048, DOUBLE_QUANT=False, SCALE_BLOCKSIZE=256,
          FLOAT32_LIMIT=quant_triton.FLOAT32_MAX, LIMIT=FLOAT16_MAX, CLAMP=True, BFLOAT16=False)),
]  # fmt: skip


@pytest.mark.parametrize("name,pointers,constexprs", KERNEL_VARIANTS)
def test_kernels_compile_for_a_gpu_without_one(name, pointers, constexprs):
    """The interpreter runs Python, not what CUDA compiles: build the real kernels for an
    H100/H200 (sm_90) to PTX here, and check the float32 operations the bits depend on: IEEE
    division (not the default approximate one), no fused multiply-add, no flush to zero."""
    triton = pytest.importorskip("triton")
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip("written against the compiler API of triton 3.9 (ASTSource, GPUTarget)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = quant_triton._kernel(name, interpret=False)
    arguments = [name for name in kernel.arg_names if name not in constexprs]
    integers = ["i32"] * (len(arguments) - len(pointers))  # n, n_bytes (and pad_code)
    signature = dict(zip(arguments, pointers + integers, strict=True))
    signature.update({key: "constexpr" for key in constexprs})
    # aligned pointers, and n, n_bytes multiples of 16: what a launch on a weight sees
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers) + 2)}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    try:
        compiled = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}
        )
    except RuntimeError as error:  # e.g. no ptxas in this triton build
        pytest.skip(f"triton cannot build for CUDA here: {error}")
    ptx = compiled.asm["ptx"]
    assert "fma." not in ptx and ".ftz" not in ptx and "div.full" not in ptx
    assert "div.approx" not in ptx
    if name == "quantize":
        assert "div.rn.f32" in ptx
    else:  # aligned, the values go out as 16-byte vectors
        assert "st.global.v4" in ptx


# ---- CUDA: the compiled kernels (run by the lead on a GPU) ----


def cuda_fields(q: Quantized4bit) -> dict[str, torch.Tensor | None]:
    return {name: getattr(q, name) for name in ("packed", "absmax", "absmax2", "offset")}


@pytest.mark.cuda
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])  # int4 takes nf4's kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_cuda_kernels_equal_tensor_path_and_cpu(quant_type, dtype, double_quant):
    # few shapes: each new (blocksize, dtype, divisibility of n) is a compilation (~1 s)
    for shape, blocksize in [((7,), 2), ((33, 77), 64), ((1024, 1000), 64), ((300, 4099), 4096)]:
        w = weights(math.prod(shape)).reshape(shape).to(dtype)
        kwargs = dict(blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
        gpu = quantize_4bit(w.cuda(), **kwargs)  # the Triton kernels
        cpu = quantize_4bit(w, **kwargs)  # quant_cpu
        x = w.cuda().reshape(-1)
        packed, absmax = quant._quantize_blocks(x, blocksize, quant_type, pack=True)
        assert torch.equal(gpu.packed, packed), (shape, blocksize)
        if not double_quant:
            assert same_bits(gpu.absmax, absmax)
        for name, t in cuda_fields(gpu).items():
            expected = getattr(cpu, name)
            assert (t is None and expected is None) or same_bits(t.cpu(), expected), name
        out = dequantize_4bit(gpu)
        assert same_bits(out, quant._dequantize(gpu)), (shape, blocksize)
        assert same_bits(out.cpu(), dequantize_4bit(cpu)), (shape, blocksize)


@pytest.mark.cuda
@pytest.mark.parametrize("name,w", EDGE_CASES, ids=[name for name, _ in EDGE_CASES])
def test_cuda_edges_equal_cpu(name, w):
    for double_quant in (True, False):
        cpu = quantize_4bit(w, double_quant=double_quant)
        gpu = quantize_4bit(w.cuda(), double_quant=double_quant)
        for field, t in cuda_fields(gpu).items():
            expected = getattr(cpu, field)
            assert (t is None and expected is None) or same_bits(t.cpu(), expected), field
        out = dequantize_4bit(gpu)
        assert torch.isfinite(out).all(), name
        assert same_bits(out.cpu(), dequantize_4bit(cpu)), name


@pytest.mark.cuda
def test_cuda_edge_blocks_equal_tensor_blocks():
    x = edge_weights(20001).cuda()
    for table in TABLES:
        for blocksize in (1, 64, 4096):
            got = quant_triton.quantize_blocks(x, blocksize, table)
            want = quant._quantize_blocks(x, blocksize, table)
            assert torch.equal(got[0], want[0]) and same_bits(got[1], want[1]), table


@pytest.mark.cuda
def test_cuda_dequantize_never_syncs_and_quantize_once():
    """dequantize runs entirely on the device; quantize's one host round-trip is its NaN/inf
    check, which the contract's ValueError needs."""
    assert quant_triton.handles(torch.device("cuda"), 64)
    w = torch.randn(512, 1000, device="cuda")
    quantized = []
    for dtype in DTYPES:  # also compiles the kernels and builds the cached tables
        quantized.append(quantize_4bit(w.to(dtype)))
        quantized.append(quantize_4bit(w.to(dtype), quant_type="fp4", double_quant=False))
        dequantize_4bit(quantized[-1]), dequantize_4bit(quantized[-2])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quantize_4bit(w)
        syncs = [c for c in caught if "synchroniz" in str(c.message)]
        assert len(syncs) == 1, [str(c.message) for c in caught]
        torch.cuda.set_sync_debug_mode("error")
        outs = [dequantize_4bit(q) for q in quantized]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [out.dtype for out in outs] == [dtype for dtype in DTYPES for _ in range(2)]

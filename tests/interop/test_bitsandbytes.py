"""Our 4-bit format against bitsandbytes, the reference implementation of QLoRA: tables, packed
codes, scales, dequantized values, double quantization's error, and the Linear4bit state-dict
format in both directions."""

import numpy as np
import pytest
import torch

from lowrank.numpy import quant as np_quant
from lowrank.torch import (
    dequantize_4bit,
    dynamic_map,
    fp4_code,
    from_bnb_state_dict,
    nf4_code,
    quantize_4bit,
    to_bnb_state_dict,
)

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(1,), (2,), (7,), (63,), (64,), (65,), (129,), (3, 5), (33, 77), (1, 4096), (4096, 1),
          (300, 20), (2, 3, 100), (700, 96)]  # fmt: skip
BLOCKSIZES = [32, 64, 256, 4096]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(shape, dtype, seed=0):
    """Normal weights with heavy-ish tails, some all-zero blocks and exact zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(3).mul(4).add(0.1)
    flat = w.view(-1)
    if flat.numel() >= 300:
        flat[64:192] = 0  # two all-zero blocks at blocksize 64
    flat[:: max(1, flat.numel() // 7)] = 0
    return w.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_tables_bit_identical():
    assert torch.equal(bits(nf4_code()), bits(F.get_4bit_type("nf4", device="cpu")))
    assert torch.equal(bits(fp4_code()), bits(F.get_4bit_type("fp4", device="cpu")))
    assert torch.equal(bits(dynamic_map()), bits(F.create_dynamic_map(signed=True)))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_and_absmax_bit_identical(quant_type, dtype):
    for shape in SHAPES:
        for blocksize in BLOCKSIZES:
            w = weight(shape, dtype, seed=blocksize)
            packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
            ours = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=False)
            where = f"{quant_type} {dtype} {shape} blocksize {blocksize}"
            assert torch.equal(ours.packed, packed.view(-1)), where
            # bitsandbytes' CPU path stores 1e-38 (its divide-by-zero guard) as the absmax of an
            # all-zero *partial* last block; the contract says 0. Both decode to exact zeros.
            theirs = state.absmax.clone()
            theirs[theirs == 1e-38] = 0
            assert torch.equal(bits(ours.absmax), bits(theirs)), where
            # the NumPy reference agrees too
            ref = np_quant.quantize_4bit(
                w.float().numpy(), blocksize=blocksize, quant_type=quant_type, double_quant=False
            )
            np.testing.assert_array_equal(ref.packed, packed.view(-1).numpy(), err_msg=where)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantized_values_identical(quant_type, dtype):
    # every shape: against bitsandbytes' table and scales applied by hand, level * absmax
    table = F.get_4bit_type(quant_type, device="cpu")
    for shape in SHAPES:
        w = weight(shape, dtype)
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
        ours = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=False)
        n = w.numel()
        codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)[:n]
        scales = state.absmax.repeat_interleave(64)[:n]
        expected = (table[codes.long()] * scales).to(dtype).reshape(shape)
        assert dequantize_4bit(ours).dtype == dtype
        assert torch.equal(dequantize_4bit(ours), expected), (shape, dtype)
    # and against bitsandbytes' own dequantize where its native CPU kernel is right: rows that
    # hold whole blocks (other row lengths mix up blocks there, a bitsandbytes bug), more than
    # one byte (a single byte comes back transposed, an old-API shim)
    for shape in [(4, 64), (3, 128), (33, 192), (700, 64)]:
        w = weight(shape, dtype)
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
        ours = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=False)
        assert torch.equal(dequantize_4bit(ours), F.dequantize_4bit(packed, state)), shape


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_no_worse_than_bitsandbytes(quant_type):
    # bitsandbytes' CPU 8-bit quantizer (used for the absmax codes) finds the code with an
    # approximate lookup, so in rare places its 8-bit codes differ from our exact nearest-level
    # search. We do not copy the approximation; instead: our rebuilt scales and weights are at
    # least as close to the originals as bitsandbytes'.
    w = weight((1024, 1024), torch.float32, seed=1)
    packed, state = F.quantize_4bit(
        w, blocksize=64, quant_type=quant_type, compress_statistics=True
    )
    ours = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=True)
    assert torch.equal(ours.packed, packed.view(-1))  # 4-bit codes use the exact absmax
    exact = w.view(-1, 64).abs().amax(1)
    theirs_absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    ours_err = (ours.absmax_float32() - exact).abs()
    theirs_err = (theirs_absmax - exact).abs()
    assert ours_err.max() <= theirs_err.max() * (1 + 1e-6)
    assert ours_err.mean() <= theirs_err.mean() * (1 + 1e-6)
    # the weights: ~30 of 16384 scales differ by one 8-bit step, which moves the mean error by
    # ~1e-6 relative either way (a closer scale need not bring every weight in its block closer)
    ours_w_err = (dequantize_4bit(ours) - w).abs().mean()
    theirs_w_err = (F.dequantize_4bit(packed, state) - w).abs().mean()
    assert ours_w_err <= theirs_w_err * (1 + 1e-4)
    # and the layout is the same: uint8 codes, one float32 scale per 256, float32 offset
    assert ours.absmax.dtype == state.absmax.dtype == torch.uint8
    assert ours.absmax2.shape == state.state2.absmax.shape


def bnb_linear4bit(linear, quant_type, double_quant, blocksize=64):
    """bitsandbytes' Linear4bit holding `linear`'s weight (in its dtype), quantized on CPU."""
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        module=layer,
    )
    layer.weight._quantize("cpu")
    return layer


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_from_bitsandbytes(quant_type, double_quant, dtype):
    linear = torch.nn.Linear(300, 70).to(dtype)
    layer = bnb_linear4bit(linear, quant_type, double_quant)
    state_dict = {"layer." + k: v for k, v in layer.state_dict().items()}
    q = from_bnb_state_dict(state_dict, prefix="layer.weight")
    assert q.double_quant == double_quant and q.dtype == dtype and q.shape == (70, 300)
    expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(dequantize_4bit(q), expected)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_state_dict_to_bitsandbytes(quant_type, double_quant, dtype):
    w = weight((70, 300), dtype, seed=3)
    q = quantize_4bit(w, blocksize=128, quant_type=quant_type, double_quant=double_quant)
    entries = to_bnb_state_dict(q, prefix="weight")
    # bitsandbytes' own loader (what transformers calls for a pre-quantized checkpoint)
    stats = {k: v for k, v in entries.items() if k != "weight"}
    param = bnb.nn.Params4bit.from_prequantized(entries["weight"], stats, device="cpu")
    assert param.quant_state.nested == double_quant
    theirs = F.dequantize_4bit(param.data, param.quant_state)
    assert theirs.shape == (70, 300) and theirs.dtype == dtype
    assert torch.equal(theirs, dequantize_4bit(q))
    # the same keys, shapes and dtypes as bitsandbytes' own Linear4bit writes
    layer = bnb_linear4bit(torch.nn.Linear(300, 70).to(dtype), quant_type, double_quant, 128)
    reference = {k: v for k, v in layer.state_dict().items() if k.startswith("weight")}
    assert entries.keys() == reference.keys()
    for key, value in reference.items():
        if "quant_state" not in key:
            assert entries[key].shape == value.shape and entries[key].dtype == value.dtype, key


def test_state_dict_with_a_different_8bit_map_still_decodes_identically():
    linear = torch.nn.Linear(256, 64)
    layer = bnb_linear4bit(linear, "nf4", True)
    state = layer.weight.quant_state
    state.state2.code = state.state2.code.clone()
    state.state2.code[200] += 1e-3  # as if written by a build whose map differs in a bit
    expected = F.dequantize_4bit(layer.weight.data, state)
    q = from_bnb_state_dict(layer.state_dict())
    assert not q.double_quant  # decoded with the file's map, kept as float32 scales
    assert torch.equal(dequantize_4bit(q), expected)


def test_state_dict_errors():
    q = quantize_4bit(torch.randn(8, 8), quant_type="int4")
    with pytest.raises(ValueError, match="nf4 or fp4"):
        to_bnb_state_dict(q)
    with pytest.raises(ValueError, match="blocksize"):
        to_bnb_state_dict(quantize_4bit(torch.randn(8, 8), blocksize=16))
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit weight"):
        from_bnb_state_dict({"weight": torch.zeros(4, 1, dtype=torch.uint8)})
    entries = to_bnb_state_dict(quantize_4bit(torch.randn(8, 8)))
    entries["weight.quant_map"] = fp4_code()
    with pytest.raises(ValueError, match="quant_map"):
        from_bnb_state_dict(entries)


def bnb_has_cuda() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        F.quantize_4bit(torch.randn(64, device="cuda"), quant_type="nf4")
    except Exception:  # the library's CUDA backend did not load
        return False
    return True


@pytest.mark.cuda
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_codes_match_bitsandbytes_cuda(quant_type, dtype):
    """Our CUDA path equals our CPU path (tests/torch); here it meets bitsandbytes' CUDA kernel,
    which differs from bitsandbytes' own CPU path in three corners: it multiplies a short last
    block by 1 / absmax (the CPU path divides), its FP4 search compares magnitudes (an exact tie
    on the negative side goes towards zero) and picks FP4's zero code by sign (+0: code 0, -0:
    code 8). So: NF4 codes identical outside a short last block; everywhere, the decoded values
    identical except at such ties, where they are one level apart."""
    if not bnb_has_cuda():
        pytest.skip("bitsandbytes has no working CUDA backend here")
    table = F.get_4bit_type(quant_type, device="cpu").double()
    largest_gap = table.sort().values.diff().max()
    for shape in SHAPES:
        for blocksize in (64, 128, 256):
            w = weight(shape, dtype, seed=blocksize).cuda()
            packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
            ours = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=False)
            where = f"{quant_type} {dtype} {shape} {blocksize}"
            n = w.numel()
            full = n - n % blocksize
            if quant_type == "nf4":
                assert torch.equal(ours.packed[: full // 2], packed.view(-1)[: full // 2]), where
            theirs_absmax = torch.where(state.absmax == 1e-38, 0.0, state.absmax)  # as above
            assert torch.equal(bits(ours.absmax), bits(theirs_absmax)), where
            mine = dequantize_4bit(ours).double().view(-1).cpu()
            theirs = F.dequantize_4bit(packed, state).double().reshape(-1).cpu()
            differ = mine != theirs
            assert differ.float().mean() <= 1e-3, where
            scale = state.absmax.double().cpu().repeat_interleave(blocksize)[:n]
            assert torch.all((mine - theirs)[differ].abs() <= largest_gap * scale[differ]), where

"""lowrank.torch.qlora.Linear4bit: outputs and gradients against the written-out formula with
autograd, what is saved for backward, what is stored, meta-device planning, dtype handling, and
a QLoRA model under torch.compile against eager."""

import os
import shutil
import time
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from lowrank.torch import add_lora, quant_cpu
from lowrank.torch.qlora import Linear4bit
from lowrank.torch.quant import dequantize_4bit, quantize_4bit


def make(out_features=37, in_features=130, bias=True, **kwargs):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    return linear, Linear4bit.from_linear(linear, **kwargs)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_and_input_gradient(quant_type, double_quant):
    linear, layer = make(quant_type=quant_type, double_quant=double_quant)
    W_q = dequantize_4bit(
        quantize_4bit(linear.weight.detach(), quant_type=quant_type, double_quant=double_quant)
    )
    x = torch.randn(2, 5, 130, requires_grad=True)
    y = layer(x)
    # oracle: the same maths through plain autograd
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, W_q, linear.bias.detach())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)  # float32 matmul order
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-6)
    assert torch.equal(layer.dequantize_weight(), W_q)


def test_float64_exact_and_bias_gradient_when_asked():
    linear, layer = make()
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 130, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float64
    W = layer.dequantize_weight().double()
    torch.testing.assert_close(y, x @ W.T + layer.bias.double(), rtol=1e-14, atol=1e-14)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy @ W, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(layer.bias.grad, dy.sum(0).float(), rtol=1e-6, atol=1e-6)


def test_no_full_size_tensor_saved_for_backward():
    _, layer = make(out_features=64, in_features=96)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    full = 64 * 96
    assert saved, "the hook saw nothing: is the Function still saving its state?"
    for t in saved:
        assert not (t.is_floating_point() and t.numel() >= full), (t.shape, t.dtype)
        assert t.numel() * t.element_size() < full  # less than one byte per weight each
    assert sum(t.numel() * t.element_size() for t in saved) == layer.quantized().nbytes


def test_stores_only_the_quantized_weight():
    linear, layer = make(out_features=64, in_features=128)
    assert not hasattr(layer, "weight")
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert not layer.bias.requires_grad
    stored = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert stored == layer.quantized().nbytes
    assert stored * 8 / linear.weight.numel() < 4.2
    for buffer in layer.buffers():
        assert buffer.numel() < linear.weight.numel() / 2 + 1


def test_meta_device_plans_sizes_without_quantizing():
    with torch.device("meta"):
        linear = torch.nn.Linear(4096, 4096)
    layer = Linear4bit.from_linear(linear)
    assert layer.weight_packed.is_meta and layer.weight_packed.shape == (4096 * 4096 // 2,)
    assert layer.weight_absmax.shape == (4096 * 4096 // 64,)
    assert layer.weight_absmax2.shape == (4096 * 4096 // 64 // 256,)
    bits = sum(b.numel() * b.element_size() for b in layer.buffers()) * 8 / 4096**2
    assert bits == pytest.approx(4.127, abs=5e-4)
    real = layer.to_empty(device="cpu")
    assert real.weight_packed.device.type == "cpu" and real.weight_offset.dtype == torch.float32


def test_dtype_casts_leave_the_quantized_state_alone():
    _, layer = make()
    before = layer.dequantize_weight()
    layer = layer.to(torch.bfloat16)
    assert layer.weight_absmax.dtype == torch.uint8 and layer.weight_absmax2.dtype == torch.float32
    assert layer.weight_offset.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize_weight(), before)
    x = torch.randn(3, 130, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    layer.half()
    assert torch.equal(layer.dequantize_weight(), before)


def test_set_weight_requantizes_and_checks():
    linear, layer = make()
    new = torch.randn(37, 130)
    layer.set_weight(new)
    assert torch.equal(layer.dequantize_weight(), dequantize_4bit(quantize_4bit(new)))
    with pytest.raises(ValueError, match=r"\[37, 130\]"):
        layer.set_weight(torch.randn(130, 37))
    packed = layer.weight_packed.clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.set_weight(torch.full((37, 130), float("nan")))
    assert torch.equal(layer.weight_packed, packed)


def test_state_dict_round_trip():
    _, layer = make(double_quant=True)
    fresh = Linear4bit(130, 37, bias=True)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 130)
    assert torch.equal(fresh(x), layer(x))
    plain = Linear4bit.from_linear(torch.nn.Linear(130, 37, bias=False), double_quant=False)
    assert plain.weight_offset is None and plain.bias is None
    assert set(plain.state_dict()) == {"weight_packed", "weight_absmax"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="quant_type"):
        Linear4bit.from_linear(torch.nn.Linear(4, 4), quant_type="nf5")
    with pytest.raises(ValueError, match="power of two"):
        Linear4bit.from_linear(torch.nn.Linear(4, 4), blocksize=48)
    for double_quant in ("no", "False", 1, None):  # "no" is truthy: it must not mean True
        with pytest.raises(TypeError, match="double_quant must be True or False"):
            Linear4bit.from_linear(torch.nn.Linear(4, 4), double_quant=double_quant)
        with pytest.raises(TypeError, match="double_quant must be True or False"):
            Linear4bit(4, 4, double_quant=double_quant)


def test_float16_weight_at_its_max_decodes_finite():
    """A float16 weight at 65504 with one zero row: the double-quantized scales rebuilt above
    65504, and the decoded float16 weight (forward and backward) was inf."""
    weight = torch.full((21, 64), 65504.0, dtype=torch.float16)
    weight[-1] = 0
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 21, bias=False).half(), blocksize=64)
    layer.set_weight(weight)
    assert torch.equal(layer.dequantize_weight(), weight)
    x = torch.full((2, 64), 1e-3, dtype=torch.float16, requires_grad=True)
    y = layer(x)  # 64 * 65504 * 1e-3 = 4192 per row: finite, if the decoded weight is
    (y * 1e-4).sum().backward()  # dL/dx = 1e-4 * column sums of W (20 * 65504 * 1e-4)
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, torch.full_like(x, 131.0), rtol=1e-2, atol=0)


# ---- torch.compile ----


def compile_backend() -> str:
    """inductor (the default) where it can build its C++ kernels, else aot_eager."""
    compiler = os.environ.get("CXX", "g++")
    return "inductor" if shutil.which(compiler) or shutil.which("clang++") else "aot_eager"


def qlora_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))
    add_lora(model, ["0", "2"], r=4, quant_type="nf4")
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.B["default"].normal_(0, 0.1)  # a trained-looking B: A gets a gradient too
    return model


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_of_a_qlora_model_matches_eager():
    """torch.compile(fullgraph=True) of a tiny QLoRA model (two NF4 Linear4bit bases with
    adapters) on CPU: forward and the gradients of A, B and the input equal eager's to 1e-5
    relative (compiled code may reorder float32 sums). Dynamo once crashed here with a
    TorchRuntimeError: it traced into quant_cpu's NumPy decode. Under compile the decode takes
    the tensor path, whole (fullgraph: no graph break), so quant_cpu is never called.

    Backend: inductor, the default, when a C++ compiler is there (g++ on the CI machine, ~10-20
    s to compile this model from cold), else aot_eager (still Dynamo and AOTAutograd)."""
    torch._dynamo.reset()
    model = qlora_model()
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    x_eager = x.clone().requires_grad_()
    y_eager = model(x_eager)
    y_eager.square().sum().backward()
    adapters = [p for name, p in model.named_parameters() if p.requires_grad]
    assert len(adapters) == 4  # A and B of both layers
    grads_eager = [p.grad.clone() for p in adapters]
    model.zero_grad()

    compiled = torch.compile(model, backend=compile_backend(), fullgraph=True)
    x_compiled = x.clone().requires_grad_()
    start = time.perf_counter()
    with mock.patch.object(quant_cpu, "dequantize", side_effect=AssertionError("NumPy decode")):
        y_compiled = compiled(x_compiled)
        y_compiled.square().sum().backward()
        y_again = compiled(x)  # the compiled graph, reused
    assert time.perf_counter() - start < 120

    def close(actual, expected):
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)

    close(y_compiled, y_eager)
    close(y_again, y_eager.detach())
    close(x_compiled.grad, x_eager.grad)
    for p, expected in zip(adapters, grads_eager, strict=True):
        assert p.grad is not None and p.grad.abs().max() > 0
        close(p.grad, expected)
    torch._dynamo.reset()


def test_torch_compile_of_dequantize_is_exact():
    """The decode alone, compiled whole (fullgraph), gives the eager decode's bits."""
    torch._dynamo.reset()
    q = quantize_4bit(torch.randn(33, 77), blocksize=64)
    decode = torch.compile(dequantize_4bit, backend="aot_eager", fullgraph=True)
    assert torch.equal(decode(q), dequantize_4bit(q))
    torch._dynamo.reset()


@pytest.mark.cuda
def test_cuda_forward_backward_match_cpu():
    _, layer = make()
    x = torch.randn(8, 130, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    gpu = layer.to("cuda")
    assert gpu.weight_packed.is_cuda
    x_gpu = x.detach().cuda().requires_grad_()
    y_gpu = gpu(x_gpu)
    y_gpu.sum().backward()
    torch.testing.assert_close(y_gpu.cpu(), y, rtol=1e-5, atol=1e-5)  # TF32/cuBLAS order
    torch.testing.assert_close(x_gpu.grad.cpu(), x.grad, rtol=1e-5, atol=1e-5)
    assert gpu(x_gpu.bfloat16()).dtype == torch.bfloat16


STORAGES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("quant_storage", STORAGES)
@pytest.mark.parametrize("shape", [(37, 130), (3, 3)])  # 2405 and 9 codes: odd byte counts
def test_quant_storage_keeps_the_same_bytes_in_a_frozen_parameter(quant_storage, shape):
    # oracle: the default layer (uint8 buffer), decoded and run bit for bit the same
    linear, default = make(*shape)
    stored = Linear4bit.from_linear(linear, quant_storage=quant_storage)
    assert "weight_packed" not in dict(stored.named_buffers())
    parameter = dict(stored.named_parameters())["weight_packed"]
    assert parameter.dtype == quant_storage and not parameter.requires_grad
    width = parameter.element_size()
    n_bytes = default.weight_packed.numel()
    assert parameter.numel() == -(-n_bytes // width)  # zero-padded to whole elements
    raw = parameter.detach().view(torch.uint8)
    assert torch.equal(raw[:n_bytes], default.weight_packed)
    assert not raw[n_bytes:].any()
    assert torch.equal(stored.dequantize_weight(), default.dequantize_weight())
    x = torch.randn(4, shape[1], requires_grad=True)
    x_default = x.detach().clone().requires_grad_()
    y, y_default = stored(x), default(x_default)
    assert torch.equal(y, y_default)
    y.sum().backward()
    y_default.sum().backward()
    assert torch.equal(x.grad, x_default.grad)


@pytest.mark.parametrize("quant_storage", [torch.bfloat16, torch.float32, torch.uint8])
def test_quant_storage_codes_are_bitsandbytes_own(quant_storage):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    linear, _ = make(32, 64)
    packed, _state = bnb_functional.quantize_4bit(
        linear.weight.detach(),
        blocksize=64,
        quant_type="nf4",
        quant_storage=quant_storage,
        compress_statistics=False,
    )
    ours = Linear4bit.from_linear(linear, double_quant=False, quant_storage=quant_storage)
    assert packed.dtype == ours.weight_packed.dtype  # bitsandbytes keeps them as (n, 1)
    # as bytes: a float view of codes may hold NaN patterns, which never compare equal
    assert torch.equal(packed.flatten().view(torch.uint8), ours.weight_packed.view(torch.uint8))


def test_quant_storage_follows_the_device_but_never_a_dtype_cast():
    _, layer = make(quant_storage=torch.bfloat16)
    before = layer.weight_packed.detach().clone()
    layer.half()
    layer.to(torch.float64)
    assert layer.weight_packed.dtype == torch.bfloat16
    assert torch.equal(layer.weight_packed.detach().view(torch.uint8), before.view(torch.uint8))
    assert isinstance(layer.weight_packed, torch.nn.Parameter)


def test_set_quant_storage_round_trips_and_refuses_other_dtypes():
    linear, layer = make()
    decoded = layer.dequantize_weight()
    layer.set_quant_storage(torch.float16)
    layer.set_weight(linear.weight.detach())  # quantizing again keeps the storage
    assert layer.weight_packed.dtype == torch.float16
    layer.set_quant_storage(None)
    assert "weight_packed" in dict(layer.named_buffers())
    assert layer.weight_packed.dtype == torch.uint8
    assert torch.equal(layer.dequantize_weight(), decoded)
    with pytest.raises(ValueError, match="quant_storage must be one of"):
        layer.set_quant_storage(torch.int8)
    with pytest.raises(ValueError, match="quant_storage must be one of"):
        Linear4bit(4, 4, quant_storage="bfloat16")
    assert layer.quant_storage is None  # the refused call changed nothing

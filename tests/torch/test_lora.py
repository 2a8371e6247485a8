"""Tests for lowrank.torch.lora: the wrappers (Linear, GPT-2 Conv1D, Embedding, 4-bit base)
and what one layer computes: forward, training step, merge cost, dropout, dtypes, CUDA.

Oracles: the LoRA formula written out by hand with plain tensor ops, the untouched base model,
torch's FlopCounterMode, and bitsandbytes' own 4-bit quantization for the QLoRA base.
"""

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from toy_models import ALL, make_block, randomize_adapters

from lowrank.torch import (
    Linear4bit,
    LoRAConv1D,
    LoRAEmbedding,
    LoRALinear,
    add_lora,
    merge_lora,
    merged_copy,
)


def test_new_adapter_leaves_output_unchanged(ids):
    model = make_block()
    before = model(ids)
    add_lora(model, ALL, r=2, alpha=4)
    assert torch.equal(model(ids), before)  # B = 0 (A = 0 for the embedding): exactly no change
    add_lora(model, ALL, r=3, adapter_name="second")  # a second adapter, still no change
    assert torch.equal(model(ids), before)


def test_wrapper_classes_and_shapes():
    model = add_lora(make_block(), ALL, r=2)
    assert isinstance(model.embed, LoRAEmbedding) and model.embed.A["default"].shape == (2, 11)
    assert model.embed.B["default"].shape == (8, 2)  # PEFT's lora_embedding_A/B layout
    assert isinstance(model.q_proj, LoRALinear) and model.q_proj.A["default"].shape == (2, 8)
    assert isinstance(model.c_fc, LoRAConv1D)
    assert model.c_fc.A["default"].shape == (2, 8) and model.c_fc.B["default"].shape == (16, 2)
    # A is initialised like nn.Linear's weight: uniform(-1/sqrt(in), 1/sqrt(in))
    assert model.q_proj.A["default"].abs().max() <= 1 / math.sqrt(8)
    assert torch.count_nonzero(model.q_proj.B["default"]) == 0


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_the_formula_written_out(ids, use_rslora):
    model = add_lora(make_block().double(), ALL, r=2, alpha=5, use_rslora=use_rslora)
    randomize_adapters(model)
    scale = 5 / (math.sqrt(2) if use_rslora else 2)
    x = torch.randn(4, 8, dtype=torch.float64)
    q = model.q_proj
    A, B = q.A["default"], q.B["default"]
    W, b = q.base_layer.weight, q.base_layer.bias
    expected = x @ W.T + b + scale * (x @ A.T) @ B.T
    torch.testing.assert_close(q(x), expected, rtol=1e-12, atol=1e-12)
    fc = model.c_fc
    A, B = fc.A["default"], fc.B["default"]
    expected = x @ fc.base_layer.weight + fc.base_layer.bias + scale * (x @ A.T) @ B.T
    torch.testing.assert_close(fc(x), expected, rtol=1e-12, atol=1e-12)
    emb = model.embed
    A, B = emb.A["default"], emb.B["default"]
    one_hot = nn.functional.one_hot(ids, 11).double()  # an embedding is one_hot(ids) @ W
    expected = one_hot @ emb.base_layer.weight + scale * (one_hot @ A.T) @ B.T
    torch.testing.assert_close(emb(ids), expected, rtol=1e-12, atol=1e-12)


def test_training_step_changes_only_adapter_parameters(ids):
    model = add_lora(make_block(), ["q_proj", "c_fc", "embed"], r=2)
    randomize_adapters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{f}.default" for m in ("q_proj", "c_fc", "embed") for f in "AB"}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(ids).square().mean().backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        if name in trainable:
            assert not torch.equal(parameter, before[name]), name
        else:
            assert torch.equal(parameter, before[name]), name  # bit-identical
            assert parameter.grad is None


def test_merged_forward_costs_what_the_base_costs(ids):
    base = make_block()
    model = add_lora(copy.deepcopy(base), ["q_proj", "v_proj", "c_fc", "out"], r=2)
    randomize_adapters(model)

    def flops(m: nn.Module) -> int:
        with FlopCounterMode(display=False) as counter:
            m(ids)
        return counter.get_total_flops()

    assert flops(model) > flops(base)
    merge_lora(model)
    assert flops(model) == flops(base)


def test_adapters_stay_float32_on_a_bfloat16_base():
    model = add_lora(make_block().to(torch.bfloat16), ["q_proj", "c_fc"], r=2, alpha=4)
    assert model.q_proj.A["default"].dtype == torch.float32
    randomize_adapters(model)
    x = torch.randn(3, 8).to(torch.bfloat16)
    y = model.q_proj(x)
    assert y.dtype == torch.bfloat16
    A, B = model.q_proj.A["default"], model.q_proj.B["default"]
    expected = model.q_proj.base_layer(x).float() + 2.0 * (x.float() @ A.T) @ B.T
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)  # bf16 output rounding


@pytest.mark.cuda
def test_cuda_forward_backward_and_merge(ids):
    model = add_lora(make_block().cuda().to(torch.bfloat16), ALL, r=2)
    randomize_adapters(model)
    assert model.q_proj.A["default"].device.type == "cuda"
    assert model.q_proj.A["default"].dtype == torch.float32
    ids = ids.cuda()
    y = model(ids)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert model.q_proj.A["default"].grad is not None
    reference = add_lora(make_block().double(), ALL, r=2)
    randomize_adapters(reference)
    torch.testing.assert_close(y.double().cpu(), reference(ids.cpu()), rtol=0.05, atol=0.05)
    merge_lora(model)
    torch.testing.assert_close(model(ids).float(), y.float(), rtol=0.05, atol=0.05)


def test_dropout_acts_on_the_lora_path_while_training_only():
    model = add_lora(make_block(), ["q_proj"], r=2, alpha=2, dropout=0.5)
    x = torch.randn(64, 8)
    base = model.q_proj.base_layer(x)
    torch.testing.assert_close(model.train().q_proj(x), base, rtol=0, atol=0)  # B = 0
    randomize_adapters(model)
    A, B = model.q_proj.A["default"], model.q_proj.B["default"]
    expected = base + (x @ A.T) @ B.T  # eval: no dropout, scale 2 / 2 = 1
    torch.testing.assert_close(model.eval().q_proj(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model.train().q_proj(x), expected, rtol=1e-3, atol=1e-3)


# QLoRA: the frozen base in 4 bits (Dettmers et al. 2023). Oracle: bitsandbytes' own
# quantize/dequantize of the same weight (blocksize 64, double quantization).


def bnb_dequantized(weight: torch.Tensor, quant_type: str) -> torch.Tensor:
    bnbf = pytest.importorskip("bitsandbytes.functional")  # a dev dependency

    packed, state = bnbf.quantize_4bit(
        weight.detach().float(), blocksize=64, quant_type=quant_type, compress_statistics=True
    )
    return bnbf.dequantize_4bit(packed, state)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qlora_base_is_the_bitsandbytes_4bit_weight(ids, quant_type):
    reference = make_block()
    model = add_lora(
        copy.deepcopy(reference), ["q_proj", "c_fc"], r=2, alpha=2, quant_type=quant_type
    )
    assert isinstance(model.q_proj.base_layer, Linear4bit)
    assert isinstance(model.c_fc, LoRALinear)  # Conv1D's W^T became a 4-bit Linear
    randomize_adapters(model)
    x = torch.randn(4, 8)
    q = model.q_proj
    W = bnb_dequantized(reference.q_proj.weight, quant_type)  # (out, in)
    expected = x @ W.T + reference.q_proj.bias + (x @ q.A["default"].T) @ q.B["default"].T
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    W = bnb_dequantized(reference.c_fc.weight.T, quant_type)  # Conv1D stores (in, out)
    fc = model.c_fc
    expected = x @ W.T + reference.c_fc.bias + (x @ fc.A["default"].T) @ fc.B["default"].T
    torch.testing.assert_close(fc(x), expected, rtol=1e-5, atol=1e-5)


def test_qlora_training_step_leaves_the_4bit_base_bit_identical(ids):
    model = add_lora(make_block(), ["q_proj", "c_fc"], r=2, quant_type="nf4")
    randomize_adapters(model)
    frozen = {
        n: t.clone() for n, t in model.state_dict().items() if ".A." not in n and ".B." not in n
    }
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(ids).square().mean().backward()
    optimizer.step()
    state = model.state_dict()
    for name, tensor in frozen.items():
        assert torch.equal(state[name], tensor), name
    assert not torch.equal(model.q_proj.B["default"], torch.zeros(8, 2))


@pytest.mark.cuda
def test_cuda_qlora_bfloat16_matches_cpu_float32(ids):
    targets = ["q_proj", "v_proj", "c_fc"]
    cpu = add_lora(make_block(), targets, r=2, quant_type="nf4")
    gpu = add_lora(make_block().cuda().to(torch.bfloat16), targets, r=2, quant_type="nf4")
    randomize_adapters(cpu)
    randomize_adapters(gpu)  # the same factors: drawn on the CPU, then copied
    assert gpu.q_proj.base_layer.weight_packed.device.type == "cuda"
    assert gpu.q_proj.A["default"].dtype == torch.float32  # adapters stay float32
    y = gpu(ids.cuda())
    y.float().square().mean().backward()
    assert gpu.q_proj.A["default"].grad.abs().sum() > 0
    torch.testing.assert_close(y.float().cpu(), cpu(ids), rtol=0.05, atol=0.05)  # bf16 rounding


def test_qlora_merge_warns_and_merged_copy_keeps_full_precision(ids):
    model = add_lora(make_block(), ["q_proj", "v_proj", "c_fc"], r=2, quant_type="nf4")
    randomize_adapters(model)
    unmerged = model(ids)
    full = merged_copy(model)
    assert type(full.q_proj) is nn.Linear and full.q_proj.weight.dtype == torch.float32
    torch.testing.assert_close(full(ids), unmerged, rtol=1e-5, atol=1e-5)  # float32 rounding
    q = model.q_proj
    requantized = bnb_dequantized(q.base_weight() + q.delta_weight("default").detach(), "nf4")
    with pytest.warns(UserWarning, match="re-quantizes"):
        merge_lora(model)
    torch.testing.assert_close(q.base_weight(), requantized, rtol=1e-6, atol=1e-6)
    assert not torch.equal(model(ids), unmerged)  # 4-bit rounding of W + dW shows

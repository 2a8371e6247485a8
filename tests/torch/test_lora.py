"""Tests for lowrank.torch.lora: wrappers, add_lora, merge/unmerge, counting.

Oracles: the LoRA formula written out by hand with plain tensor ops, the untouched base model,
torch's FlopCounterMode, the LoRA paper's GPT-3 parameter counts, and bitsandbytes' own 4-bit
quantization for the QLoRA base.
"""

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

from lowrank.torch.lora import (
    LoRAConv1D,
    LoRAEmbedding,
    LoRALinear,
    add_lora,
    count_parameters,
    lora_layers,
    merge_lora,
    merged_copy,
    unmerge_lora,
)
from lowrank.torch.qlora import Linear4bit


class Block(nn.Module):
    """A toy transformer-ish block: every kind of layer add_lora can wrap."""

    def __init__(self, dim: int = 8, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.c_fc = Conv1D(2 * dim, dim)  # GPT-2 style: weight (in, out) = (dim, 2 dim)
        self.out = nn.Linear(2 * dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (batch, seq, dim)
        h = torch.tanh(self.q_proj(h) + self.v_proj(h))
        return self.out(torch.relu(self.c_fc(h)))  # (batch, seq, 3)


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """Give every adapter nonzero A and B (fresh adapters have B = 0 or A = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.A:
                layer.A[name].copy_(torch.randn(layer.A[name].shape, generator=generator))
                layer.B[name].copy_(torch.randn(layer.B[name].shape, generator=generator) * 0.1)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))


def make_block(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    return Block()


ALL = ["embed", "q_proj", "v_proj", "c_fc"]


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


@pytest.mark.parametrize("targets", [ALL, ["q_proj"], ["c_fc"], ["embed"]])
def test_merge_and_unmerge(ids, targets):
    model = add_lora(make_block(), targets, r=2, alpha=3)
    randomize_adapters(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = model(ids)
    merge_lora(model)
    # float32: merged W + dW rounds differently from W x + (x A^T) B^T; errors ~1e-7 * |y|
    torch.testing.assert_close(model(ids), unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids), unmerged, rtol=1e-5, atol=1e-5)


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


def test_merge_twice_and_unmerge_unmerged_raise():
    model = add_lora(make_block(), ALL, r=2)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_lora(model)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(make_block())


def test_non_finite_merge_changes_nothing(ids):
    model = add_lora(make_block(), ["q_proj", "v_proj"], r=2)
    randomize_adapters(model)
    with torch.no_grad():
        model.v_proj.B["default"][0, 0] = float("inf")  # only the second layer is bad
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="v_proj"):
        merge_lora(model)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, weights[name]), name
    assert not any(layer.merged for _, layer in lora_layers(model))


def wrapped(model: nn.Module) -> list[str]:
    return sorted(name for name, _ in lora_layers(model))


def test_targets_suffix_exact_and_regex():
    model = nn.ModuleDict({"a": make_block(), "b": make_block()})
    assert wrapped(add_lora(copy.deepcopy(model), ["q_proj"])) == ["a.q_proj", "b.q_proj"]
    assert wrapped(add_lora(copy.deepcopy(model), ["a.q_proj"])) == ["a.q_proj"]
    assert wrapped(add_lora(copy.deepcopy(model), r"b\..*_proj")) == ["b.q_proj", "b.v_proj"]
    # a regex must match the whole name (re.fullmatch, as PEFT): "proj" alone matches nothing
    with pytest.raises(ValueError, match="candidate module names: .*q_proj"):
        add_lora(copy.deepcopy(model), "proj")
    # a suffix must end at a dot: "proj" is not a suffix of "q_proj"
    with pytest.raises(ValueError, match="'proj' matches no"):
        add_lora(copy.deepcopy(model), ["q_proj", "proj"])


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="targets"):
        add_lora(make_block(), 3)
    with pytest.raises(TypeError, match="targets"):
        add_lora(make_block(), [])
    with pytest.raises(ValueError, match="rank r"):
        add_lora(make_block(), ["q_proj"], r=0)
    with pytest.raises(ValueError, match="rank r"):
        add_lora(make_block(), ["q_proj"], r=9)  # more than min(in, out) = 8
    with pytest.raises(ValueError, match="alpha"):
        add_lora(make_block(), ["q_proj"], alpha=-1)
    with pytest.raises(ValueError, match="dropout"):
        add_lora(make_block(), ["q_proj"], dropout=1.0)
    with pytest.raises(ValueError, match="quant_type"):
        add_lora(make_block(), ["q_proj"], quant_type="int3")
    with pytest.raises(ValueError, match="init"):
        add_lora(make_block(), ["q_proj"], init="xavier")
    model = add_lora(make_block(), ["q_proj"])
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        add_lora(model, ["v_proj", "q_proj"])
    assert isinstance(model.v_proj, nn.Linear)  # checked before anything was wrapped


def test_rank_and_alpha_patterns():
    model = add_lora(
        make_block(), ALL, r=2, alpha=4, rank_pattern={"c_fc": 4}, alpha_pattern={r"q_\w+": 1.0}
    )
    assert model.c_fc.r["default"] == 4 and model.q_proj.r["default"] == 2
    assert model.q_proj.scale("default") == 0.5 and model.v_proj.scale("default") == 2.0


def test_second_adapter_is_added_inactive(ids):
    model = add_lora(make_block(), ["q_proj"], r=2)
    randomize_adapters(model)
    trained = model(ids)
    add_lora(model, ["q_proj", "v_proj"], r=2, adapter_name="other")
    assert sorted(model.q_proj.A) == ["default", "other"]
    assert model.v_proj.active_adapter == "default"  # the model's active adapter, absent here
    torch.testing.assert_close(model(ids), trained, rtol=0, atol=0)


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


def test_count_parameters_counts_each_shared_tensor_once():
    model = make_block()
    model.out.weight = nn.Parameter(torch.randn(3, 16))
    total = sum(p.numel() for p in model.parameters())
    add_lora(model, ["q_proj", "c_fc"], r=2)
    lora = 2 * (8 + 8) + 2 * (8 + 16)  # r (in + out) per layer
    assert count_parameters(model) == (lora, total + lora)
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    tied[1].weight = tied[0].weight  # as GPT-2 ties wte and lm_head
    assert count_parameters(tied) == (20, 20)


def gpt3_shaped(r: int) -> nn.Module:
    """GPT-3 175B's layer shapes (96 layers, d_model 12288, d_ff 4 d) on the meta device."""
    d = 12288
    with torch.device("meta"):
        layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "W_q": nn.Linear(d, d),
                    "W_k": nn.Linear(d, d),
                    "W_v": nn.Linear(d, d),
                    "W_o": nn.Linear(d, d),
                    "fc1": nn.Linear(d, 4 * d),
                    "fc2": nn.Linear(4 * d, d),
                }
            )
            for _ in range(96)
        )
    return add_lora(layers, ["W_q", "W_v"], r=r)


@pytest.mark.parametrize(("r", "expected"), [(1, 4_718_592), (8, 37_748_736)])
def test_gpt3_counts_from_the_lora_paper_on_the_meta_device(r, expected):
    model = gpt3_shaped(r)
    trainable, total = count_parameters(model)
    assert trainable == expected  # Hu et al. 2021, Table 4 (4.7M at r=1; 37.7M at r=8)
    assert trainable == 96 * 2 * r * (12288 + 12288)
    assert 173e9 < total < 175e9 + expected  # 12 d^2 per layer: the 174.6B of the layers
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated


def test_merged_copy_is_plain_and_full_precision(ids):
    model = add_lora(make_block(), ALL, r=2)
    randomize_adapters(model)
    copy_ = merged_copy(model)
    assert not list(lora_layers(copy_))
    assert type(copy_.c_fc) is Conv1D and type(copy_.embed) is nn.Embedding
    torch.testing.assert_close(copy_(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert not model.q_proj.merged  # the original is untouched


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


def test_qlora_counts_weights_not_bytes():
    reference = add_lora(make_block(), ["q_proj", "c_fc"], r=2)
    model = add_lora(make_block(), ["q_proj", "c_fc"], r=2, quant_type="nf4")
    assert count_parameters(model) == count_parameters(reference)


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


def test_qlora_counts_on_the_meta_device():
    with torch.device("meta"):
        model = add_lora(make_block(), ["q_proj", "c_fc"], r=2, quant_type="nf4")
    assert isinstance(model.q_proj.base_layer, Linear4bit)
    assert count_parameters(model) == count_parameters(
        add_lora(make_block(), ["q_proj", "c_fc"], r=2)
    )


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

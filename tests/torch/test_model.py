"""Tests for lowrank.torch.model: add_lora (targets, patterns, validation), merge_lora /
unmerge_lora / merged_copy on whole models, count_parameters, and modules_to_save (added with
add_lora, switched, disabled and deleted with their adapter).

Oracles: the untouched base model, weights written out by hand, the LoRA paper's GPT-3
parameter counts (built on the meta device).
"""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from toy_models import ALL, IDS, make_block, make_model, randomize_adapters
from transformers.pytorch_utils import Conv1D

from lowrank._validate import RankWarning
from lowrank.torch import (
    Linear4bit,
    add_lora,
    combine_adapters,
    count_parameters,
    delete_adapter,
    disable_adapters,
    lora_layers,
    merge_lora,
    merged_copy,
    set_active_adapter,
    unmerge_lora,
)
from lowrank.torch.model import candidate_names


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
    with pytest.warns(RankWarning, match=r"r=9 exceeds min\(in_features, out_features\) = 8"):
        add_lora(make_block(), ["q_proj"], r=9)  # allowed, as in PEFT, but buys nothing
    for alpha in (-1, 0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="alpha"):
            add_lora(make_block(), ["q_proj"], alpha=alpha)
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
    assert model.q_proj.scale["default"] == 0.5 and model.v_proj.scale["default"] == 2.0


def test_second_adapter_is_added_inactive(ids):
    model = add_lora(make_block(), ["q_proj"], r=2)
    randomize_adapters(model)
    trained = model(ids)
    add_lora(model, ["q_proj", "v_proj"], r=2, adapter_name="other")
    assert sorted(model.q_proj.A) == ["default", "other"]
    assert model.v_proj.active_adapter == "default"  # the model's active adapter, absent here
    torch.testing.assert_close(model(ids), trained, rtol=0, atol=0)


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


def test_qlora_counts_weights_not_bytes():
    reference = add_lora(make_block(), ["q_proj", "c_fc"], r=2)
    model = add_lora(make_block(), ["q_proj", "c_fc"], r=2, quant_type="nf4")
    assert count_parameters(model) == count_parameters(reference)


def test_qlora_counts_on_the_meta_device():
    with torch.device("meta"):
        model = add_lora(make_block(), ["q_proj", "c_fc"], r=2, quant_type="nf4")
    assert isinstance(model.q_proj.base_layer, Linear4bit)
    assert count_parameters(model) == count_parameters(
        add_lora(make_block(), ["q_proj", "c_fc"], r=2)
    )


# ---- modules_to_save: modules trained in full with the adapter ---------------------------------


def test_modules_to_save_train_a_copy_and_leave_the_original(ids):
    model = add_lora(make_block(), ["q_proj"], r=2, modules_to_save=["out"])
    assert type(model.out).__name__ == "ModulesToSaveWrapper"
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == [
        "q_proj.A.default",
        "q_proj.B.default",
        "out.modules_to_save.default.weight",
        "out.modules_to_save.default.bias",
    ]
    before = model(ids)
    with torch.no_grad():
        model.out.modules_to_save["default"].bias.add_(1.0)  # a trained head
    assert torch.allclose(model(ids), before + 1.0)  # the copy runs, not the original
    plain = merged_copy(model)  # the deployable model: the copy in place of the wrapper
    assert type(plain.out) is nn.Linear
    torch.testing.assert_close(plain(ids), model(ids), rtol=1e-6, atol=1e-6)
    assert "out" not in [name for name, _ in lora_layers(model)]
    assert all(not name.startswith("out.") for name in candidate_names(model))


@pytest.mark.parametrize(
    ("targets", "modules_to_save", "message"),
    [
        (["q_proj"], ["head"], "modules_to_save entry 'head' selects no module"),
        (["q_proj"], ["q_proj"], "'q_proj' is a LoRA target and in modules_to_save"),
        (["q_proj"], [""], "modules_to_save must be a list of module names"),
        (["q_proj"], "out", "modules_to_save must be a list of module names"),
    ],
)
def test_modules_to_save_are_checked_before_the_model_changes(targets, modules_to_save, message):
    model = make_block()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        add_lora(model, targets, r=2, modules_to_save=modules_to_save)
    assert not list(lora_layers(model)) and type(model.out) is nn.Linear
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_a_module_holding_a_lora_layer_cannot_be_saved_in_full():
    block = nn.Sequential(OrderedDict(a=nn.Linear(4, 4), b=nn.Linear(4, 2)))
    model = add_lora(nn.Sequential(OrderedDict(block=block)), ["block.a"], r=1)
    with pytest.raises(ValueError, match="'block.a' is a LoRA target and in modules_to_save"):
        add_lora(model, ["block.b"], r=1, adapter_name="b", modules_to_save=["block"])


def test_each_adapters_head_switches_disables_and_goes_with_it():
    # Oracle: the original head and each adapter's own copy, run by hand.
    model = add_lora(make_model(), ["1"], r=2, modules_to_save=["4"])
    add_lora(model, ["1"], r=2, adapter_name="b", modules_to_save=["4"])
    head = model[4]
    with torch.no_grad():
        head.modules_to_save["default"].bias.fill_(1.0)
        head.modules_to_save["b"].bias.fill_(-1.0)
    hidden = model[:4](IDS)  # what reaches the head, (batch, seq, 6): no LoRA update yet (B=0)
    torch.testing.assert_close(model(IDS), head.modules_to_save["default"](hidden))
    set_active_adapter(model, "b")
    torch.testing.assert_close(model(IDS), head.modules_to_save["b"](hidden))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["1.A.b", "1.B.b", "4.modules_to_save.b.weight", "4.modules_to_save.b.bias"]
    with disable_adapters(model):
        torch.testing.assert_close(model(IDS), head.original_module(hidden))
        assert not any(p.requires_grad for p in model.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    with pytest.raises(ValueError, match="train '4' in full"):
        combine_adapters(model, ["default", "b"], [0.5, 0.5], "mix", combination="cat")
    delete_adapter(model, "b")
    assert list(head.modules_to_save) == ["default"] and head.active_adapter is None
    delete_adapter(model, "default")
    assert type(model[4]) is nn.Linear and model[4] is head.original_module

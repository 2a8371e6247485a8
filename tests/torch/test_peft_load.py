"""Tests for lowrank.torch.peft_load (and the reading and checking of the files in
peft_format): validate-then-apply loading, what a file may change, rollback on failure. (PEFT
itself is the oracle in tests/interop/test_peft.py, modules_to_save included.)

Oracles: the files' raw contents (JSON, safetensors read directly), the untouched model.
"""

import copy
import json
import re
import time
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from toy_models import IDS, assert_same_state, make_model, randomize, state, two_adapters

import lowrank.torch.peft_load as peft_load
from lowrank.torch import (
    add_lora,
    load_adapter,
    save_adapter,
    set_active_adapter,
)
from lowrank.torch.modules_to_save import ModulesToSaveWrapper

# Wall time of a call whose deadline is ~1 s (TIME_LIMIT_S, and the error message, pin that).
# The bound only tells "ended" from "hung" (re takes hours on these patterns), so it is
# generous: the tests run on 2 busy cores next to other workers and subprocesses.
WALL_BOUND_S = 10.0


def corrupt(folder, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("base_model.model.3.lora_B.weight"), "missing .*3.lora_B"),
        (lambda t: t.update({"base_model.model.9.lora_A.weight": torch.zeros(2, 2)}), "9.lora_A"),
        (
            lambda t: t.update({"base_model.model.3.lora_A.weight": torch.zeros(2, 11)}),
            r"3: A \(2, 11\)",
        ),
        (
            lambda t: t.update({"base_model.model.4.lora_B.weight": torch.zeros(4, 3)}),
            r"4: A \(2, 6\), B \(4, 3\)",
        ),
    ],
)
def test_a_load_that_does_not_fit_changes_nothing(tmp_path, edit, message):
    source = add_lora(make_model(), ["0", "1", "3", "4"], r=2)
    save_adapter(source, tmp_path)
    corrupt(tmp_path, edit)
    for model in (make_model(), two_adapters()):
        before = state(model)
        with pytest.raises(ValueError, match=message):
            load_adapter(model, tmp_path, adapter_name="new")
        assert_same_state(before, state(model))


def test_load_rejects_other_peft_methods_and_other_models(tmp_path):
    source = add_lora(make_model(), ["1", "3"], r=2)
    save_adapter(source, tmp_path)
    wider = nn.Sequential(nn.Embedding(13, 8), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6))
    before = state(wider)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(wider, tmp_path)
    assert_same_state(before, state(wider))
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(make_model(), tmp_path)


def test_a_failure_while_changing_the_model_is_rolled_back(tmp_path, monkeypatch):
    source = add_lora(make_model(), ["0", "1", "3", "4"], r=2)
    randomize(source, "default", 4)
    save_adapter(source, tmp_path)
    model = add_lora(make_model(), ["1"], r=3, adapter_name="kept")
    before = state(model)
    original = peft_load.add_lora

    def add_then_fail(*args, **kwargs):
        original(*args, **kwargs)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(peft_load, "add_lora", add_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_adapter(model, tmp_path)
    assert_same_state(before, state(model))
    assert copy.deepcopy(model)(IDS).shape == (2, 3, 4)


@pytest.mark.cuda
def test_save_on_cuda_load_on_cpu_and_back(tmp_path):
    model = two_adapters().cuda()
    save_adapter(model, tmp_path, "b")
    on_cpu = load_adapter(make_model(), tmp_path, "b")
    set_active_adapter(model, "b")
    torch.testing.assert_close(on_cpu(IDS), model(IDS.cuda()).cpu(), rtol=1e-9, atol=1e-9)
    on_cuda = load_adapter(make_model().cuda(), tmp_path, "b")
    assert on_cuda[1].A["b"].device.type == "cuda"
    torch.testing.assert_close(on_cuda(IDS.cuda()), model(IDS.cuda()), rtol=0, atol=0)


def test_a_qlora_adapter_loads_onto_a_4bit_or_a_full_precision_base(tmp_path):
    model = add_lora(make_model().float(), ["1", "3"], r=2, quant_type="nf4")
    randomize(model, "default", 5)
    save_adapter(model, tmp_path)
    again = load_adapter(
        add_lora(make_model().float(), ["1", "3"], r=2, quant_type="nf4"), tmp_path
    )
    torch.testing.assert_close(again(IDS), model(IDS), rtol=0, atol=0)
    full = load_adapter(make_model().float(), tmp_path)
    assert torch.equal(full[3].B["default"], model[3].B["default"])


# ---- what a file may change --------------------------------------------------------------------


def saved(tmp_path, edit=None, config_edit=None):
    """An adapter folder of make_model's layers 0, 1, 3, 4 (r=2), edited."""
    source = add_lora(make_model(), ["0", "1", "3", "4"], r=2)
    randomize(source, "default", 6)
    save_adapter(source, tmp_path)
    if edit is not None:
        corrupt(tmp_path, edit)
    if config_edit is not None:
        path = tmp_path / "adapter_config.json"
        config = json.loads(path.read_text())
        config_edit(config)
        path.write_text(json.dumps(config))
    return tmp_path


def assert_refused(folder, message, error=ValueError):
    """Loading into a bare model and over an existing adapter both refuse, changing nothing."""
    for model, name in ((make_model(), "default"), (two_adapters(), "default")):
        before = state(model)
        with pytest.raises(error, match=message):
            load_adapter(model, folder, adapter_name=name)
        assert_same_state(before, state(model))


@pytest.mark.parametrize(
    "key",
    ["base_model.model.1.weight", "base_model.model.1.base_layer.weight", "base_model.model.2.x"],
)
def test_a_base_weight_in_the_file_is_refused(tmp_path, key):
    shape = (12, 8) if ".1." in key else (3,)
    folder = saved(tmp_path, lambda t: t.update({key: torch.zeros(shape, dtype=torch.float64)}))
    assert_refused(folder, f"unexpected key {re.escape(key)}")


def with_head(tmp_path, edit=None, config_edit=None):
    """An adapter folder of make_model's layers 0, 1, 3 (r=2) with layer 4 trained in full
    (modules_to_save), edited; and the model that saved it."""
    source = add_lora(make_model(), ["0", "1", "3"], r=2, modules_to_save=["4"])
    randomize(source, "default", 6)
    with torch.no_grad():
        source[4].modules_to_save["default"].weight.add_(1.0)  # as if trained
    save_adapter(source, tmp_path)
    if edit is not None:
        corrupt(tmp_path, edit)
    if config_edit is not None:
        path = tmp_path / "adapter_config.json"
        config = json.loads(path.read_text())
        config_edit(config)
        path.write_text(json.dumps(config))
    return tmp_path, source


def test_modules_to_save_load_with_identical_outputs_and_overwrite_a_copy(tmp_path):
    folder, source = with_head(tmp_path)
    assert json.loads((folder / "adapter_config.json").read_text())["modules_to_save"] == ["4"]
    keys = load_file(folder / "adapter_model.safetensors")
    assert {"base_model.model.4.weight", "base_model.model.4.bias"} <= set(keys)  # PEFT's keys
    loaded = load_adapter(make_model(), folder)
    assert isinstance(loaded[4], ModulesToSaveWrapper) and loaded[4].active_adapter == "default"
    torch.testing.assert_close(loaded(IDS), source(IDS), rtol=0, atol=0)
    assert loaded[4].modules_to_save["default"].weight.requires_grad  # trains, as added
    assert not loaded[4].original_module.weight.requires_grad
    # into the same adapter again (its copy is overwritten), and under a second name
    target = add_lora(make_model(), ["0", "1", "3"], r=2, modules_to_save=["4"])
    load_adapter(target, folder)
    torch.testing.assert_close(target(IDS), source(IDS), rtol=0, atol=0)
    load_adapter(target, folder, adapter_name="other")
    assert sorted(target[4].modules_to_save) == ["default", "other"]


@pytest.mark.parametrize(
    ("edit", "config_edit", "message"),
    [
        (lambda t: t.pop("base_model.model.4.bias"), None, r"missing base_model.model.4.bias"),
        (
            lambda t: t.update({"base_model.model.4.weight": torch.zeros(4, 7)}),
            None,
            r"base_model.model.4.weight: shape \(4, 7\), the model's is \(4, 6\)",
        ),
        (  # PEFT's in-memory name is no file key
            lambda t: t.update({"base_model.model.4.modules_to_save.default.bias": torch.ones(4)}),
            None,
            "unexpected key base_model.model.4.modules_to_save.default.bias",
        ),
        (  # a module the config does not list
            lambda t: t.update({"base_model.model.3.bias": torch.ones(6, dtype=torch.float64)}),
            None,
            "unexpected key base_model.model.3.bias",
        ),
        (  # the config no longer lists the head: its tensors are foreign
            None,
            lambda c: c.update(modules_to_save=None),
            "unexpected key base_model.model.4",
        ),
        (None, lambda c: c.update(modules_to_save="4"), "modules_to_save must be null or a list"),
        (None, lambda c: c.update(modules_to_save=[""]), "modules_to_save must be null or a list"),
        (  # PEFT leaves a module to save out of the targets: its factors are then foreign
            None,
            lambda c: c.update(target_modules=["0", "1", "3"], modules_to_save=["4", "3"]),
            r"missing base_model.model.3.weight|'3' is a LoRA target and in modules_to_save",
        ),
    ],
)
def test_a_modules_to_save_file_that_does_not_fit_changes_nothing(
    tmp_path, edit, config_edit, message
):
    folder, _ = with_head(tmp_path, edit, config_edit)
    for model in (make_model(), add_lora(make_model(), ["0", "1", "3"], r=2)):
        before = state(model)
        with pytest.raises(ValueError, match=message):
            load_adapter(model, folder)
        assert_same_state(before, state(model))
        assert not any(isinstance(m, ModulesToSaveWrapper) for m in model.modules())


def test_a_module_to_save_that_carries_lora_or_nests_is_refused(tmp_path):
    folder, _ = with_head(tmp_path)
    model = two_adapters()  # adapter "b" has LoRA on layer 4
    before = state(model)
    with pytest.raises(ValueError, match="'4' is a LoRA target and in modules_to_save"):
        load_adapter(model, folder, adapter_name="new")
    assert_same_state(before, state(model))

    def nested():
        torch.manual_seed(0)
        head = nn.Sequential(OrderedDict(dense=nn.Linear(4, 4), out=nn.Linear(4, 2)))
        return nn.Sequential(OrderedDict(q=nn.Linear(4, 4), head=head))

    save_adapter(add_lora(nested(), ["q"], r=1, modules_to_save=["head"]), tmp_path / "n")
    path = tmp_path / "n" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"modules_to_save": ["head", "out"]}))
    model = nested()
    before = state(model)
    with pytest.raises(ValueError, match="selects 'head.out' inside 'head'"):
        load_adapter(model, tmp_path / "n")
    assert_same_state(before, state(model))


def test_a_failure_after_the_head_is_wrapped_is_rolled_back(tmp_path, monkeypatch):
    folder, _ = with_head(tmp_path)
    model = add_lora(make_model(), ["1"], r=3, adapter_name="kept")
    before = state(model)
    original = peft_load.install_copies

    def install_then_fail(*args, **kwargs):
        original(*args, **kwargs)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(peft_load, "install_copies", install_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_adapter(model, folder)
    assert_same_state(before, state(model))
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in model.modules())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.zeros(2, 8, dtype=torch.int64), "dtype torch.int64"),
        (torch.zeros(2, 8, dtype=torch.bool), "dtype torch.bool"),
        (torch.full((2, 8), float("nan"), dtype=torch.float64), "NaN or infinite"),
        (torch.tensor([[float("inf")] * 8] * 2, dtype=torch.float32), "NaN or infinite"),
    ],
)
def test_factors_must_be_finite_floating_tensors(tmp_path, value, message):
    key = "base_model.model.1.lora_A.weight"
    folder = saved(tmp_path, lambda t: t.update({key: value}))
    assert_refused(folder, rf"adapter_model.safetensors: {re.escape(key)} .*{message}")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"r": 0}, "r must be a positive int"),
        ({"r": "2"}, "r must be a positive int"),
        ({"r": True}, "r must be a positive int"),
        ({"lora_alpha": -1}, "lora_alpha must be a positive number"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be a positive number"),
        ({"lora_dropout": 1.5}, "lora_dropout must be in"),
        ({"use_rslora": "yes"}, "use_rslora must be True or False"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out must be True or False"),
        ({"rank_pattern": {"3": 0}}, r"rank_pattern\['3'\] must be a positive int"),
        ({"rank_pattern": {"(": 4}}, r"pattern key '\('"),
        ({"rank_pattern": [4]}, "rank_pattern must be an object"),
        ({"alpha_pattern": {"4": -2}}, r"alpha_pattern\['4'\] must be a positive number"),
        ({"target_modules": 5}, "target_modules must be a str"),
        ({"target_modules": []}, "target_modules must be a str"),
        ({"target_modules": "("}, r"'\(' is not a valid regular expression"),
        ({"target_modules": "all-linear"}, "all-linear"),
        ({"exclude_modules": ["1"]}, "exclude_modules"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ],
)
def test_config_values_are_checked_into_a_bare_model_and_over_an_adapter(tmp_path, edit, message):
    folder = saved(tmp_path, config_edit=lambda config: config.update(edit))
    assert_refused(folder, rf"adapter_config.json: .*{message}")


def test_loading_over_an_adapter_of_another_rank_is_refused(tmp_path):
    folder = saved(tmp_path)
    model = add_lora(make_model(), ["0", "1", "3", "4"], r=3)
    before = state(model)
    with pytest.raises(ValueError, match="adapter 'default' has r=3"):
        load_adapter(model, folder)
    assert_same_state(before, state(model))


@pytest.mark.parametrize("broken", ["config", "json", "list", "weights", "pickle", "damaged"])
def test_missing_or_unreadable_files_are_value_errors_naming_the_file(tmp_path, broken):
    folder = saved(tmp_path)
    config, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if broken == "config":
        config.unlink()
    elif broken == "json":
        config.write_text('{"r": 2,')
    elif broken == "list":
        config.write_text("[1, 2]")
    elif broken == "damaged":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    else:
        weights.unlink()
        if broken == "pickle":
            (folder / "adapter_model.bin").write_bytes(b"pickle")
    named = config if broken in ("config", "json", "list") else weights
    hint = "a pickle, is not read" if broken == "pickle" else ""
    assert_refused(folder, rf"{re.escape(str(named))}.*{hint}")


def hostile_model() -> nn.Module:
    """Module names that make (a|aa)+$ backtrack exponentially: a run of a's, then no match."""
    return nn.ModuleDict({f"{'a' * 36}{i}b": nn.Linear(2, 2) for i in range(200)}).double()


@pytest.mark.parametrize("field", ["target_modules", "rank_pattern", "alpha_pattern"])
def test_a_hostile_pattern_in_a_file_ends_in_about_a_second(tmp_path, field):
    source = add_lora(hostile_model(), [f"{'a' * 36}0b"], r=1)
    save_adapter(source, tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["target_modules"] = r".*b" if field != "target_modules" else r"(a|aa)+$"
    if field != "target_modules":
        config[field] = {r"(a|aa)+$": 2}
    path.write_text(json.dumps(config))
    model = hostile_model()
    before = state(model)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"adapter_config.json: .*took more than 1 s"):
        load_adapter(model, tmp_path)
    assert time.perf_counter() - start < WALL_BOUND_S
    assert_same_state(before, state(model))


# ---- the extra tensors PEFT writes ---------------------------------------------------------------


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16)
    config.bos_token_id = config.eos_token_id = 0
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("targeted", [True, False], ids=["wte-targeted", "save_embedding_layers"])
def test_embedding_matrices_peft_saves_are_loaded_as_peft_loads_them(tmp_path, targeted):
    peft = pytest.importorskip("peft")
    targets = ["c_attn", "wte"] if targeted else ["c_attn"]
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules=targets))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        theirs.get_input_embeddings().weight.add_(0.5)  # a trained (or resized) embedding
    theirs.save_pretrained(tmp_path, save_embedding_layers=True)
    keys = [k for k in load_file(tmp_path / "adapter_model.safetensors") if "lora_" not in k]
    assert keys  # PEFT wrote full matrices: base_layer.weight, or weight when not targeted
    ours = load_adapter(tiny_gpt2(), tmp_path)
    ids = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-6, atol=1e-6)

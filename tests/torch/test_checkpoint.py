"""lowrank.torch.checkpoint: save_trainable / load_trainable, what training writes (PEFT adapter
files plus trainable.safetensors): checked before the model changes, rolled back on failure,
the folder replaced as a unit; modules_to_save in the adapter file; checkpoints refused when they
do not fit. (Through a training run, and resuming: test_train.py.)"""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank.torch import add_lora
from lowrank.torch.checkpoint import (
    load_checkpoint,
    load_trainable,
    save_checkpoint,
    save_trainable,
    trainable_parameters,
)


def _data(n=48, features=6, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, features, generator=generator, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=generator)
    return [(X[i], y[i]) for i in range(n)]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _collate(examples):
    return torch.stack([x for x, _ in examples]), torch.stack([y for _, y in examples])


def _trained(tmp_path, head=True):
    """A model with a LoRA adapter on layer 0 (nonzero B) and, optionally, a changed head,
    saved with save_trainable."""
    model = add_lora(_model(), ["0"], r=2, alpha=4)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model[0].B["default"].copy_(torch.randn(16, 2, generator=generator, dtype=torch.float64))
        if head:
            model[2].weight.add_(1.0)
    model[2].requires_grad_(head)
    save_trainable(model, tmp_path)
    return model


def _state(model):
    return {
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "tensors": {n: t.detach().clone() for n, t in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def _assert_same(before, after):
    assert after["types"] == before["types"] and after["grad"] == before["grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][name], tensor), name


def _edit_head_file(folder, edit):
    path = folder / "trainable.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.update({"2.weight": torch.ones(1, dtype=torch.float64)}), r"2.weight: \(1,\)"),
        (lambda t: t.update({"2.weight": torch.ones(16, 3, dtype=torch.float64)}), "2.weight"),
        (
            lambda t: t.update({"9.weight": torch.ones(3, 16, dtype=torch.float64)}),
            "lacks.*9.weight",
        ),
        (lambda t: t.update({"2.bias": torch.ones(3, dtype=torch.int64)}), "dtype torch.int64"),
        (lambda t: t.update({"2.bias": torch.full((3,), float("nan"))}), "NaN"),
    ],
)
def test_a_head_that_does_not_fit_changes_nothing_not_even_the_adapter(tmp_path, edit, message):
    _trained(tmp_path)
    _edit_head_file(tmp_path, edit)
    for model in (_model(), add_lora(_model(), ["0"], r=2)):  # bare, and over the adapter
        before = _state(model)
        with pytest.raises(ValueError, match=message):
            load_trainable(model, tmp_path)
        _assert_same(before, _state(model))


def test_an_adapter_that_does_not_fit_leaves_the_head_alone(tmp_path):
    _trained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.0.lora_A.weight"] = torch.zeros(3, 6, dtype=torch.float64)
    save_file(tensors, path)
    model = _model()
    before = _state(model)
    with pytest.raises(ValueError, match="does not fit"):
        load_trainable(model, tmp_path)
    _assert_same(before, _state(model))


def test_a_failure_half_way_puts_adapter_and_head_back(tmp_path, monkeypatch):
    _trained(tmp_path)
    model = _model()
    before = _state(model)

    # the head is copied after the adapter's factors: fail there
    original = torch.Tensor.copy_
    calls = []

    def copy_then_fail(self, source, *args, **kwargs):
        calls.append(tuple(self.shape))
        if calls.count((3, 16)) == 1 and tuple(self.shape) == (3, 16):  # the head, once
            raise RuntimeError("out of memory")
        return original(self, source, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_trainable(model, tmp_path)
    monkeypatch.setattr(torch.Tensor, "copy_", original)
    assert (16, 2) in calls  # the adapter had been applied before the failure
    _assert_same(before, _state(model))


def test_a_save_replaces_what_the_last_one_wrote_and_keeps_the_log(tmp_path):
    _trained(tmp_path, head=True)
    (tmp_path / "log.jsonl").write_text('{"event": "step"}\n')
    model = _trained(tmp_path, head=False)  # no head this time: the old one must not stay
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "log.jsonl",
    ]
    fresh = load_trainable(_model(), tmp_path)
    x = _collate(_data())[0]
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_nothing_to_load_is_an_error_naming_the_folder(tmp_path):
    with pytest.raises(ValueError, match="holds neither adapter_config.json"):
        load_trainable(_model(), tmp_path)


def test_a_head_trained_in_full_goes_into_the_adapter_file_and_comes_back(tmp_path):
    # modules_to_save: the head is part of the adapter (PEFT's layout), not trainable.safetensors.
    model = add_lora(_model(), ["0"], r=2, modules_to_save=["2"])
    with torch.no_grad():
        model[2].modules_to_save["default"].weight.add_(1.0)
    save_trainable(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    fresh = load_trainable(_model(), tmp_path)
    x = _collate(_data())[0]
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def _optimizer(model):
    optimizer = torch.optim.AdamW(list(trainable_parameters(model).values()), lr=0.1)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_a_checkpoint_for_other_parameters_or_no_checkpoint_is_refused(tmp_path):
    model = add_lora(_model(), ["0"], r=2, modules_to_save=["2"])
    optimizer, scheduler = _optimizer(model)
    model(_collate(_data())[0]).sum().backward()
    optimizer.step()
    save_checkpoint(model, tmp_path / "c", optimizer, scheduler, {"step": 1}, {})
    other = add_lora(_model(), ["0"], r=2)  # no head trained in full
    before = _state(other)
    with pytest.raises(ValueError, match="other trainable parameters"):
        load_checkpoint(other, tmp_path / "c", *_optimizer(other))
    _assert_same(before, _state(other))
    (tmp_path / "c" / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the checkpoint"):
        load_checkpoint(other, tmp_path / "c", *_optimizer(other))
    with pytest.raises(ValueError, match="is no training checkpoint"):
        load_checkpoint(other, tmp_path, *_optimizer(other))

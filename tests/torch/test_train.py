"""lowrank.torch.train: the loop against a hand-written one (torch.optim.AdamW, transformers'
schedule, clip_grad_norm_), accumulation against one big batch, logging, saving, errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank.torch import add_lora
from lowrank.torch.train import (
    TrainConfig,
    cosine_with_warmup,
    load_trainable,
    save_trainable,
    train,
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


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def test_schedule_matches_transformers():
    # Oracle: transformers.get_cosine_schedule_with_warmup's multiplier at every step.
    from transformers import get_cosine_schedule_with_warmup

    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=7, num_training_steps=50
    )
    for step in range(50):
        assert cosine_with_warmup(step, 50, 7) == pytest.approx(
            scheduler.get_last_lr()[0], abs=1e-12
        )
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("batch_size, grad_accum_steps", [(8, 1), (4, 2)])
def test_train_matches_a_hand_written_loop(batch_size, grad_accum_steps):
    # Oracle: the plain recipe written out with torch.optim.AdamW, transformers' schedule and
    # clip_grad_norm_, on batches of 8 drawn in the same seeded order. With accumulation, two
    # micro-batches of 4 must give the same step as one batch of 8 (mean losses, equal sizes).
    # float64: the only differences are summation order, so 1e-12 is ample.
    from transformers import get_cosine_schedule_with_warmup

    examples = _data()
    config = TrainConfig(
        epochs=3,
        batch_size=batch_size,
        grad_accum_steps=grad_accum_steps,
        lr=0.05,
        warmup_ratio=0.1,
        weight_decay=0.01,
        max_grad_norm=0.5,
        seed=3,
        progress=False,
        device="cpu",
    )
    ours = _model()
    result = train(ours, examples, config, loss_fn=_loss, collate=_collate)

    reference = _model()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=0.05, weight_decay=0.01)
    total = 3 * len(examples) // 8
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(0.1 * total), total)
    shuffler = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(3):
        order = torch.randperm(len(examples), generator=shuffler).tolist()
        for start in range(0, len(order), 8):
            loss = _loss(reference, _collate([examples[i] for i in order[start : start + 8]]))
            loss.backward()
            nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            losses.append(loss.item())
    assert result.steps == total
    assert result.losses == pytest.approx(losses, rel=1e-12)
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_only_trainable_parameters_change_and_runs_repeat(tmp_path):
    examples = _data()
    runs = []
    for _ in range(2):
        model = _model()
        model[0].weight.requires_grad_(False)
        frozen = model[0].weight.detach().clone()
        config = TrainConfig(epochs=1, batch_size=8, lr=0.01, progress=False, device="cpu")
        runs.append(train(model, examples, config, loss_fn=_loss, collate=_collate).losses)
        assert torch.equal(model[0].weight, frozen)
    assert runs[0] == runs[1]  # seeded: the same order and the same numbers


def test_log_and_saved_adapter_with_head(tmp_path):
    examples = _data()
    model = _model()
    add_lora(model, ["0"], r=2, alpha=4)
    model[2].requires_grad_(True)  # a head that trains next to the adapter
    config = TrainConfig(
        epochs=2,
        batch_size=16,
        lr=0.01,
        progress=False,
        device="cpu",
        out_dir=str(tmp_path / "run"),
        save_every_epoch=True,
    )
    evaluate = lambda m: {"loss": _loss(m, _collate(examples)).item()}  # noqa: E731
    result = train(model, examples, config, loss_fn=_loss, collate=_collate, evaluate=evaluate)
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == ["config"] + (["step"] * 3 + ["eval"]) * 2
    assert [line["loss"] for line in lines if line["event"] == "step"] == result.losses
    for folder in ("run", "run/epoch-1", "run/epoch-2"):
        names = {p.name for p in (tmp_path / folder).iterdir()}
        assert {
            "adapter_config.json",
            "adapter_model.safetensors",
            "trainable.safetensors",
        } <= names
    # a fresh model with the saved files computes what the trained one computes
    fresh = _model()
    load_trainable(fresh, tmp_path / "run")
    x = _collate(examples)[0]
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_errors():
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=1.0)
    model = _model().requires_grad_(False)
    config = TrainConfig(progress=False, device="cpu")
    with pytest.raises(ValueError, match="no parameters that require grad"):
        train(model, _data(), config, loss_fn=_loss, collate=_collate)
    with pytest.raises(ValueError, match="no training examples"):
        train(_model(), [], config, loss_fn=_loss, collate=_collate)
    checkpointing = TrainConfig(progress=False, device="cpu", gradient_checkpointing=True)
    with pytest.raises(ValueError, match="gradient checkpointing needs a Hugging Face model"):
        train(_model(), _data(), checkpointing, loss_fn=_loss, collate=_collate)


# ---- save_trainable / load_trainable ----------------------------------------------------------


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


def test_peft_loads_the_out_dir_of_a_training_run(tmp_path):
    peft = pytest.importorskip("peft")
    model = add_lora(_model(), ["0", "2"], r=2, alpha=4)
    config = TrainConfig(
        epochs=1, batch_size=16, lr=0.05, progress=False, device="cpu", out_dir=str(tmp_path)
    )
    train(model, _data(), config, loss_fn=_loss, collate=_collate)
    assert (tmp_path / "log.jsonl").exists()
    theirs = peft.PeftModel.from_pretrained(_model(), tmp_path).eval()
    x = _collate(_data())[0]
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=1e-9, atol=1e-9)

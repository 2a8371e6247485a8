"""lowrank.torch.train: the loop against a hand-written one (torch.optim.AdamW, transformers'
schedule, clip_grad_norm_), accumulation against one big batch, logging, saving, errors.
(save_trainable / load_trainable on their own: test_checkpoint.py.)"""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank.torch import add_lora
from lowrank.torch.checkpoint import load_trainable
from lowrank.torch.train import TrainConfig, cosine_with_warmup, train


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

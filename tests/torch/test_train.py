"""lowrank.torch.train: the loop against a hand-written one (torch.optim.AdamW, transformers'
schedules, clip_grad_norm_), accumulation against one big batch, logging, saving, checkpoints
and resuming (against the uninterrupted run), errors.
(save_trainable / load_trainable on their own: test_checkpoint.py.)"""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank.torch import add_lora
from lowrank.torch.checkpoint import load_trainable
from lowrank.torch.train import (
    SCHEDULES,
    TrainConfig,
    cosine_with_warmup,
    linear_with_warmup,
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


@pytest.mark.parametrize(
    ("schedule", "oracle"),
    [
        ("linear", "get_linear_schedule_with_warmup"),
        ("constant", "get_constant_schedule_with_warmup"),
    ],
)
def test_the_other_schedules_match_transformers(schedule, oracle):
    # Oracle: transformers' schedule of the same name, at every step, through a real run's
    # logged learning rates (warmup_steps given, so the ratio is not used).
    import transformers

    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    if schedule == "constant":
        theirs = getattr(transformers, oracle)(optimizer, num_warmup_steps=7)
    else:
        theirs = getattr(transformers, oracle)(optimizer, 7, 50)
    ours = SCHEDULES[schedule]
    for step in range(50):
        assert ours(step, 50, 7) == pytest.approx(theirs.get_last_lr()[0], abs=1e-12)
        optimizer.step()
        theirs.step()


def test_warmup_steps_and_schedule_reach_the_optimizer(tmp_path):
    config = TrainConfig(
        epochs=2,
        batch_size=8,
        lr=0.1,
        schedule="linear",
        warmup_steps=3,
        progress=False,
        device="cpu",
        out_dir=str(tmp_path),
    )
    train(_model(), _data(), config, loss_fn=_loss, collate=_collate)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    lrs = [line["lr"] for line in lines if line["event"] == "step"]  # 12 steps
    assert lrs == pytest.approx([0.1 * linear_with_warmup(s, 12, 3) for s in range(12)])


@pytest.mark.parametrize("resume_at", [2, 6, 7], ids=["mid-epoch", "epoch-end", "epoch-2"])
def test_a_resumed_run_ends_exactly_where_the_uninterrupted_one_does(tmp_path, resume_at):
    # Oracle: the uninterrupted run, to the bit: 48 examples, micro-batches of 4, 2 per step
    # (6 steps per epoch), 2 epochs, dropout in the model, weight decay, a cosine schedule.
    def model():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(6, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 3)
        ).double()

    def config(out, **more):
        return TrainConfig(
            epochs=2,
            batch_size=4,
            grad_accum_steps=2,
            lr=0.05,
            weight_decay=0.01,
            seed=5,
            progress=False,
            device="cpu",
            out_dir=str(out),
            **more,
        )

    evaluate = lambda m: {"loss": _loss(m, _collate(_data())).item()}  # noqa: E731
    whole = model()
    first = train(
        whole,
        _data(),
        config(tmp_path / "a", save_steps=1),
        loss_fn=_loss,
        collate=_collate,
        evaluate=evaluate,
    )
    again = model()
    resumed = train(
        again,
        _data(),
        config(tmp_path / "b", resume_from=str(tmp_path / "a" / f"checkpoint-{resume_at}")),
        loss_fn=_loss,
        collate=_collate,
        evaluate=evaluate,
    )
    for a, b in zip(whole.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.losses == first.losses and resumed.evals == first.evals
    assert resumed.steps == first.steps == 12
    with pytest.raises(ValueError, match=r"cannot resume .*lr 0.05 -> 0.1"):
        bad = config(tmp_path / "c", resume_from=str(tmp_path / "a" / "checkpoint-2"))
        bad.lr = 0.1
        train(model(), _data(), bad, loss_fn=_loss, collate=_collate)


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
    with pytest.raises(ValueError, match="warmup_steps must be a non-negative int"):
        TrainConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="save_steps must be a positive int"):
        TrainConfig(save_steps=0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="step")
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


# LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B trains at loraplus_lr_ratio times A's lr.


def _peft_name(name: str) -> str:
    """PEFT's parameter name -> lowrank's (the same tensor of the same model)."""
    name = name.removeprefix("base_model.model.")
    for kind in ("A", "B"):
        name = name.replace(f".lora_{kind}.default.weight", f".{kind}.default")
        name = name.replace(f".lora_embedding_{kind}.default", f".{kind}.default")
    return name


def test_loraplus_groups_match_peft_create_loraplus_optimizer():
    """Oracle: PEFT's create_loraplus_optimizer on the same tiny BERT classifier (LoRA on
    query/value and the word embeddings, the head trained in full)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    from transformers import BertConfig, BertForSequenceClassification

    from lowrank.torch.checkpoint import trainable_parameters
    from lowrank.torch.train import parameter_groups

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=40,
        max_position_embeddings=16,
    )
    base = BertForSequenceClassification(config)
    targets = ["query", "value", "word_embeddings"]
    ours = add_lora(copy.deepcopy(base), targets, r=2, modules_to_save=["classifier"])
    lora_config = LoraConfig(r=2, target_modules=targets, modules_to_save=["classifier"])
    theirs = get_peft_model(copy.deepcopy(base), lora_config)
    peft_optimizer = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=5e-4
    )
    names = {id(p): _peft_name(n) for n, p in theirs.named_parameters()}
    expected = {names[id(p)]: g["lr"] for g in peft_optimizer.param_groups for p in g["params"]}
    parameters = trainable_parameters(ours)
    ids = {id(p): name for name, p in parameters.items()}
    got = {
        ids[id(p)]: group["lr"]
        for group in parameter_groups(ours, parameters, 1e-3, 16)
        for p in group["params"]
    }
    assert sorted(got) == sorted(expected) == sorted(parameters)
    embedding = "bert.embeddings.word_embeddings"
    for name, lr in expected.items():
        if name.startswith(embedding):
            continue  # PEFT: a fixed loraplus_lr_embedding for both factors; lowrank: as below
        assert got[name] == pytest.approx(lr), name
    assert expected[f"{embedding}.B.default"] == expected[f"{embedding}.A.default"] == 5e-4
    assert got[f"{embedding}.A.default"] == 1e-3 and got[f"{embedding}.B.default"] == 0.016
    assert got["classifier.modules_to_save.default.bias"] == 0.016  # 1-dim: PEFT's B group


def test_loraplus_one_step_moves_b_ratio_times_as_far_as_a():
    """Oracle by hand: AdamW's first step is p -= lr * g / (|g| + eps) (m_hat = g,
    sqrt(v_hat) = |g|), i.e. about lr per entry: lr for A, ratio * lr for B."""
    data = _data(n=8)
    model = add_lora(_model(), ["0", "2"], r=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".B." in name:
                p.normal_()  # B != 0, so that A has a gradient as well
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = TrainConfig(
        batch_size=8,
        lr=1e-3,
        loraplus_lr_ratio=10,
        schedule="constant",
        warmup_steps=0,
        max_grad_norm=None,
        device="cpu",
        progress=False,
    )
    model.zero_grad()
    _loss(model, _collate(data)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    train(model, data, config, loss_fn=_loss, collate=_collate)
    for name, p in model.named_parameters():
        if name in before:
            lr = 1e-3 * (10 if ".B." in name else 1)
            g = grads[name]
            expected = before[name] - lr * g / (g.abs() + 1e-8)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "16"])
def test_loraplus_ratio_is_checked(bad):
    with pytest.raises((ValueError, TypeError), match="loraplus_lr_ratio must be a positive"):
        TrainConfig(loraplus_lr_ratio=bad)


def test_loraplus_groups_mirror_the_numpy_scales():
    """The same LoRA MLP in both halves: the tensors at ratio * lr are the same ones."""
    import numpy as np

    from lowrank.numpy import MLP
    from lowrank.numpy import add_lora as np_add_lora
    from lowrank.numpy.train import loraplus_lr_scales
    from lowrank.torch.checkpoint import trainable_parameters
    from lowrank.torch.train import parameter_groups

    numpy_model = np_add_lora(MLP([6, 16, 3]), r=2)
    torch_model = add_lora(
        nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), ["0", "2"], r=2
    )
    parameters = trainable_parameters(torch_model)
    names = {id(p): name.removesuffix(".default") for name, p in parameters.items()}
    slow, fast = parameter_groups(torch_model, parameters, 1e-3, 8)
    assert fast["lr"] == 8e-3 and slow["lr"] == 1e-3
    got = {f"layers.{names[id(p)]}" for p in fast["params"]}
    assert (
        got == set(loraplus_lr_scales(numpy_model.parameters(), 8)) == {"layers.0.B", "layers.2.B"}
    )
    assert np.all([p.ndim == 2 for p in slow["params"]]) and len(slow["params"]) == 2

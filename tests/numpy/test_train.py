"""Tests for lowrank.numpy.train: the softmax cross-entropy and the mini-batch loop.

Oracles: the cross-entropy formula written out, torch's cross_entropy and its autograd,
brute-force loops, well-separated clusters that any working trainer must learn.
"""

import numpy as np
import pytest

from lowrank.numpy import MLP, SGD, AdamW, accuracy, relative_error, softmax_cross_entropy, train

SAME_MATH_TOL = 1e-12  # two float64 evaluations of the same formula
SIZES = [6, 8, 7, 4]


def batch(seed: int = 0, n: int = 10):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, SIZES[0])), rng.integers(0, SIZES[-1], size=n)


def test_softmax_cross_entropy_formula_and_stability() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(5, 3)) * 3
    labels = np.array([0, 2, 1, 1, 0])
    # -log(exp(z_y) / sum_j exp(z_j)), averaged: written out with no max-shift.
    expected = -np.mean(logits[np.arange(5), labels] - np.log(np.exp(logits).sum(axis=1)))
    loss, dlogits = softmax_cross_entropy(logits, labels)
    assert loss == pytest.approx(expected, rel=1e-13)
    logits_t = torch.tensor(logits, requires_grad=True)
    torch.nn.functional.cross_entropy(logits_t, torch.tensor(labels)).backward()
    assert relative_error(dlogits, logits_t.grad.numpy()) < SAME_MATH_TOL
    # Huge logits: the naive formula overflows, the shifted one does not.
    big_loss, big_grad = softmax_cross_entropy(logits + 1000.0, labels)
    assert big_loss == pytest.approx(expected, rel=1e-10)
    assert np.all(np.isfinite(big_grad))


@pytest.mark.parametrize(
    ("logits", "labels"),
    [
        (np.zeros(3), np.zeros(3, dtype=int)),
        (np.zeros((2, 3)), np.zeros(3, dtype=int)),
        (np.zeros((2, 3)), np.array([0, 3])),
        (np.zeros((2, 3)), np.array([0.0, 1.0])),
    ],
)
def test_softmax_cross_entropy_rejects_bad_input(logits, labels) -> None:
    with pytest.raises(ValueError, match="labels"):
        softmax_cross_entropy(logits, labels)


def gaussian_clusters(seed: int, n: int = 300):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(SIZES[-1], SIZES[0])) * 3
    labels = rng.integers(0, SIZES[-1], size=n)
    return centres[labels] + rng.normal(size=(n, SIZES[0])), labels


@pytest.mark.parametrize(
    "make_optimizer", [lambda p: SGD(p, lr=0.1, momentum=0.9), lambda p: AdamW(p, lr=1e-2)]
)
def test_training_reduces_the_loss(make_optimizer) -> None:
    X, y = gaussian_clusters(8)
    model = MLP(SIZES, rng=np.random.default_rng(8))
    losses = train(model, X, y, make_optimizer(model.parameters()), epochs=10, batch_size=32,
                   rng=np.random.default_rng(0))  # fmt: skip
    assert len(losses) == 10 * 10  # ceil(300 / 32) = 10 steps per epoch
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert accuracy(model, X, y) > 0.9  # well separated clusters; chance is 0.25


def test_accuracy_against_a_loop() -> None:
    model = MLP(SIZES, rng=np.random.default_rng(9))
    X, y = batch(9, n=50)
    logits = model.forward(X)
    hits = sum(int(np.argmax(logits[i]) == y[i]) for i in range(50))
    assert accuracy(model, X, y) == hits / 50


def test_train_rejects_bad_input() -> None:
    model = MLP(SIZES)
    X, y = batch()
    optimizer = SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="same non-zero number"):
        train(model, X, y[:5], optimizer, epochs=1, batch_size=4, rng=rng)
    with pytest.raises(ValueError, match="batch_size"):
        train(model, X, y, optimizer, epochs=1, batch_size=0, rng=rng)


# LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B at loraplus_lr_ratio times A's learning rate.


def _lora_mlp():
    from lowrank.numpy import add_lora, lora_layers

    model = add_lora(MLP([6, 8, 4], rng=np.random.default_rng(0)), r=2, alpha=4)
    for _, layer in lora_layers(model):  # B != 0, so that A has a gradient too
        layer.B[...] = np.random.default_rng(1).normal(size=layer.B.shape)
    return model


def test_loraplus_sgd_step_moves_b_ratio_times_faster() -> None:
    """Oracle: one SGD step by hand, p - lr * g for A and p - ratio * lr * g for B."""
    model = _lora_mlp()
    X, y = batch()
    before = {name: p.copy() for name, p in model.parameters().items()}
    _, dlogits = softmax_cross_entropy(model.forward(X), y)
    model.backward(dlogits)
    grads = {name: g.copy() for name, g in model.gradients().items()}
    optimizer = SGD(model.parameters(), lr=0.1)
    train(
        model,
        X,
        y,
        optimizer,
        epochs=1,
        batch_size=len(X),
        rng=np.random.default_rng(0),
        loraplus_lr_ratio=8,
    )
    assert optimizer.lr_scales == {"layers.0.B": 8.0, "layers.2.B": 8.0}
    for name, p in model.parameters().items():
        step = 0.1 * (8 if name.endswith(".B") else 1) * grads[name]
        np.testing.assert_allclose(p, before[name] - step, rtol=1e-12, atol=1e-15)


def test_loraplus_adamw_matches_torch_param_groups() -> None:
    """Oracle: torch.optim.AdamW with an A group at lr and a B group at ratio * lr, float64."""
    import torch

    model = _lora_mlp()
    names = list(model.parameters())
    copies = {
        name: torch.tensor(p.copy(), requires_grad=True) for name, p in model.parameters().items()
    }
    groups = [
        {"params": [copies[n] for n in names if not n.endswith(".B")], "lr": 0.01},
        {"params": [copies[n] for n in names if n.endswith(".B")], "lr": 0.04},
    ]
    reference = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1)
    optimizer = AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    X, y = batch()
    for step in range(3):
        _, dlogits = softmax_cross_entropy(model.forward(X), y)
        model.backward(dlogits)
        grads = model.gradients()
        for name in names:
            copies[name].grad = torch.tensor(grads[name])
        reference.step()
        # one full batch (in a shuffled order: the same mean gradient up to summation rounding)
        rng = np.random.default_rng(step)
        train(model, X, y, optimizer, epochs=1, batch_size=len(X), rng=rng, loraplus_lr_ratio=4)
    for name, p in model.parameters().items():
        np.testing.assert_allclose(p, copies[name].detach().numpy(), rtol=1e-10, atol=1e-13)


def test_loraplus_rejects_bad_input() -> None:
    model = _lora_mlp()
    X, y = batch()
    rng = np.random.default_rng(0)
    for bad in (0, -2.0, float("inf")):
        with pytest.raises(ValueError, match="loraplus_lr_ratio must be a positive number"):
            train(
                model,
                X,
                y,
                SGD(model.parameters(), lr=0.1),
                epochs=1,
                batch_size=4,
                rng=rng,
                loraplus_lr_ratio=bad,
            )
    with pytest.raises(TypeError, match="loraplus_lr_ratio must be a positive number"):
        train(
            model,
            X,
            y,
            SGD(model.parameters(), lr=0.1),
            epochs=1,
            batch_size=4,
            rng=rng,
            loraplus_lr_ratio="16",
        )

    class Plain:
        def step(self, grads):
            pass

    with pytest.raises(TypeError, match="optimizer with lr_scales"):
        train(model, X, y, Plain(), epochs=1, batch_size=4, rng=rng, loraplus_lr_ratio=2)
    with pytest.raises(ValueError, match="does not have"):
        SGD(model.parameters(), lr=0.1, lr_scales={"layers.9.B": 2.0})
    with pytest.raises(ValueError, match="must be positive"):
        AdamW(model.parameters(), lr_scales={"layers.0.B": 0.0})

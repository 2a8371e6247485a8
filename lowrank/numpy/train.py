"""Training the NumPy model: the mean softmax cross-entropy and a mini-batch loop.

    losses = train(model, X, y, AdamW(model.parameters(), lr=1e-2), epochs=20, batch_size=64,
                   rng=np.random.default_rng(0))

The mirror of `lowrank.torch.train`, at toy scale: one forward, one hand-written backward
(`model.backward`), one optimizer step per mini-batch. The torch trainer takes a loss function
and a collate function because it trains any model on any data; this one trains the tiny
`model.MLP` classifier on arrays. LoRA (Hu et al. 2021, arXiv:2106.09685) needs nothing
special here: after `add_lora`, `model.parameters()` holds only A and B.
"""

import numpy as np

from .model import MLP


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of integer `labels` (batch,) under softmax(logits (batch, classes)).

    Returns (loss, dL/dlogits). Subtracting each row's max before exponentiating changes
    nothing mathematically and keeps exp() from overflowing. The gradient is the classic
    (softmax(logits) - one_hot(labels)) / batch.
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"need logits (batch, classes) and labels (batch,), got "
            f"{logits.shape} and {labels.shape}"
        )
    n, n_classes = logits.shape
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must be ints in [0, {n_classes}), got {labels.dtype}")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # (batch, classes)
    loss = -log_probs[np.arange(n), labels].mean()
    dlogits = np.exp(log_probs)
    dlogits[np.arange(n), labels] -= 1.0
    return float(loss), dlogits / n


def train_step(model: MLP, x: np.ndarray, y: np.ndarray, optimizer: object) -> float:
    """One forward, backward and optimizer step on the batch (x, y). Returns the loss."""
    loss, dlogits = softmax_cross_entropy(model.forward(x, training=True), y)
    model.backward(dlogits)
    optimizer.step(model.gradients())
    return loss


def train(
    model: MLP,
    X: np.ndarray,
    y: np.ndarray,
    optimizer: object,
    *,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
) -> list[float]:
    """Mini-batch training: each epoch visits the examples once, in an order drawn from `rng`.

    `optimizer` is any object with `step(grads)` built on `model.parameters()` (SGD, AdamW).
    Returns the loss of every step, in order.
    """
    if len(X) != len(y) or len(X) == 0:
        raise ValueError(
            f"X and y must hold the same non-zero number of examples: {len(X)}, {len(y)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(X))
        for start in range(0, len(X), batch_size):
            batch = order[start : start + batch_size]
            losses.append(train_step(model, X[batch], y[batch], optimizer))
    return losses


def accuracy(model: MLP, X: np.ndarray, y: np.ndarray) -> float:
    """Share of examples whose highest logit is the true label (no dropout)."""
    return float(np.mean(model.forward(X, training=False).argmax(axis=1) == y))

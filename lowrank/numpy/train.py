"""Training the NumPy model: the mean softmax cross-entropy and a mini-batch loop.

    losses = train(model, X, y, AdamW(model.parameters(), lr=1e-2), epochs=20, batch_size=64,
                   rng=np.random.default_rng(0))

The mirror of `lowrank.torch.train`, at toy scale: one forward, one hand-written backward
(`model.backward`), one optimizer step per mini-batch. The torch trainer takes a loss function
and a collate function because it trains any model on any data; this one trains the tiny
`model.MLP` classifier on arrays. LoRA (Hu et al. 2021, arXiv:2106.09685) needs nothing
special here: after `add_lora`, `model.parameters()` holds only A and B. LoRA+ (Hayou et al.
2024, arXiv:2402.12354) trains B at `loraplus_lr_ratio` times A's learning rate
(`loraplus_lr_scales`, the mirror of the torch trainer's `parameter_groups`).
"""

import numpy as np

from lowrank._validate import check_positive_number

from .model import MLP

__all__ = ["accuracy", "loraplus_lr_scales", "softmax_cross_entropy", "train", "train_step"]


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of integer `labels` (batch,) under softmax(logits (batch, classes)).

    Returns (loss, dL/dlogits). Subtracting each row's max before exponentiating changes
    nothing mathematically and keeps exp() from overflowing. The gradient is the classic
    (softmax(logits) - one_hot(labels)) / batch.

    Args:
        logits: (batch, classes), any real numbers.
        labels: (batch,), ints in [0, classes).

    Returns:
        (loss, dlogits): the mean loss, a float, and dL/dlogits, (batch, classes).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import softmax_cross_entropy
        >>> loss, dlogits = softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 2]))
        >>> round(loss, 4)  # log(3): a uniform guess among 3 classes
        1.0986
        >>> dlogits
        array([[-0.3333,  0.1667,  0.1667],
               [ 0.1667,  0.1667, -0.3333]])
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
    """One forward, backward and optimizer step on the batch (x, y). Returns the loss.

    x: (batch, sizes[0]) inputs; y: (batch,) integer labels; `optimizer` has `step(grads)`.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import MLP, SGD, train_step
        >>> model = MLP([2, 4, 2])
        >>> optimizer = SGD(model.parameters(), lr=0.5)
        >>> x, y = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1])
        >>> first = train_step(model, x, y, optimizer)
        >>> bool(train_step(model, x, y, optimizer) < first)  # the step lowered the loss
        True
    """
    loss, dlogits = softmax_cross_entropy(model.forward(x, training=True), y)
    model.backward(dlogits)
    optimizer.step(model.gradients())
    return loss


def loraplus_lr_scales(params: dict[str, np.ndarray], loraplus_lr_ratio: float) -> dict[str, float]:
    """LoRA+'s learning-rate multipliers (Hayou et al. 2024, arXiv:2402.12354), name -> ratio.

    As PEFT's `create_loraplus_optimizer`: every B factor (a name ending in ".B") and every
    other one-dimensional parameter (a bias) gets loraplus_lr_ratio; the rest (A factors, other
    matrices) keep 1 and are left out. Give the result to SGD / AdamW as `lr_scales`.

    Examples:
        >>> from lowrank.numpy import MLP, add_lora
        >>> from lowrank.numpy.train import loraplus_lr_scales
        >>> loraplus_lr_scales(add_lora(MLP([4, 8, 3]), r=2).parameters(), 16)
        {'layers.0.B': 16.0, 'layers.2.B': 16.0}
    """
    ratio = check_positive_number("loraplus_lr_ratio", loraplus_lr_ratio)
    return {name: ratio for name, array in params.items() if name.endswith(".B") or array.ndim == 1}


def train(
    model: MLP,
    X: np.ndarray,
    y: np.ndarray,
    optimizer: object,
    *,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    loraplus_lr_ratio: float | None = None,
) -> list[float]:
    """Mini-batch training: each epoch visits the examples once, in an order drawn from `rng`.

    `optimizer` is any object with `step(grads)` built on `model.parameters()` (SGD, AdamW).
    X: (n, sizes[0]) inputs, y: (n,) integer labels. Returns the loss of every step, in order:
    epochs * ceil(n / batch_size) floats. `loraplus_lr_ratio` (LoRA+, Hayou et al. 2024,
    arXiv:2402.12354): B trains at this many times the optimizer's lr, by setting the
    optimizer's `lr_scales` to `loraplus_lr_scales` (an optimizer without `lr_scales` is a
    TypeError); None leaves the optimizer as it is (plain LoRA).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import MLP, AdamW, accuracy, train
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(64, 2))
        >>> y = (X[:, 0] > 0).astype(int)  # the sign of the first feature
        >>> model = MLP([2, 8, 2], rng=rng)
        >>> losses = train(model, X, y, AdamW(model.parameters(), lr=0.05), epochs=10,
        ...                batch_size=16, rng=rng)
        >>> len(losses), bool(losses[-1] < losses[0])
        (40, True)
        >>> bool(accuracy(model, X, y) > 0.9)
        True
    """
    if len(X) != len(y) or len(X) == 0:
        raise ValueError(
            f"X and y must hold the same non-zero number of examples: {len(X)}, {len(y)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if loraplus_lr_ratio is not None:
        scales = loraplus_lr_scales(model.parameters(), loraplus_lr_ratio)
        if not hasattr(optimizer, "lr_scales"):
            raise TypeError(
                f"loraplus_lr_ratio needs an optimizer with lr_scales (SGD, AdamW), "
                f"got {type(optimizer).__name__}"
            )
        optimizer.lr_scales = {name: scales[name] for name in optimizer.params if name in scales}
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(X))
        for start in range(0, len(X), batch_size):
            batch = order[start : start + batch_size]
            losses.append(train_step(model, X[batch], y[batch], optimizer))
    return losses


def accuracy(model: MLP, X: np.ndarray, y: np.ndarray) -> float:
    """Share of examples whose highest logit is the true label (no dropout), in [0, 1].

    X: (n, sizes[0]) inputs, y: (n,) integer labels.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import MLP, accuracy
        >>> model = MLP([2, 2])
        >>> model.layers[0].weight[...] = np.eye(2)  # the logits are the inputs themselves
        >>> model.layers[0].bias[...] = 0.0
        >>> accuracy(model, np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), np.array([0, 1, 1]))
        0.6666666666666666
    """
    return float(np.mean(model.forward(X, training=False).argmax(axis=1) == y))

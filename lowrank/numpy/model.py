"""A tiny MLP built from the NumPy layers, its loss, LoRA on it, and a training loop.

    model = MLP([16, 64, 64, 10], rng=np.random.default_rng(0))   # Linear-ReLU-Linear-ReLU-Linear
    train(model, X, y, AdamW(model.parameters(), lr=1e-2), epochs=20, batch_size=64, rng=rng)
    add_lora(model, r=4, alpha=8)              # freeze everything, wrap every Linear in LoRA
    optimizer = AdamW(model.parameters())      # now only "layers.0.A", "layers.0.B", ...

The layout mirrors torch's `nn.Sequential` stored as `model.layers`: parameter names are
"layers.<index>.<attribute>" ("layers.0.weight", "layers.2.A"), so the same network built in
PyTorch has the same names and weights can be copied across by name.

LoRA: Hu et al. 2021, arXiv:2106.09685. The loss is the mean softmax cross-entropy.
"""

import numbers
from collections.abc import Sequence

import numpy as np

from .lora import Linear, LoRALinear


class ReLU:
    """max(x, 0), elementwise; no parameters."""

    def __init__(self) -> None:
        self._positive: np.ndarray | None = None

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        self._positive = x > 0
        return np.where(self._positive, x, 0.0)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        if self._positive is None:
            raise RuntimeError("backward() called before forward()")
        return np.where(self._positive, dy, 0.0)  # the gradient at exactly 0 is taken as 0

    def params(self) -> dict[str, np.ndarray]:
        return {}

    def grads(self) -> dict[str, np.ndarray]:
        return {}


Layer = Linear | LoRALinear | ReLU


class MLP:
    """Linear -> ReLU -> ... -> Linear for the feature sizes given, e.g. [16, 64, 64, 10].

    `layers` is a plain list (Linear at even indices, ReLU between them); its layers are
    initialised like nn.Linear from `rng` (default seeded 0). `forward` returns logits.
    """

    def __init__(self, sizes: Sequence[int], *, rng: np.random.Generator | None = None) -> None:
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least an input and an output size, got {sizes}")
        rng = np.random.default_rng(0) if rng is None else rng
        self.layers: list[Layer] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            if i > 0:
                self.layers.append(ReLU())
            self.layers.append(Linear(n_in, n_out, rng=rng))

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """x (batch, sizes[0]) -> logits (batch, sizes[-1])."""
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, dlogits: np.ndarray) -> np.ndarray:
        """Back-propagate dL/dlogits through every layer (last first); returns dL/dx."""
        grad = dlogits
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        return grad

    def parameters(self) -> dict[str, np.ndarray]:
        """Every trainable array, by dotted name ("layers.0.weight", "layers.0.A", ...)."""
        return {
            f"layers.{i}.{name}": array
            for i, layer in enumerate(self.layers)
            for name, array in layer.params().items()
        }

    def gradients(self) -> dict[str, np.ndarray | None]:
        """The gradients of the last backward, with the names of `parameters()`."""
        return {
            f"layers.{i}.{name}": array
            for i, layer in enumerate(self.layers)
            for name, array in layer.grads().items()
        }

    def num_parameters(self) -> int:
        """All numbers in the model, frozen or not (a merged adapter's A and B included)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, Linear | LoRALinear):
                total += layer.weight.size + (0 if layer.bias is None else layer.bias.size)
            if isinstance(layer, LoRALinear):
                total += layer.A.size + layer.B.size
        return total

    def num_trainable(self) -> int:
        """Numbers the optimizer updates (what `parameters()` holds)."""
        return sum(array.size for array in self.parameters().values())


def add_lora(
    model: MLP,
    targets: Sequence[int] | None = None,
    *,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "kaiming",
    rng: np.random.Generator | None = None,
) -> MLP:
    """Freeze the whole model and wrap the Linear layers at `targets` (indices into
    `model.layers`; None = every Linear) in LoRALinear, in place. Returns the model.

    Afterwards `model.parameters()` holds only the adapters' A and B: build the optimizer
    after this call. The new adapters start with B = 0, so the model computes what it did.
    """
    linear_indices = [i for i, layer in enumerate(model.layers) if isinstance(layer, Linear)]
    targets = linear_indices if targets is None else list(targets)
    if not targets:
        raise ValueError(f"no layers to wrap; Linear layers (candidates): {linear_indices}")
    for index in targets:
        if not isinstance(index, numbers.Integral) or index not in linear_indices:
            raise ValueError(
                f"target {index!r} is not the index of a Linear layer; candidates: {linear_indices}"
            )
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets repeat a layer: {targets}")
    rng = np.random.default_rng(0) if rng is None else rng
    for layer in model.layers:
        if isinstance(layer, Linear):
            layer.requires_grad = False
    for index in targets:
        base = model.layers[index]
        model.layers[index] = LoRALinear(
            base.weight,
            base.bias,
            r=r,
            alpha=alpha,
            dropout=dropout,
            use_rslora=use_rslora,
            init=init,
            rng=rng,
        )
    return model


def lora_layers(model: MLP) -> list[LoRALinear]:
    """The model's LoRALinear layers, in order."""
    return [layer for layer in model.layers if isinstance(layer, LoRALinear)]


def merge_lora(model: MLP) -> MLP:
    """Fold every adapter into its frozen weight (see LoRALinear.merge). Returns the model."""
    for layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: MLP) -> MLP:
    """Take every adapter out of its weight again (see LoRALinear.unmerge). Returns the model."""
    for layer in lora_layers(model):
        layer.unmerge()
    return model


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

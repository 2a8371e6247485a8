"""LoRA on a whole NumPy model: a tiny MLP, and adding, listing, merging and unmerging its
adapters (the mirror of `lowrank.torch.model`).

    model = MLP([16, 64, 64, 10], rng=np.random.default_rng(0))   # Linear-ReLU-Linear-ReLU-Linear
    train(model, X, y, AdamW(model.parameters(), lr=1e-2), epochs=20, batch_size=64, rng=rng)
    add_lora(model, r=4, alpha=8)              # freeze everything, wrap every Linear in LoRA
    optimizer = AdamW(model.parameters())      # now only "layers.0.A", "layers.0.B", ...

The layout mirrors torch's `nn.Sequential` stored as `model.layers`: parameter and layer names
are "layers.<index>[.<attribute>]" ("layers.0.weight", "layers.2.A"), so the same network built
in PyTorch has the same names and weights can be copied across by name. Targets are layer
indices here, where torch's `add_lora` matches qualified names.

LoRA: Hu et al. 2021, arXiv:2106.09685; QLoRA (`quant_type="nf4"`): Dettmers et al. 2023,
arXiv:2305.14314. The training loop and the loss are in `train.py`.
"""

import numbers
from collections.abc import Sequence

import numpy as np

from lowrank._validate import check_quant_type

from .dora import DoRALinear
from .lora import Linear, LoRALinear
from .qlora import Linear4bit, QLoRALinear

__all__ = ["MLP", "ReLU", "add_lora", "lora_layers", "merge_lora", "unmerge_lora"]


class ReLU:
    """max(x, 0), elementwise; no parameters. x (...) -> y (...), dL/dy (...) -> dL/dx (...).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import ReLU
        >>> relu = ReLU()
        >>> relu.forward(np.array([-1.0, 0.0, 2.0]))
        array([0., 0., 2.])
        >>> relu.backward(np.ones(3))  # the gradient passes where the input was positive
        array([0., 0., 1.])
    """

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
    initialised like nn.Linear from `rng` (default seeded 0). `forward` returns logits:
    x (batch, sizes[0]) -> (batch, sizes[-1]).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import MLP
        >>> model = MLP([4, 8, 3], rng=np.random.default_rng(0))
        >>> [type(layer).__name__ for layer in model.layers]
        ['Linear', 'ReLU', 'Linear']
        >>> model.forward(np.zeros((2, 4))).shape  # (batch, 4) -> logits (batch, 3)
        (2, 3)
        >>> list(model.parameters())
        ['layers.0.weight', 'layers.0.bias', 'layers.2.weight', 'layers.2.bias']
        >>> model.num_parameters()  # 4 * 8 + 8 + 8 * 3 + 3
        67
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
            base = layer.base_layer if isinstance(layer, LoRALinear) else layer
            if isinstance(base, Linear | Linear4bit):  # a 4-bit weight counts as out * in
                total += base.out_features * base.in_features
                total += 0 if base.bias is None else base.bias.size
            if isinstance(layer, LoRALinear):
                total += layer.A.size + layer.B.size
            if isinstance(layer, DoRALinear):
                total += layer.magnitude.size
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
    quant_type: str | None = None,
    use_dora: bool = False,
) -> MLP:
    """Freeze the whole model and wrap the Linear layers at `targets` (indices into
    `model.layers`; None = every Linear) in LoRALinear, in place. Returns the model.

    quant_type: "nf4", "fp4" or "int4" wraps them in QLoRALinear instead (a frozen 4-bit base,
    blocksize 64, double quantization). use_dora: wrap them in `dora.DoRALinear` instead
    (DoRA, Liu et al. 2024, arXiv:2402.09353: a trained magnitude per output as well; full
    precision only). Everything is checked, and every wrapper built, before
    the model changes: a bad argument leaves it as it was. Afterwards `model.parameters()`
    holds only the adapters' A and B: build the optimizer after this call. The new adapters
    start with B = 0, so the model computes what it did.

    LoRA: Hu et al. 2021, arXiv:2106.09685; QLoRA: Dettmers et al. 2023, arXiv:2305.14314.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import MLP, add_lora
        >>> model = MLP([4, 8, 3])
        >>> x = np.ones((2, 4))
        >>> before = model.forward(x)
        >>> model = add_lora(model, r=2, alpha=4)
        >>> list(model.parameters())
        ['layers.0.A', 'layers.0.B', 'layers.2.A', 'layers.2.B']
        >>> model.num_trainable()  # 2 * (4 + 8) + 2 * (8 + 3)
        46
        >>> bool(np.allclose(model.forward(x), before))  # B = 0: nothing changed yet
        True
        >>> type(add_lora(MLP([4, 8, 3]), [2], r=2, quant_type="nf4").layers[2]).__name__
        'QLoRALinear'
        >>> list(add_lora(MLP([4, 8, 3]), [0], r=2, use_dora=True).parameters())  # DoRA
        ['layers.0.A', 'layers.0.B', 'layers.0.magnitude']
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
    if quant_type is not None:
        check_quant_type(quant_type)
        if use_dora:
            raise ValueError(
                "use_dora=True needs a full-precision base here; quant_type must be None"
            )
    rng = np.random.default_rng(0) if rng is None else rng
    options = dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, rng=rng)
    if quant_type is not None:
        options |= dict(quant_type=quant_type, blocksize=64, double_quant=True)
    wrapper = QLoRALinear if quant_type is not None else DoRALinear if use_dora else LoRALinear
    wrappers = {}  # built (and checked) before the model changes: a failure changes nothing
    for index in targets:
        base = model.layers[index]
        try:
            wrappers[index] = wrapper(base.weight, base.bias, **options)
        except ValueError as error:
            raise type(error)(f"layer 'layers.{index}': {error}") from None
    for layer in model.layers:
        if isinstance(layer, Linear):
            layer.requires_grad = False
    for index, wrapped in wrappers.items():
        model.layers[index] = wrapped
    return model


def lora_layers(model: MLP) -> list[tuple[str, LoRALinear]]:
    """(name, layer) for every LoRALinear of the model, in order ("layers.0", ...).

    Examples:
        >>> from lowrank.numpy import MLP, add_lora, lora_layers
        >>> [name for name, _ in lora_layers(add_lora(MLP([4, 8, 8, 3]), [2, 4], r=2))]
        ['layers.2', 'layers.4']
    """
    return [
        (f"layers.{i}", layer)
        for i, layer in enumerate(model.layers)
        if isinstance(layer, LoRALinear)
    ]


def merge_lora(model: MLP) -> MLP:
    """Fold every adapter into its frozen weight (see LoRALinear.merge). Checks every layer
    before it changes any: a merge that would give NaN or inf changes nothing. Returns the
    model, whose forward then costs what the model without adapters cost (Hu et al. 2021,
    arXiv:2106.09685, section 4.2: no inference latency).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import MLP, add_lora, lora_layers, merge_lora
        >>> model = add_lora(MLP([4, 8, 3]), r=2)
        >>> for _, layer in lora_layers(model):
        ...     layer.B[...] = 0.1  # as if trained
        >>> x = np.ones((2, 4))
        >>> y = model.forward(x, training=False)
        >>> model = merge_lora(model)
        >>> [layer.merged for _, layer in lora_layers(model)]
        [True, True]
        >>> bool(np.allclose(model.forward(x), y))
        True
    """
    layers = lora_layers(model)
    if any(layer.merged for _, layer in layers):
        raise RuntimeError("the model is already merged; merging twice would add updates twice")
    for name, layer in layers:
        if not np.all(np.isfinite(layer.merged_weight(+1.0))):
            raise ValueError(f"merging layer {name!r} would produce NaN or inf; nothing changed")
    for _, layer in layers:
        layer.merge()
    return model


def unmerge_lora(model: MLP) -> MLP:
    """Take every adapter out of its weight again (see LoRALinear.unmerge). Returns the model.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import MLP, add_lora, merge_lora, unmerge_lora
        >>> model = add_lora(MLP([4, 8, 3]), r=2)
        >>> model.layers[0].B[...] = 0.1  # as if trained
        >>> W = model.layers[0].weight.copy()
        >>> model = unmerge_lora(merge_lora(model))
        >>> model.layers[0].merged, bool(np.allclose(model.layers[0].weight, W))
        (False, True)
    """
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model

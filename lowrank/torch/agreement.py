"""NumPy vs PyTorch end to end: both halves train the same LoRA MLP and must agree at every step.

One tiny MLP (lowrank.numpy's `MLP`, mirrored by `TorchMLP` with the same weights), one data
set, one initial A for every adapter, AdamW with the same settings, the same batches: `steps`
steps with the NumPy reference (hand-written forward, backward and AdamW) and as many with
PyTorch (lowrank.torch's `add_lora`, autograd, torch.optim.AdamW), all in float64. LoRA: Hu et
al. 2021 (arXiv:2106.09685); rsLoRA's scale alpha / sqrt(r): Kalajdzievski 2023
(arXiv:2312.03732).

The two sides compute the same formulas in a different order (torch scales h = x A^T before
multiplying by B^T, NumPy after), so they differ by rounding, about 1e-16 relative per
operation; 50 Adam steps amplify that by far less than 1e7, so 1e-9 is a safe tolerance. A wrong
gradient, scale, initialisation or optimizer step would show at 1e-3 or more from the first
steps. `lowrank demo` reports this check; tests/equivalence/test_end_to_end.py asserts it.

    result = numpy_torch_agreement(steps=50, seed=0)
    result["max_relative_loss_diff"], result["max_relative_adapter_diff"]  # both about 1e-15

Constants, the fixed settings of the experiment: `SIZES` (the MLP's layer widths), `N_EXAMPLES`
and `BATCH_SIZE` (the data set and each step's batch), `RANK` and `ALPHA` (every adapter's r
and alpha), `ADAMW` (the optimizer's settings, the same on both sides; Loshchilov & Hutter,
arXiv:1711.05101).
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowrank.numpy import MLP, AdamW, train_step
from lowrank.numpy import add_lora as numpy_add_lora
from lowrank.torch.model import add_lora

__all__ = [
    "ADAMW",
    "ALPHA",
    "BATCH_SIZE",
    "N_EXAMPLES",
    "RANK",
    "SIZES",
    "TorchMLP",
    "numpy_torch_agreement",
]

SIZES = (10, 32, 32, 4)  # features, hidden, hidden, classes
N_EXAMPLES, BATCH_SIZE = 256, 32
RANK, ALPHA = 4, 8
ADAMW = {"lr": 5e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


class TorchMLP(nn.Module):
    """lowrank.numpy's MLP as torch modules holding a copy of its weights, with the same
    parameter names (`layers.<i>.weight`, `layers.<i>.bias`), in float64.

    Args:
        reference: the NumPy MLP whose weights are copied (it is not changed).

    Examples:
        >>> reference = MLP([10, 32, 32, 4], rng=np.random.default_rng(0))
        >>> model = TorchMLP(reference)
        >>> model(torch.zeros(5, 10, dtype=torch.float64)).shape  # (batch, in) -> (batch, classes)
        torch.Size([5, 4])
        >>> [name for name, _ in model.named_parameters()][:2]
        ['layers.0.weight', 'layers.0.bias']
        >>> x = np.random.default_rng(1).normal(size=(3, 10))
        >>> y = model(torch.from_numpy(x)).detach().numpy()  # (3, 10) -> (3, 4)
        >>> np.allclose(y, reference.forward(x, training=False))
        True
    """

    def __init__(self, reference: MLP) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for layer in reference.layers:
            if hasattr(layer, "weight"):
                linear = nn.Linear(layer.in_features, layer.out_features, dtype=torch.float64)
                with torch.no_grad():
                    linear.weight.copy_(torch.from_numpy(layer.weight))  # (out, in)
                    linear.bias.copy_(torch.from_numpy(layer.bias))  # (out,)
                layers.append(linear)
            else:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def numpy_torch_agreement(steps: int = 50, seed: int = 0, *, use_rslora: bool = False) -> dict:
    """Train the same LoRA MLP with lowrank.numpy and lowrank.torch in float64; compare.

    Returns a JSON-able dict: the settings; the trainable parameter count of each side; both
    loss sequences (one per step); the largest relative loss difference over the steps; the
    final A and B of every adapted layer from both sides (`adapters`, keyed `layers.<i>.A`) and
    their largest difference relative to the largest entry of each NumPy matrix.

    LoRA (Hu et al. 2021, arXiv:2106.09685) with scale alpha / r, or with `use_rslora` alpha /
    sqrt(r) (Kalajdzievski 2023, arXiv:2312.03732); AdamW (Loshchilov & Hutter,
    arXiv:1711.05101) on both sides.

    Examples:
        >>> result = numpy_torch_agreement(steps=5)
        >>> result["max_relative_loss_diff"] < 1e-9, result["max_relative_adapter_diff"] < 1e-9
        (True, True)
        >>> result["trainable"], len(result["torch_losses"])
        ({'numpy': 568, 'torch': 568}, 5)
        >>> sorted(result["adapters"])[:2]  # each {"numpy": ..., "torch": ...} as nested lists
        ['layers.0.A', 'layers.0.B']
    """
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N_EXAMPLES, SIZES[0]))  # (256, 10)
    y = (X[:, :4].sum(axis=1) > 0).astype(np.int64) + 2 * (X[:, 4] > 0)  # 4 learnable classes
    reference = MLP(list(SIZES), rng=rng)
    model = TorchMLP(reference)  # the same "pretrained" weights, before LoRA
    adapted = [index for index, layer in enumerate(reference.layers) if hasattr(layer, "weight")]

    numpy_add_lora(reference, r=RANK, alpha=ALPHA, use_rslora=use_rslora, rng=rng)  # every Linear
    add_lora(model, [f"layers.{i}" for i in adapted], r=RANK, alpha=ALPHA, use_rslora=use_rslora)
    with torch.no_grad():  # the same random A (and zero B) on both sides
        for index in adapted:
            model.layers[index].A["default"].copy_(torch.from_numpy(reference.layers[index].A))
            model.layers[index].B["default"].copy_(torch.from_numpy(reference.layers[index].B))

    numpy_optimizer = AdamW(reference.parameters(), **ADAMW)
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch_optimizer = torch.optim.AdamW(trainable, **ADAMW)

    numpy_losses, torch_losses = [], []
    batches = [rng.choice(N_EXAMPLES, size=BATCH_SIZE, replace=False) for _ in range(steps)]
    for batch in batches:
        numpy_losses.append(float(train_step(reference, X[batch], y[batch], numpy_optimizer)))
        loss = F.cross_entropy(model(torch.from_numpy(X[batch])), torch.from_numpy(y[batch]))
        torch_optimizer.zero_grad()
        loss.backward()
        torch_optimizer.step()
        torch_losses.append(loss.item())

    adapters, adapter_diff = {}, 0.0
    for index in adapted:
        for name in ("A", "B"):
            ours = getattr(reference.layers[index], name)  # (r, in) or (out, r)
            theirs = getattr(model.layers[index], name)["default"].detach().numpy()
            adapters[f"layers.{index}.{name}"] = {"numpy": ours.tolist(), "torch": theirs.tolist()}
            adapter_diff = max(
                adapter_diff, float(np.abs(ours - theirs).max() / np.abs(ours).max())
            )
    relative = [abs(a - b) / abs(a) for a, b in zip(numpy_losses, torch_losses, strict=True)]
    return {
        "steps": steps,
        "seed": seed,
        "sizes": list(SIZES),
        "r": RANK,
        "alpha": ALPHA,
        "use_rslora": use_rslora,
        "trainable": {
            "numpy": sum(a.size for a in reference.parameters().values()),
            "torch": sum(p.numel() for p in trainable),
        },
        "numpy_losses": numpy_losses,
        "torch_losses": torch_losses,
        "max_relative_loss_diff": max(relative, default=0.0),
        "max_relative_adapter_diff": adapter_diff,
        "adapters": adapters,
    }

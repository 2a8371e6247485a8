"""The headline check: lowrank.numpy and lowrank.torch train the same LoRA model identically.

One tiny MLP (lowrank.numpy's MLP, rebuilt as an nn.Sequential with the same weights), one
data set, one initial A for every adapter, AdamW with the same settings, the same batches:
50 steps with the NumPy reference (hand-written forward, backward and AdamW) and 50 with
PyTorch (lowrank.torch.add_lora, autograd, torch.optim.AdamW), all in float64.

Tolerance: relative 1e-9 on every step's loss and on the final adapters. The two sides compute
the same formulas in a different order (torch scales h = x A^T before multiplying by B^T, NumPy
after), so they differ by rounding, about 1e-16 relative per operation; 50 Adam steps amplify
that by far less than 1e7. A wrong gradient, scale, initialisation or optimizer step would show
at 1e-3 or more from the first steps.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank.numpy.model import MLP, add_lora, train_step
from lowrank.numpy.optim import AdamW
from lowrank.torch.lora import add_lora as torch_add_lora

SIZES = [10, 32, 32, 4]
STEPS = 50
SETTINGS = dict(lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


class TorchMLP(nn.Module):
    """The same network in torch; `layers` keeps the NumPy model's parameter names."""

    def __init__(self, reference: MLP) -> None:
        super().__init__()
        layers = []
        for layer in reference.layers:
            if hasattr(layer, "weight"):
                linear = nn.Linear(layer.in_features, layer.out_features, dtype=torch.float64)
                with torch.no_grad():
                    linear.weight.copy_(torch.from_numpy(layer.weight))
                    linear.bias.copy_(torch.from_numpy(layer.bias))
                layers.append(linear)
            else:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_numpy_and_torch_train_identically(use_rslora):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, SIZES[0]))
    y = (X[:, :4].sum(axis=1) > 0).astype(np.int64) + 2 * (X[:, 4] > 0)  # 4 classes
    reference = MLP(SIZES, rng=rng)
    model = TorchMLP(reference)  # the same "pretrained" weights, before LoRA

    add_lora(reference, r=4, alpha=8, use_rslora=use_rslora, rng=rng)  # every Linear
    torch_add_lora(model, ["layers.0", "layers.2", "layers.4"], r=4, alpha=8, use_rslora=use_rslora)
    with torch.no_grad():  # the same random A (and zero B) on both sides
        for index in (0, 2, 4):
            model.layers[index].A["default"].copy_(torch.from_numpy(reference.layers[index].A))
            model.layers[index].B["default"].copy_(torch.from_numpy(reference.layers[index].B))

    numpy_optimizer = AdamW(reference.parameters(), **SETTINGS)
    torch_optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], **SETTINGS
    )
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        a.size for a in reference.parameters().values()
    )

    batches = [rng.choice(len(X), size=32, replace=False) for _ in range(STEPS)]
    for step, batch in enumerate(batches):
        numpy_loss = train_step(reference, X[batch], y[batch], numpy_optimizer)
        torch_loss = F.cross_entropy(model(torch.from_numpy(X[batch])), torch.from_numpy(y[batch]))
        torch_optimizer.zero_grad()
        torch_loss.backward()
        torch_optimizer.step()
        assert torch_loss.item() == pytest.approx(numpy_loss, rel=1e-9), f"step {step}"

    assert numpy_loss < 0.8 * np.log(4)  # it learned something, so the comparison means something
    for index in (0, 2, 4):
        for name in ("A", "B"):
            ours = getattr(reference.layers[index], name)
            theirs = getattr(model.layers[index], name)["default"].detach().numpy()
            np.testing.assert_allclose(theirs, ours, rtol=1e-9, atol=1e-9 * np.abs(ours).max())

"""The headline check: lowrank.numpy and lowrank.torch train the same LoRA model identically.

`lowrank.torch.agreement.numpy_torch_agreement` runs it: one tiny MLP (lowrank.numpy's MLP,
rebuilt as an nn.Sequential with the same weights), one data set, one initial A for every
adapter, AdamW with the same settings, the same batches: 50 steps with the NumPy reference
(hand-written forward, backward and AdamW) and 50 with PyTorch (lowrank.torch.add_lora,
autograd, torch.optim.AdamW), all in float64. This test holds it to its tolerances.

Tolerance: relative 1e-9 on every step's loss and on the final adapters. The two sides compute
the same formulas in a different order (torch scales h = x A^T before multiplying by B^T, NumPy
after), so they differ by rounding, about 1e-16 relative per operation; 50 Adam steps amplify
that by far less than 1e7. A wrong gradient, scale, initialisation or optimizer step would show
at 1e-3 or more from the first steps.
"""

import numpy as np
import pytest

from lowrank.torch.agreement import numpy_torch_agreement

STEPS = 50


@pytest.mark.parametrize("use_rslora", [False, True])
def test_numpy_and_torch_train_identically(use_rslora):
    result = numpy_torch_agreement(steps=STEPS, seed=0, use_rslora=use_rslora)
    assert result["trainable"]["torch"] == result["trainable"]["numpy"]

    numpy_losses, torch_losses = result["numpy_losses"], result["torch_losses"]
    assert len(numpy_losses) == len(torch_losses) == STEPS
    for step, (numpy_loss, torch_loss) in enumerate(zip(numpy_losses, torch_losses, strict=True)):
        assert torch_loss == pytest.approx(numpy_loss, rel=1e-9), f"step {step}"

    # it learned something (4 classes), so the comparison means something
    assert numpy_losses[-1] < 0.8 * np.log(4)
    adapters = result["adapters"]
    assert sorted(adapters) == [f"layers.{i}.{name}" for i in (0, 2, 4) for name in ("A", "B")]
    for name, both in adapters.items():
        ours, theirs = np.asarray(both["numpy"]), np.asarray(both["torch"])
        np.testing.assert_allclose(
            theirs, ours, rtol=1e-9, atol=1e-9 * np.abs(ours).max(), err_msg=name
        )

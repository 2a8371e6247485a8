"""lowrank.torch.agreement: the torch mirror of the NumPy MLP, and what the harness reports.

(The tolerances of the agreement itself are tests/equivalence/test_end_to_end.py.) Oracles: the
NumPy MLP's own forward pass; the JSON round trip; counts from the shapes, worked out here.
"""

import json

import numpy as np
import torch

from lowrank.numpy import MLP
from lowrank.torch.agreement import TorchMLP, numpy_torch_agreement


def test_torch_mlp_computes_the_numpy_mlp():
    reference = MLP([5, 7, 3], rng=np.random.default_rng(1))
    model = TorchMLP(reference)
    assert [name for name, _ in model.named_parameters()] == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.2.weight",
        "layers.2.bias",
    ]
    x = np.random.default_rng(2).normal(size=(4, 5))
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, reference.forward(x), rtol=1e-12, atol=1e-12)


def test_report_is_json_and_counts_add_up():
    result = numpy_torch_agreement(steps=3, seed=1)
    assert json.loads(json.dumps(result)) == result  # it goes into the demo's report.json
    assert result["steps"] == 3 and len(result["torch_losses"]) == 3
    # r * (in + out) per adapted layer, for sizes 10-32-32-4 at r = 4
    assert result["trainable"]["numpy"] == 4 * ((10 + 32) + (32 + 32) + (32 + 4))
    assert 0 <= result["max_relative_loss_diff"] < 1e-9
    assert 0 <= result["max_relative_adapter_diff"] < 1e-9


def test_rslora_changes_the_training():
    # alpha / sqrt(r) = 4 instead of alpha / r = 2: after the first step (B = 0 until then) the
    # two runs must differ, on both sides, or use_rslora did not reach them.
    plain = numpy_torch_agreement(steps=3)
    rslora = numpy_torch_agreement(steps=3, use_rslora=True)
    assert plain["numpy_losses"][0] == rslora["numpy_losses"][0]
    for side in ("numpy_losses", "torch_losses"):
        assert plain[side][2] != rslora[side][2]

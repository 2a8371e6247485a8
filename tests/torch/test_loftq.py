"""Tests for lowrank.torch.loftq: LoftQ against the NumPy mirror, on real MiniLM weights, and
the QLoRA model `loftq_init` makes.

Oracles: `lowrank.numpy.loftq` on the same weights (NumPy's quantizer and LAPACK: the codes are
bit-identical between halves, so Q must be identical; the SVD is unique up to the signs of its
singular vector pairs, so the products s B A are compared, to 1e-10 relative: float64 SVDs of
the same matrix), NumPy's dense SVD of W - deq(Q) (Eckart-Young), plain NF4's error, and for
`loftq_init` the dense W' = deq(Q) + s B A built by hand from `loftq` and applied with
F.linear (1e-5: float32 matmuls of two routes). The "does not rise with T" check on MiniLM is
measured on these layers (re-quantizing can move block scales; not a theorem).
"""

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowrank.numpy.loftq import loftq as numpy_loftq
from lowrank.torch.hf import minilm_path
from lowrank.torch.loftq import loftq, loftq_init
from lowrank.torch.qlora import Linear4bit
from lowrank.torch.quant import dequantize_4bit, quantize_4bit

WEIGHT = np.random.default_rng(0).normal(size=(40, 72)) * 0.05  # (out, in)


def product(A, B, scale):
    return scale * np.asarray(B) @ np.asarray(A)  # (out, r) @ (r, in) -> (out, in)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("num_iters", [1, 3])
@pytest.mark.parametrize("double_quant", [True, False])
def test_matches_the_numpy_mirror(dtype, num_iters, double_quant):
    W = WEIGHT.astype(dtype)
    options = dict(scale=2.0, num_iters=num_iters, double_quant=double_quant)
    q, A, B = loftq(torch.from_numpy(W), 5, **options)
    q_ref, A_ref, B_ref = numpy_loftq(W, 5, **options)
    np.testing.assert_array_equal(q.packed.numpy(), q_ref.packed)
    np.testing.assert_array_equal(q.absmax.numpy(), q_ref.absmax)
    assert q.dtype == (torch.float32 if dtype == np.float32 else torch.float64)
    np.testing.assert_allclose(
        product(A, B, 2.0), product(A_ref, B_ref, 2.0), rtol=1e-10, atol=1e-12
    )


def minilm_weights(names=("0.attention.self.query", "3.intermediate.dense", "5.output.dense")):
    tensors = load_file(minilm_path() / "model.safetensors")
    prefix = next(k for k in tensors if k.endswith("layer.0.attention.self.query.weight"))
    prefix = prefix[: -len("0.attention.self.query.weight")]
    return [torch.from_numpy(tensors[f"{prefix}{name}.weight"]) for name in names]


def test_on_real_minilm_weights_the_error_drops_and_is_eckart_young():
    for W in minilm_weights():
        nf4 = torch.linalg.norm(W.double() - dequantize_4bit(quantize_4bit(W)).double())
        errors = [float(nf4)]
        for num_iters in (1, 2, 3):
            q, A, B = loftq(W, 8, scale=1.0, num_iters=num_iters)
            residual = W.double() - dequantize_4bit(q).double()  # (out, in)
            error = torch.linalg.norm(residual - B @ A)
            S = np.linalg.svd(residual.numpy(), compute_uv=False)  # dense NumPy oracle
            np.testing.assert_allclose(float(error), np.sqrt(np.sum(S[8:] ** 2)), rtol=1e-10)
            errors.append(float(error))
        assert errors[1] < errors[0]
        assert all(b <= a for a, b in zip(errors, errors[1:], strict=False)), errors


def test_full_rank_fits_the_error_exactly():
    W = torch.from_numpy(WEIGHT)
    q, A, B = loftq(W, 40, scale=0.5)
    assert torch.linalg.norm(W - dequantize_4bit(q) - 0.5 * B @ A) < 1e-12 * torch.linalg.norm(W)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.conv = Conv1D(16, 32)  # GPT-2's layer: weight (in, out) = (32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.conv(torch.relu(self.fc(x))))


def test_loftq_init_gives_the_dense_start_built_by_hand():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(5, 64)
    weights = {"fc": net.fc.weight.detach().clone(), "conv": net.conv.weight.detach().T.clone()}
    biases = {"fc": net.fc.bias.detach().clone(), "conv": net.conv.bias.detach().clone()}
    dense, parts = {}, {}
    for name, W in weights.items():
        q, A, B = loftq(W, 4, scale=12 / 4, num_iters=2)
        parts[name] = (dequantize_4bit(q), 3.0 * B @ A)  # deq(Q), s B A (out, in)
        dense[name] = (dequantize_4bit(q).double() + 3.0 * B @ A).float()  # W' (out, in)
    expected = F.linear(
        torch.relu(F.linear(x, dense["fc"], biases["fc"])), dense["conv"], biases["conv"]
    )
    expected = net.head(expected)
    loftq_init(net, ["fc", "conv"], r=4, alpha=12, num_iters=2)
    assert isinstance(net.fc.base_layer, Linear4bit) and isinstance(net.conv.base_layer, Linear4bit)
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
    for name in ("fc", "conv"):  # each part on its own: the codes exactly, s B A in float32
        layer = net.get_submodule(name)
        torch.testing.assert_close(layer.base_weight(), parts[name][0], rtol=0, atol=0)
        correction = parts[name][1].float()
        torch.testing.assert_close(layer.delta_weight(), correction, rtol=1e-5, atol=1e-7)
    start = net.fc.base_weight().double() + net.fc.delta_weight().double()
    nf4 = dequantize_4bit(quantize_4bit(weights["fc"])).double()
    assert torch.linalg.norm(weights["fc"] - start) < torch.linalg.norm(weights["fc"] - nf4)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable >= {"fc.A.default", "fc.B.default"} and "fc.base_layer.bias" not in trainable


@pytest.mark.parametrize(
    ("targets", "options", "error", "match"),
    [
        (["fc"], {"r": 0, "alpha": 8}, ValueError, "r must be"),
        (["fc"], {"r": 33, "alpha": 8}, ValueError, "layer 'fc': r must be"),
        (["fc"], {"r": 4, "alpha": 0}, ValueError, "alpha"),
        (["fc"], {"r": 4, "alpha": 8, "num_iters": 0}, ValueError, "num_iters"),
        (["fc"], {"r": 4, "alpha": 8, "num_iters": 1.5}, TypeError, "num_iters"),
        (["fc"], {"r": 4, "alpha": 8, "quant_type": "q4"}, ValueError, "quant_type"),
        (["nope"], {"r": 4, "alpha": 8}, ValueError, "matches no"),
    ],
)
def test_loftq_init_refuses_bad_arguments_and_changes_nothing(targets, options, error, match):
    net = Net()
    with pytest.raises(error, match=match):
        loftq_init(net, targets, **options)
    assert type(net.fc) is nn.Linear


def test_loftq_init_refuses_a_non_finite_or_quantized_layer():
    net = Net()
    with torch.no_grad():
        net.fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 'fc' weight contains NaN"):
        loftq_init(net, ["fc", "conv"], r=2, alpha=2)
    assert type(net.conv) is Conv1D  # all or nothing
    quantized = nn.Sequential(OrderedDict(fc=Linear4bit.from_linear(nn.Linear(8, 4))))
    with pytest.raises(ValueError, match="full-precision"):
        loftq_init(quantized, ["fc"], r=2, alpha=2)

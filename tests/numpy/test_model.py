"""Tests for lowrank.numpy.model: the MLP, add_lora (incl. QLoRA), lora_layers, merging.

Oracles: finite differences (float64), torch autograd on the same network with copied weights,
the cross-entropy formula, brute-force loops.
"""

import numpy as np
import pytest

from lowrank._validate import RankWarning
from lowrank.numpy import (
    MLP,
    AdamW,
    Linear,
    LoRALinear,
    QLoRALinear,
    ReLU,
    add_lora,
    dequantize_4bit,
    lora_layers,
    merge_lora,
    numerical_gradient,
    quantize_4bit,
    relative_error,
    softmax_cross_entropy,
    train,
    unmerge_lora,
)

GRAD_TOL = 1e-7  # finite differences in float64 (see gradcheck.py)
SAME_MATH_TOL = 1e-12  # two float64 evaluations of the same formula

SIZES = [6, 8, 7, 4]


def batch(seed: int = 0, n: int = 10):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, SIZES[0])), rng.integers(0, SIZES[-1], size=n)


def lora_model(seed: int = 0, **kwargs) -> MLP:
    """An MLP with adapters whose B is random, so every adapter gradient is non-trivial."""
    rng = np.random.default_rng(seed)
    model = add_lora(MLP(SIZES, rng=rng), r=2, alpha=4, rng=rng, **kwargs)
    for _, layer in lora_layers(model):
        layer.B[...] = rng.normal(size=layer.B.shape)
    return model


def check_gradients(model: MLP, X, y) -> None:
    loss, dlogits = softmax_cross_entropy(model.forward(X), y)
    model.backward(dlogits)
    grads = model.gradients()

    def f(_):
        return softmax_cross_entropy(model.forward(X), y)[0]

    assert grads.keys() == model.parameters().keys()
    for name, param in model.parameters().items():
        assert relative_error(grads[name], numerical_gradient(f, param)) < GRAD_TOL, name


def test_layout_and_parameter_names() -> None:
    model = MLP(SIZES)
    assert [type(layer) for layer in model.layers] == [Linear, ReLU, Linear, ReLU, Linear]
    assert list(model.parameters()) == [
        f"layers.{i}.{name}" for i in (0, 2, 4) for name in ("weight", "bias")
    ]
    expected_total = sum(a * b + b for a, b in zip(SIZES[:-1], SIZES[1:], strict=True))
    assert model.num_parameters() == model.num_trainable() == expected_total


def test_full_model_backward_matches_finite_differences() -> None:
    check_gradients(MLP(SIZES, rng=np.random.default_rng(1)), *batch())


@pytest.mark.parametrize(
    "kwargs", [{}, {"use_rslora": True}, {"targets": [2]}], ids=["all", "rslora", "middle"]
)
def test_lora_model_backward_matches_finite_differences(kwargs) -> None:
    check_gradients(lora_model(**kwargs), *batch(1))


def test_lora_model_with_dropout_matches_finite_differences_with_fixed_masks() -> None:
    model = lora_model(dropout=0.3)
    X, y = batch(2)

    def forward():
        for i, (_, layer) in enumerate(lora_layers(model)):
            layer.rng = np.random.default_rng(100 + i)  # the same masks on every call
        return model.forward(X, training=True)

    loss, dlogits = softmax_cross_entropy(forward(), y)
    model.backward(dlogits)
    grads = model.gradients()
    for name, param in model.parameters().items():
        numeric = numerical_gradient(lambda _: softmax_cross_entropy(forward(), y)[0], param)
        assert relative_error(grads[name], numeric) < GRAD_TOL, name


def test_forward_and_gradients_match_torch_with_copied_weights() -> None:
    torch = pytest.importorskip("torch")
    model = MLP(SIZES, rng=np.random.default_rng(3))
    X, y = batch(3)

    class TorchMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 7), torch.nn.ReLU(),
                torch.nn.Linear(7, 4),
            )  # fmt: skip

        def forward(self, x):
            return self.layers(x)

    reference = TorchMLP().double()
    # Same names on both sides: "layers.0.weight", ... (nn.Sequential indices count the ReLUs).
    reference.load_state_dict({n: torch.tensor(p) for n, p in model.parameters().items()})
    logits_t = reference(torch.tensor(X))
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.tensor(y))
    loss_t.backward()

    logits = model.forward(X)
    loss, dlogits = softmax_cross_entropy(logits, y)
    model.backward(dlogits)
    assert relative_error(logits, logits_t.detach().numpy()) < SAME_MATH_TOL
    assert loss == pytest.approx(loss_t.item(), rel=SAME_MATH_TOL)
    grads = model.gradients()
    for name, p in reference.named_parameters():
        assert relative_error(grads[name], p.grad.numpy()) < SAME_MATH_TOL, name


def test_add_lora_freezes_the_base_and_keeps_the_output() -> None:
    model = MLP(SIZES, rng=np.random.default_rng(5))
    X, y = batch(5)
    before = model.forward(X)
    base = {n: p.copy() for n, p in model.parameters().items()}
    add_lora(model, r=2, alpha=4)
    assert np.array_equal(model.forward(X), before)  # B = 0: exactly the same output
    assert list(model.parameters()) == [f"layers.{i}.{ab}" for i in (0, 2, 4) for ab in "AB"]
    # r * (in + out) per layer, from the paper; the frozen numbers still count in the total.
    expected = sum(2 * (a + b) for a, b in zip(SIZES[:-1], SIZES[1:], strict=True))
    assert model.num_trainable() == expected
    assert model.num_parameters() == sum(p.size for p in base.values()) + expected

    train(model, X, y, AdamW(model.parameters(), lr=0.1), epochs=5, batch_size=4,
          rng=np.random.default_rng(0))  # fmt: skip
    for i in (0, 2, 4):
        assert np.array_equal(model.layers[i].weight, base[f"layers.{i}.weight"])
        assert np.array_equal(model.layers[i].bias, base[f"layers.{i}.bias"])
    assert not np.array_equal(model.forward(X), before)  # but the adapters learned something


def test_add_lora_on_some_layers_freezes_the_others_too() -> None:
    model = add_lora(MLP(SIZES), targets=[4], r=2)
    assert isinstance(model.layers[4], LoRALinear)
    assert isinstance(model.layers[0], Linear) and not model.layers[0].requires_grad
    assert list(model.parameters()) == ["layers.4.A", "layers.4.B"]


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ([1], "candidates: \\[0, 2, 4\\]"),
        ([7], "candidates"),
        ([0, 0], "repeat"),
        ([], "no layers"),
    ],
)
def test_add_lora_rejects_bad_targets(targets, message) -> None:
    with pytest.raises(ValueError, match=message):
        add_lora(MLP(SIZES), targets=targets)


def test_add_lora_rejects_a_rank_too_large_for_a_layer() -> None:
    with pytest.warns(RankWarning, match="r=5 exceeds"):
        model = add_lora(MLP(SIZES), r=5)  # the last layer is 4 x 7: allowed, as in PEFT
    assert model.layers[4].A.shape == (5, 7)


def test_merge_lora_and_unmerge_lora_keep_the_output() -> None:
    model = lora_model(7)
    X, _ = batch(7)
    before = model.forward(X, training=False)
    merge_lora(model)
    assert all(layer.merged for _, layer in lora_layers(model))
    assert relative_error(model.forward(X, training=False), before) < SAME_MATH_TOL
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)
    unmerge_lora(model)
    assert relative_error(model.forward(X, training=False), before) < SAME_MATH_TOL


def test_mlp_rejects_too_few_sizes() -> None:
    with pytest.raises(ValueError, match="at least"):
        MLP([4])


def test_lora_layers_are_named_like_torch_modules() -> None:
    model = add_lora(MLP(SIZES), targets=[0, 4], r=2)
    assert [(name, type(layer)) for name, layer in lora_layers(model)] == [
        ("layers.0", LoRALinear),
        ("layers.4", LoRALinear),
    ]
    assert all(model.layers[int(name.split(".")[1])] is layer for name, layer in lora_layers(model))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"alpha": 0}, ValueError), ({"r": 0}, ValueError), ({"dropout": 1.0}, ValueError),
     ({"quant_type": "nf8"}, ValueError), ({"init": "zeros"}, ValueError)],
)  # fmt: skip
def test_add_lora_changes_nothing_when_an_argument_is_bad(kwargs, error) -> None:
    model = MLP(SIZES, rng=np.random.default_rng(3))
    before = [(type(layer), getattr(layer, "requires_grad", None)) for layer in model.layers]
    weights = {n: p.copy() for n, p in model.parameters().items()}
    with pytest.raises(error):
        add_lora(model, r=kwargs.pop("r", 2), **kwargs)
    assert [
        (type(layer), getattr(layer, "requires_grad", None)) for layer in model.layers
    ] == before
    assert all(np.array_equal(p, weights[n]) for n, p in model.parameters().items())


def test_add_lora_with_quant_type_stores_each_base_in_4_bits() -> None:
    model = MLP(SIZES, rng=np.random.default_rng(6))
    weights = [model.layers[i].weight.copy() for i in (0, 2, 4)]
    add_lora(model, r=2, quant_type="nf4")
    X, _ = batch(6)
    for i, W in zip((0, 2, 4), weights, strict=True):
        layer = model.layers[i]
        assert isinstance(layer, QLoRALinear) and not hasattr(layer.base_layer, "weight")
        # oracle: the 4-bit round trip of the original weight, done by hand here
        expected = dequantize_4bit(quantize_4bit(W, blocksize=64, double_quant=True))
        np.testing.assert_array_equal(layer.base_weight(), expected)
    assert list(model.parameters()) == [f"layers.{i}.{ab}" for i in (0, 2, 4) for ab in "AB"]
    check_gradients(model, *batch(2))
    # a 4-bit weight still counts as out * in numbers
    assert model.num_parameters() == MLP(SIZES).num_parameters() + model.num_trainable()
    assert model.forward(X).shape == (len(X), SIZES[-1])

"""Tests for lowrank.torch.adapters: several adapters on one model, switching, disabling,
deleting, combining.

Oracles: the untouched base model, weighted sums of B A written out by hand in float64, and
torch.linalg.svd of the dense sum (Eckart-Young).
"""

import math
import warnings

import pytest
import torch
from torch import nn
from toy_models import IDS, assert_same_state, make_model, randomize, state, two_adapters

from lowrank.torch import (
    LoRALayer,
    add_lora,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    lora_layers,
    merge_lora,
    set_active_adapter,
)


def test_list_switch_disable_delete():
    base = make_model()
    plain = base(IDS)
    model = two_adapters()
    assert list_adapters(model) == ["default", "b"]
    with_default = model(IDS)
    set_active_adapter(model, "b")
    with_b = model(IDS)
    assert not torch.allclose(with_default, with_b)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{i}.{f}.b" for i in (1, 3, 4) for f in "AB"
    }
    with disable_adapters(model):
        torch.testing.assert_close(model(IDS), plain, rtol=0, atol=0)
    torch.testing.assert_close(model(IDS), with_b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        set_active_adapter(model, "c")
    delete_adapter(model, "b")
    assert list_adapters(model) == ["default"] and type(model[4]) is nn.Linear  # unwrapped
    set_active_adapter(model, "default")
    torch.testing.assert_close(model(IDS), with_default, rtol=0, atol=0)
    delete_adapter(model, "default")
    assert [type(m) for m in model] == [type(m) for m in base]  # back to the plain model
    torch.testing.assert_close(model(IDS), plain, rtol=0, atol=0)


def test_disable_restores_after_an_exception_and_refuses_a_merged_model():
    model = two_adapters()
    expected = model(IDS)
    with pytest.raises(KeyError), disable_adapters(model):
        raise KeyError("boom")
    torch.testing.assert_close(model(IDS), expected, rtol=0, atol=0)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="merged"), disable_adapters(model):
        pass
    with pytest.raises(RuntimeError, match="merged"):
        set_active_adapter(model, "b")


def weighted_update(layer, names, weights) -> torch.Tensor:
    """sum_i w_i s_i B_i A_i, written out with the scales recomputed from r and alpha."""
    total = 0
    for name, w in zip(names, weights, strict=True):
        if name in layer.A:
            r, alpha = layer.r[name], layer.alpha[name]
            scale = alpha / (math.sqrt(r) if layer.use_rslora[name] else r)
            total = total + w * scale * layer.B[name] @ layer.A[name]
    return total


def new_update(layer, name) -> torch.Tensor:
    assert layer.scale[name] == 1.0
    return layer.B[name] @ layer.A[name]


def test_combine_cat_is_the_exact_weighted_sum():
    model = two_adapters()
    combine_adapters(model, ["default", "b"], [0.7, -1.3], "mix", combination="cat")
    for _, layer in lora_layers(model):
        expected = weighted_update(layer, ["default", "b"], [0.7, -1.3])
        torch.testing.assert_close(new_update(layer, "mix"), expected, rtol=1e-12, atol=1e-12)
    assert model[1].r["mix"] == 5 and model[0].r["mix"] == 2 and model[4].r["mix"] == 3
    assert list_adapters(model) == ["default", "mix", "b"]  # in order of first appearance
    assert model[1].active_adapter == "default"


@pytest.mark.parametrize("r", [1, 3, 6])
def test_combine_svd_is_the_truncated_svd_of_the_weighted_sum(r):
    model = two_adapters()
    combine_adapters(model, ["default", "b"], [0.5, 2.0], "svd", combination="svd", r=r)
    layer = model[3]  # (out 6, in 12), ranks 2 + 3: the sum has rank 5
    dense = weighted_update(layer, ["default", "b"], [0.5, 2.0])
    U, S, Vh = torch.linalg.svd(dense)
    best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]  # Eckart-Young: the closest rank-r matrix
    torch.testing.assert_close(new_update(layer, "svd"), best, rtol=1e-10, atol=1e-10)
    error = torch.linalg.matrix_norm(dense - new_update(layer, "svd"))
    torch.testing.assert_close(error, S[r:].square().sum().sqrt(), rtol=1e-9, atol=1e-9)
    assert layer.A["svd"].shape == (r, 12) and layer.B["svd"].shape == (6, r)
    assert model[4].r["svd"] == min(r, 4)  # layer 4 is (4, 6): no higher rank fits


def test_combine_linear_mixes_the_factors_not_the_updates():
    model = add_lora(make_model(), ["1"], r=2, alpha=4)
    add_lora(model, ["1"], r=2, alpha=2, adapter_name="b")
    randomize(model, "default", 1)
    randomize(model, "b", 2)
    combine_adapters(model, ["default", "b"], [0.3, 0.6], "lin", combination="linear")
    layer = model[1]
    s1, s2 = 2.0, 1.0
    c1, c2 = math.sqrt(0.3 * s1), math.sqrt(0.6 * s2)
    A1, B1, A2, B2 = layer.A["default"], layer.B["default"], layer.A["b"], layer.B["b"]
    cross = c1 * c2 * (B1 @ A2 + B2 @ A1)
    expected = weighted_update(layer, ["default", "b"], [0.3, 0.6]) + cross
    torch.testing.assert_close(new_update(layer, "lin"), expected, rtol=1e-12, atol=1e-12)
    assert cross.abs().max() > 0.1  # so it really is not the weighted sum
    with pytest.raises(ValueError, match="equal ranks"):
        combine_adapters(two_adapters(), ["default", "b"], [1.0, 1.0], "x", combination="linear")


def test_combine_errors_leave_the_model_unchanged():
    model = two_adapters()
    before = state(model)
    with pytest.raises(ValueError, match="combination"):
        combine_adapters(model, ["default"], [1.0], "x", combination="ties")
    with pytest.raises(ValueError, match="one weight per adapter"):
        combine_adapters(model, ["default", "b"], [1.0], "x")
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        combine_adapters(model, ["default"], [1.0], "b", combination="cat")
    with pytest.raises(ValueError, match="rank r"):
        combine_adapters(model, ["default"], [1.0], "x", combination="svd")
    with pytest.raises(ValueError, match="square roots"):
        combine_adapters(model, ["default"], [-1.0], "x", combination="linear")
    assert_same_state(before, state(model))


def test_disable_adapters_freezes_every_adapter_inside_and_restores_after():
    model = two_adapters()
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(trainable.values())
    with disable_adapters(model):
        assert not any(p.requires_grad for p in model.parameters())  # PEFT does the same
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
    with pytest.raises(KeyError), disable_adapters(model):
        raise KeyError("boom")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable


def test_combine_cat_may_exceed_min_in_out_and_stays_exact():
    """Layer "4" is 6 -> 4: ranks 3 + 3 = 6 > min(in, out) = 4, still the exact sum."""
    model = add_lora(make_model(), ["4"], r=3, alpha=3)
    add_lora(model, ["4"], r=3, alpha=5, adapter_name="b")
    randomize(model, "default", 1)
    randomize(model, "b", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "cat" is exact on purpose: no rank warning
        combine_adapters(model, ["default", "b"], [0.5, 2.0], "cat", combination="cat")
    layer = model[4]
    assert layer.A["cat"].shape == (6, 6)
    expected = 0.5 * (3 / 3) * layer.B["default"] @ layer.A["default"]
    expected = expected + 2.0 * (5 / 3) * layer.B["b"] @ layer.A["b"]
    torch.testing.assert_close(layer.delta_weight("cat"), expected, rtol=1e-12, atol=1e-12)


def test_a_combination_that_fails_half_way_is_taken_back(monkeypatch):
    model = two_adapters()
    before = state(model)
    assert len(list(lora_layers(model))) == 4
    original = LoRALayer.add_adapter
    calls = []

    def fail_on_the_third_layer(self, name, **kwargs):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return original(self, name, **kwargs)

    monkeypatch.setattr(LoRALayer, "add_adapter", fail_on_the_third_layer)
    with pytest.raises(RuntimeError, match="out of memory"):
        combine_adapters(model, ["default", "b"], [1.0, 1.0], "mix", combination="cat")
    monkeypatch.undo()
    assert "mix" not in list_adapters(model)
    assert_same_state(before, state(model))


@pytest.mark.parametrize(
    ("weights", "new_name", "message"),
    [([math.inf, 1.0], "mix", "finite"), ([math.nan, 1.0], "mix", "finite"),
     ([True, 1.0], "mix", "real numbers"), ([1.0, 1.0], "a.b", "adapter name")],
)  # fmt: skip
def test_combine_refuses_bad_weights_and_names_before_changing_anything(weights, new_name, message):
    model = two_adapters()
    before = state(model)
    with pytest.raises(ValueError, match=message):
        combine_adapters(model, ["default", "b"], weights, new_name, combination="cat")
    assert_same_state(before, state(model))


def test_adapters_added_to_a_model_in_eval_mode_are_in_eval_mode():
    model = make_model().eval()
    add_lora(model, ["1", "3"], r=2, dropout=0.5)
    add_lora(model, ["1", "3"], r=2, dropout=0.5, adapter_name="second")
    assert not any(module.training for module in model.modules())
    randomize(model, "default", 3)
    torch.testing.assert_close(model(IDS), model(IDS), rtol=0, atol=0)  # no dropout
    trained = add_lora(make_model().train(), ["1"], r=2, dropout=0.5)
    assert trained[1].training and trained[1].dropout["default"].training

"""Tests for lowrank.torch.conv: LoRAConv on nn.Conv1d and nn.Conv2d, and add_lora on convs.

Oracles: a copy of the base conv holding W + scale * B @ A (the paper's update, reshaped by
hand) run by torch itself, with every padding mode; torch's own kaiming_uniform_ on the
conv-shaped A; the model's weights and modules compared before and after a refused call.
(PEFT is the oracle for files and outputs in test_conv_peft.py; the NumPy mirror is checked
against this wrapper in tests/numpy/test_conv.py.)
"""

import copy
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from lowrank.torch import add_lora, count_parameters, merge_lora, merged_copy, unmerge_lora
from lowrank.torch.conv import LoRAConv, peft_factor_shapes
from lowrank.torch.model import candidate_names, wrapper_for

# float64 throughout: two evaluations of the same sums in a different order differ by
# ~1e-15 relative; 1e-12 leaves room for the size of the sums, and a wrong reshape is O(1).
TOL = 1e-12

CONVS = {
    "conv1d": lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1, dtype=torch.float64),
    "conv1d-dilated": lambda: nn.Conv1d(3, 5, 3, padding=2, dilation=2, dtype=torch.float64),
    "conv2d": lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1, dtype=torch.float64),
    "conv2d-dilated": lambda: nn.Conv2d(3, 5, (3, 2), dilation=(2, 1), dtype=torch.float64),
    "conv2d-same": lambda: nn.Conv2d(3, 5, 3, padding="same", dtype=torch.float64),
    "conv2d-reflect": lambda: nn.Conv2d(
        3, 5, 3, padding=1, padding_mode="reflect", dtype=torch.float64
    ),
    "conv2d-circular": lambda: nn.Conv2d(
        3, 5, 3, stride=2, padding=1, padding_mode="circular", dtype=torch.float64
    ),
    "conv2d-1x1": lambda: nn.Conv2d(3, 5, 1, bias=False, dtype=torch.float64),
}


def make_layer(kind: str, r: int = 2, seed: int = 0) -> LoRAConv:
    torch.manual_seed(seed)
    layer = LoRAConv(CONVS[kind]())
    layer.add_adapter("default", r=r, alpha=3.0)
    layer.active_adapter = "default"
    with torch.no_grad():
        layer.B["default"].normal_()  # as if trained: the update is not zero
    return layer


def sample_input(layer: LoRAConv, seed: int = 1) -> torch.Tensor:
    spatial = (9,) * len(layer.base_layer.kernel_size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, *spatial, generator=generator, dtype=torch.float64)


def merged_by_hand(layer: LoRAConv) -> nn.Module:
    """A copy of the base conv whose weight is W + scale * B @ A reshaped to the kernel."""
    reference = copy.deepcopy(layer.base_layer)
    scale = layer.alpha["default"] / layer.r["default"]
    delta = scale * layer.B["default"].detach() @ layer.A["default"].detach()  # (out, in*k)
    with torch.no_grad():
        reference.weight += delta.reshape(reference.weight.shape)
    return reference


@pytest.mark.parametrize("kind", CONVS)
def test_forward_is_the_conv_with_the_updated_weight(kind):
    layer = make_layer(kind)
    x = sample_input(layer)
    expected = merged_by_hand(layer)(x)
    torch.testing.assert_close(layer(x), expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("kind", CONVS)
def test_merge_equals_unmerged_and_unmerge_restores_the_weight(kind):
    layer = make_layer(kind)
    x = sample_input(layer)
    weight = layer.base_layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=TOL, atol=TOL)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-15)
    torch.testing.assert_close(layer(x), y, rtol=TOL, atol=TOL)


def test_shapes_features_and_the_peft_layout():
    layer = make_layer("conv2d", r=2)
    assert (layer.in_features, layer.out_features) == (3 * 3 * 3, 5)
    assert layer.A["default"].shape == (2, 27) and layer.B["default"].shape == (5, 2)
    assert layer.delta_weight().shape == (5, 27)
    assert int(torch.linalg.matrix_rank(layer.delta_weight())) == 2
    A, B = layer.conv_factors("default")
    assert (tuple(A.shape), tuple(B.shape)) == peft_factor_shapes(layer.base_layer, 2)
    assert tuple(A.shape) == (2, 3, 3, 3) and tuple(B.shape) == (5, 2, 1, 1)
    assert A.data_ptr() == layer.A["default"].data_ptr()  # a view, not a copy
    conv1d = LoRAConv(nn.Conv1d(4, 6, 5))
    assert (conv1d.in_features, conv1d.out_features) == (20, 6)
    assert peft_factor_shapes(conv1d.base_layer, 3) == ((3, 4, 5), (6, 3, 1))


def test_new_adapter_changes_nothing_and_a_starts_as_peft_conv_a():
    conv = CONVS["conv2d"]()
    layer = LoRAConv(conv)
    torch.manual_seed(7)
    layer.add_adapter("default", r=4, alpha=8)
    layer.active_adapter = "default"
    x = sample_input(layer)
    assert torch.equal(layer(x), conv(x))  # B = 0
    # PEFT initialises its conv lora_A [r, in, k, k] with kaiming_uniform_(a=sqrt(5)); the
    # flattened A has the same fan-in, so the same seed draws the same numbers
    torch.manual_seed(7)
    conv_A = torch.empty(4, 3, 3, 3, dtype=torch.float64)
    nn.init.kaiming_uniform_(conv_A, a=math.sqrt(5))
    assert torch.equal(layer.A["default"], conv_A.flatten(1))


def test_unbatched_input_and_gradients_reach_only_the_adapter():
    layer = make_layer("conv2d")
    x = sample_input(layer)
    torch.testing.assert_close(layer(x[0]), layer(x)[0], rtol=TOL, atol=TOL)
    layer.base_layer.requires_grad_(False)
    layer(x).square().sum().backward()
    assert layer.A["default"].grad is not None and layer.B["default"].grad is not None
    assert layer.base_layer.weight.grad is None


def test_grouped_conv_is_refused_by_name():
    with pytest.raises(ValueError, match="groups=3"):
        LoRAConv(nn.Conv2d(3, 6, 3, groups=3))
    with pytest.raises(TypeError, match="Conv1d or nn.Conv2d"):
        LoRAConv(nn.Conv3d(3, 6, 3))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 6, 3, stride=2, padding=1),
            act=nn.ReLU(),
            conv2=nn.Conv2d(6, 4, 3, padding=1),
            pool=nn.Flatten(),
            fc=nn.Linear(4 * 4 * 4, 2),
        )
    ).double()


def snapshot(model: nn.Module) -> tuple:
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def test_add_lora_on_a_cnn_merge_and_unmerge():
    model = cnn()
    assert candidate_names(model) == ["conv1", "conv2", "fc"]
    assert wrapper_for(model.conv1) is LoRAConv
    add_lora(model, ["conv1", "conv2", "fc"], r=2, alpha=4)
    assert isinstance(model.conv1, LoRAConv) and isinstance(model.conv2, LoRAConv)
    # trainable: r * (in * k * k + out) per conv, r * (in + out) for the linear layer
    assert count_parameters(model)[0] == 2 * (27 + 6) + 2 * (54 + 4) + 2 * (64 + 2)
    for layer in (model.conv1, model.conv2, model.fc):
        with torch.no_grad():
            layer.B["default"].normal_()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = model(x)
    weights = {
        name: model.get_submodule(name).base_layer.weight.clone() for name in ("conv1", "fc")
    }
    plain = merged_copy(model)
    assert type(plain.conv1) is nn.Conv2d
    torch.testing.assert_close(plain(x), y, rtol=TOL, atol=TOL)
    merge_lora(model)
    torch.testing.assert_close(model(x), y, rtol=TOL, atol=TOL)
    unmerge_lora(model)
    for name, weight in weights.items():
        torch.testing.assert_close(
            model.get_submodule(name).base_layer.weight, weight, rtol=0, atol=1e-15
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"quant_type": "nf4"}, "quant_type"),
    ],
)
def test_dora_and_4bit_on_a_conv_are_refused_before_any_change(kwargs, message):
    model = cnn()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as error:
        add_lora(model, ["fc", "conv2"], r=2, **kwargs)
    assert "conv2" in str(error.value)
    after = snapshot(model)
    assert before[0] == after[0]
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_a_grouped_conv_in_a_model_is_refused_with_its_name_and_nothing_changes():
    model = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4), depthwise=nn.Conv2d(4, 4, 3, groups=4)))
    before = snapshot(model)
    with pytest.raises(ValueError, match="'depthwise'.*groups=4"):
        add_lora(model, ["fc", "depthwise"], r=2)
    assert snapshot(model)[0] == before[0]


def test_all_linear_targets_leaves_convolutions_out():
    from lowrank.torch.hf import all_linear_targets

    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 4, 3),
            conv1d=nn.Conv1d(4, 4, 3),
            proj=nn.Linear(4, 4),
            lm_head=nn.Linear(4, 10),
        )
    )
    assert all_linear_targets(model) == ["proj"]

"""LoRA on nn.Conv1d / nn.Conv2d and Hugging Face PEFT, both ways, and the adapter tools.

Oracle: PEFT itself. A small CNN (a Conv2d and a Conv1d with kernel 3, stride 2, padding 1,
and a Linear head) in float64: an adapter saved here loads in `PeftModel.from_pretrained` with
the same outputs, a PEFT conv adapter (B set to random values) loads here with the same
outputs, and the two write the same keys with the same shapes (PEFT's conv layout). PEFT's
lora_B is a 1x1 conv where lowrank multiplies over the channel dim: the same sums in another
order, so outputs agree to float64 rounding (~1e-16 relative); 1e-12 is allowed, and a wrong
reshape or scale is O(1). Then `lowrank inspect` and `lowrank resize` on a conv adapter, with
PEFT loading the resized folder.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank.cli import main
from lowrank.torch import add_lora, load_adapter, save_adapter
from lowrank.torch.adapter_report import inspect_adapter
from lowrank.torch.conv import LoRAConv
from lowrank.torch.resize import resize_adapter

peft = pytest.importorskip("peft")

TOL = 1e-12
TARGETS = ["image", "sequence", "head"]


class TinyCNN(nn.Module):
    """(batch, 3, 8, 8) -> Conv2d -> (batch, 6, 4, 4) -> as a sequence (batch, 6, 16) ->
    Conv1d -> (batch, 4, 8) -> Linear -> (batch, 4)."""

    def __init__(self, dilation: int = 1, padding_mode: str = "zeros") -> None:
        super().__init__()
        padding = dilation  # keeps the sizes above for a 3-tap kernel
        self.image = nn.Conv2d(
            3, 6, 3, stride=2, padding=padding, dilation=dilation, padding_mode=padding_mode
        )
        self.sequence = nn.Conv1d(6, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.image(x)).flatten(2)  # (batch, 6, 16)
        return self.head(torch.relu(self.sequence(h)).flatten(1))


def base_model(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN(**kwargs).double().eval()


def inputs() -> torch.Tensor:
    return torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def trained_ours(model: nn.Module, **kwargs) -> nn.Module:
    add_lora(model, TARGETS, r=3, alpha=5, rank_pattern={"sequence": 2}, **kwargs)
    torch.manual_seed(2)
    for name in TARGETS:
        with torch.no_grad():
            model.get_submodule(name).B["default"].normal_()  # as if trained
    return model


def trained_peft(model: nn.Module) -> nn.Module:
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=TARGETS, rank_pattern={"image": 2})
    theirs = peft.get_peft_model(model, config)
    torch.manual_seed(3)
    for module in theirs.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            with torch.no_grad():
                module.lora_B["default"].weight.normal_()
    return theirs.eval()


def test_our_conv_adapter_loads_in_peft_with_the_same_outputs(tmp_path):
    ours = trained_ours(base_model())
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base_model(), tmp_path).eval()
    x = inputs()
    torch.testing.assert_close(theirs(x), ours(x), rtol=TOL, atol=TOL)
    assert not torch.allclose(ours(x), base_model()(x))  # the adapter does change the output


def test_a_peft_conv_adapter_loads_here_with_the_same_outputs(tmp_path):
    theirs = trained_peft(base_model())
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(base_model(), tmp_path)
    assert isinstance(ours.image, LoRAConv) and ours.image.r == {"default": 2}
    x = inputs()
    torch.testing.assert_close(ours(x), theirs(x), rtol=TOL, atol=TOL)


def test_both_write_the_same_keys_with_peft_conv_shapes(tmp_path):
    trained_peft(base_model()).save_pretrained(tmp_path / "peft")
    save_adapter(trained_ours(base_model()), tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours)
    prefix = "base_model.model."
    # r differs between the two on purpose (rank_pattern), so compare all but dim r
    assert theirs[prefix + "image.lora_A.weight"].shape == (2, 3, 3, 3)  # (r, in, k, k)
    assert ours[prefix + "image.lora_A.weight"].shape == (3, 3, 3, 3)
    assert theirs[prefix + "image.lora_B.weight"].shape == (6, 2, 1, 1)  # (out, r, 1, 1)
    assert ours[prefix + "image.lora_B.weight"].shape == (6, 3, 1, 1)
    assert theirs[prefix + "sequence.lora_A.weight"].shape == (3, 6, 3)  # (r, in, k)
    assert ours[prefix + "sequence.lora_A.weight"].shape == (2, 6, 3)
    assert ours[prefix + "sequence.lora_B.weight"].shape == (4, 2, 1)  # (out, r, 1)
    assert ours[prefix + "head.lora_A.weight"].shape == (3, 32)


@pytest.mark.parametrize("kwargs", [{"dilation": 2}, {"padding_mode": "reflect"}])
def test_dilation_and_padding_mode_agree_with_peft_merged_model(tmp_path, kwargs):
    # PEFT's lora_A ignores dilation and padding_mode (see lowrank.torch.conv), so its
    # unmerged forward is not the oracle here; its merged model is: W + scale * B @ A
    ours = trained_ours(base_model(**kwargs))
    save_adapter(ours, tmp_path)
    merged = peft.PeftModel.from_pretrained(base_model(**kwargs), tmp_path).merge_and_unload()
    x = inputs()
    torch.testing.assert_close(ours(x), merged(x), rtol=TOL, atol=TOL)


def test_a_flattened_conv_factor_is_refused_and_nothing_changes(tmp_path):
    save_adapter(trained_ours(base_model()), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.image.lora_A.weight"
    tensors[key] = tensors[key].flatten(1)  # (r, 27): a Linear's layout, not PEFT's conv's
    save_file(tensors, weights)
    model = base_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"image: A \(3, 27\).*need A \(3, 3, 3, 3\)"):
        load_adapter(model, tmp_path)
    assert isinstance(model.image, nn.Conv2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inspect_reads_conv_factors_as_matrices(tmp_path, capsys):
    ours = trained_ours(base_model())
    save_adapter(ours, tmp_path)
    report = {layer.name: layer for layer in inspect_adapter(tmp_path).layers}
    assert report["image"].shape == (6, 27) and report["image"].r == 3
    expected = torch.linalg.svdvals(ours.image.delta_weight().detach())  # (out, in * k * k)
    torch.testing.assert_close(
        torch.tensor(report["image"].singular_values, dtype=torch.float64),
        expected[:3],
        rtol=1e-10,
        atol=1e-12,
    )
    assert main(["inspect", str(tmp_path)]) == 0
    assert "image" in capsys.readouterr().out


def test_resize_keeps_peft_conv_layout_and_peft_loads_it(tmp_path, capsys):
    ours = trained_ours(base_model())
    save_adapter(ours, tmp_path / "r3")
    report = resize_adapter(tmp_path / "r3", tmp_path / "same", rank=3)  # r' = r: same update
    assert all(row.error <= 1e-12 * row.norm for row in report.layers)
    theirs = peft.PeftModel.from_pretrained(base_model(), tmp_path / "same").eval()
    x = inputs()
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-10, atol=1e-10)
    report = resize_adapter(tmp_path / "r3", tmp_path / "r1", rank=1)
    for row in report.layers:  # Eckart-Young: the error is the dropped singular values
        assert abs(row.error - row.bound) <= 1e-10 * row.norm
    tensors = load_file(tmp_path / "r1" / "adapter_model.safetensors")
    assert tensors["base_model.model.image.lora_A.weight"].shape == (1, 3, 3, 3)
    assert tensors["base_model.model.image.lora_B.weight"].shape == (6, 1, 1, 1)
    assert json.loads((tmp_path / "r1" / "adapter_config.json").read_text())["r"] == 1
    peft.PeftModel.from_pretrained(base_model(), tmp_path / "r1")  # PEFT takes the layout
    assert main(["resize", str(tmp_path / "r3"), "--rank", "2", "--out", str(tmp_path / "r2")]) == 0
    capsys.readouterr()


def test_convert_refuses_conv_factors_in_one_line(tmp_path, capsys):
    save_adapter(trained_ours(base_model()), tmp_path / "adapter")
    assert main(["convert", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "image.lora_A.weight is (3, 3, 3, 3)" in error
    assert not (tmp_path / "out").exists()

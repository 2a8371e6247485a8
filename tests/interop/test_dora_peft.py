"""DoRA (Liu et al. 2024, arXiv:2402.09353) between lowrank and Hugging Face PEFT, both ways.

Tiny Llama and BERT built from configs with random weights, in float64. An adapter saved by
lowrank with `use_dora=True` must load in PEFT (`PeftModel.from_pretrained`) with the same
outputs, and one saved by PEFT with `LoraConfig(use_dora=True)` must load in lowrank with the
same outputs, merge to the same weights as `merge_and_unload`, and train the same parameters
with the same gradients (the norm detached in both, section 4.3). Tolerance: the two compute
the same float64 formula (PEFT builds B @ A as B(A(I))^T), so outputs agree to ~1e-15
relative; we allow 1e-10, far below the size of the adapter's effect (checked to be > 1e-2).
"""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from toy_models import TINY_VOCAB, tiny_bert, tiny_llama

from lowrank.torch import add_lora, count_parameters, load_adapter, merge_lora, save_adapter
from lowrank.torch.model import lora_layers

VOCAB = TINY_VOCAB
TOLERANCE = dict(rtol=1e-10, atol=1e-10)


CASES = {  # (model, targets, rank_pattern)
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], {"0.self_attn.v_proj": 2}),
    "bert": (tiny_bert, ["query", "value", "output.dense"], {}),
}
IDS = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def output(model) -> torch.Tensor:
    out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def base_model(kind):
    torch.manual_seed(0)
    return CASES[kind][0]().double().eval()


def randomize(parameters, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:  # magnitudes too: m = ||W||_c would hide a wrong m
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(noise * 0.3)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_lowrank_dora_adapter_loads_in_peft(kind, tmp_path):
    _, targets, rank_pattern = CASES[kind]
    base = base_model(kind)
    ours = add_lora(
        copy.deepcopy(base), targets, r=4, alpha=7, rank_pattern=rank_pattern, use_dora=True
    )
    randomize([p for p in ours.parameters() if p.requires_grad], seed=1)
    save_adapter(ours, tmp_path)
    name, layer = next(iter(lora_layers(ours)))
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved[f"base_model.model.{name}.lora_magnitude_vector"].shape == (layer.out_features,)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert theirs.peft_config["default"].use_dora
    torch.testing.assert_close(output(theirs), output(ours), **TOLERANCE)
    assert (output(base) - output(ours)).abs().max() > 1e-2  # the adapter does something


@pytest.mark.parametrize("kind", sorted(CASES))
def test_peft_dora_adapter_loads_in_lowrank(kind, tmp_path):
    _, targets, rank_pattern = CASES[kind]
    base = base_model(kind)
    config = LoraConfig(
        r=3, lora_alpha=5, target_modules=targets, rank_pattern=rank_pattern, use_dora=True
    )
    theirs = get_peft_model(copy.deepcopy(base), config)
    randomize([p for n, p in theirs.named_parameters() if "lora_" in n], seed=2)
    theirs.eval().save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert {type(layer).__name__ for _, layer in lora_layers(ours)} == {"DoRALinear"}
    torch.testing.assert_close(output(ours), output(theirs), **TOLERANCE)
    assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    # gradients: the same trainable tensors get the same gradients (norm detached in both)
    ours.train(), theirs.train()
    output(ours).square().sum().backward()
    output(theirs).square().sum().backward()
    theirs_grads = {
        n.removeprefix("base_model.model.")
        .replace(".default.weight", "")
        .replace(".lora_A", ".A")
        .replace(".lora_B", ".B")
        .replace(".lora_magnitude_vector", ".magnitude"): p.grad
        for n, p in theirs.named_parameters()
        if p.requires_grad
    }
    ours_grads = {
        n.removesuffix(".default"): p.grad for n, p in ours.named_parameters() if p.requires_grad
    }
    assert sorted(ours_grads) == sorted(theirs_grads)
    for key, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[key], **TOLERANCE, msg=key)
    # merging folds the same DoRA weight into the base as PEFT's merge_and_unload
    ours.eval(), theirs.eval()
    merged_theirs = theirs.merge_and_unload()
    merge_lora(ours)
    torch.testing.assert_close(output(ours), output(merged_theirs), **TOLERANCE)


def test_dropout_in_training_mode_matches_peft(tmp_path):
    """With dropout active PEFT uses dropout(x) W^T for the direction's base part; the same
    seed draws the same mask in both (one nn.Dropout on the layer's input, after the base)."""
    torch.manual_seed(4)
    base = torch.nn.Sequential(torch.nn.Linear(12, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5))
    base = base.double()
    config = LoraConfig(
        r=2, lora_alpha=3, lora_dropout=0.5, target_modules=["0", "2"], use_dora=True
    )
    theirs = get_peft_model(copy.deepcopy(base), config)
    randomize([p for n, p in theirs.named_parameters() if "lora_" in n], seed=5)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path).train()
    theirs.train()
    x = torch.randn(7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(7)
    y_theirs = theirs(x)
    torch.manual_seed(7)
    y_ours = ours(x)
    torch.testing.assert_close(y_ours, y_theirs, **TOLERANCE)
    ours.eval(), theirs.eval()
    assert (ours(x) - y_ours).abs().max() > 1e-3  # dropout did change the training output

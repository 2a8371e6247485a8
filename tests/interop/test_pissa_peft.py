"""PiSSA / OLoRA against PEFT's own: the same factors and residual base, and the rank-2r
conversion loaded by PEFT onto the ORIGINAL base with the same outputs.

Oracles: PEFT's `get_peft_model` with `init_lora_weights="pissa"` / `"olora"` on a copy of the
same tiny random model (Llama: nn.Linear; GPT-2: Conv1D, fan_in_fan_out), PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)` for the converted tensors, and
`PeftModel.from_pretrained` for loading. Tolerance: both do one float32 SVD / QR of the same
matrix with the same LAPACK call, then a few float32 ops arranged slightly differently (a
broadcast product where PEFT multiplies by diag), so factors agree to float32 rounding of
numbers of size ~1: 1e-5.
"""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lowrank.torch import add_lora, lora_layers, save_adapter
from lowrank.torch.pissa import olora_init, pissa_init, plain_lora_copy

VOCAB = 40
IDS = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
TOL = dict(rtol=1e-5, atol=1e-5)


def llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=16)
    return GPT2LMHeadModel(config).eval()


# kind -> (model, targets, fan_in_fan_out)
CASES = {"llama": (llama, ["q_proj", "v_proj"], False), "gpt2": (gpt2, ["c_attn"], True)}
INITS = {"pissa": pissa_init, "olora": olora_init}


def pair(kind: str, init: str, use_rslora: bool = False):
    """(base, ours, theirs): the same model re-initialised by lowrank and by PEFT."""
    make, targets, fan_in_fan_out = CASES[kind]
    base = make()
    ours = add_lora(copy.deepcopy(base), targets, r=2, alpha=6, use_rslora=use_rslora)
    initial = INITS[init](ours)
    config = LoraConfig(
        r=2,
        lora_alpha=6,
        target_modules=targets,
        init_lora_weights=init,
        use_rslora=use_rslora,
        fan_in_fan_out=fan_in_fan_out,
    )
    theirs = get_peft_model(copy.deepcopy(base), config)
    return base, ours, theirs, initial


def logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits


# PEFT 0.21's olora_init does the QR of the stored weight without fan_in_fan_out's transpose,
# so on GPT-2's Conv1D ([in, out]) its lora_A comes out [r, out]: wrong shape, no oracle there.
# lowrank factors W [out, in] as for every layer (its own round trip is tested in the mirror).
PAIRS = [("llama", "olora"), ("llama", "pissa"), ("gpt2", "pissa")]


@pytest.mark.parametrize(("kind", "init"), PAIRS)
def test_factors_and_residual_match_peft(kind, init):
    base, ours, theirs, _ = pair(kind, init)
    modules = dict(theirs.base_model.model.named_modules())
    assert len(list(lora_layers(ours))) > 0
    for name, layer in lora_layers(ours):
        peft_layer = modules[name]
        torch.testing.assert_close(layer.A["default"], peft_layer.lora_A["default"].weight, **TOL)
        torch.testing.assert_close(layer.B["default"], peft_layer.lora_B["default"].weight, **TOL)
        torch.testing.assert_close(
            layer.base_layer.weight, peft_layer.base_layer.weight, **TOL
        )  # the residual base, in the layer's own layout
        original = dict(base.named_modules())[name].weight
        assert not torch.allclose(layer.base_layer.weight, original, **TOL)  # W_res is not W
    torch.testing.assert_close(logits(ours), logits(base), **TOL)  # nothing changed yet
    torch.testing.assert_close(logits(theirs), logits(base), **TOL)


def train_a_little(model) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():  # the same order in both: layer by layer, A, B
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("init", sorted(INITS))
def test_converted_adapter_loads_in_peft_on_the_original_base(init, use_rslora, tmp_path):
    base, ours, _, initial = pair("llama", init, use_rslora)
    train_a_little(ours)
    plain = plain_lora_copy(ours, initial)
    save_adapter(plain, tmp_path / "converted")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "converted").eval()
    assert loaded.peft_config["default"].r == 4
    torch.testing.assert_close(logits(loaded), logits(ours), **TOL)
    assert not torch.allclose(logits(loaded), logits(base), **TOL)  # training did something


def test_conversion_matches_peft_save_pretrained(tmp_path):
    """The tensors PEFT's own conversion writes equal plain_lora_copy's."""
    _, ours, theirs, initial = pair("llama", "pissa")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    theirs.save_pretrained(tmp_path / "initial")
    for model in (ours, theirs):
        train_a_little(model)
    theirs.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial"
    )
    expected = load_file(tmp_path / "converted" / "adapter_model.safetensors")
    save_adapter(plain_lora_copy(ours, initial), tmp_path / "ours")
    got = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **TOL)

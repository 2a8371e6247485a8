"""`convert_adapter`: mlx-lm, loralib and alpha-scaled PEFT-layout adapters written as PEFT
adapters that PEFT itself loads with the source's outputs.

Oracle: `PeftModel.from_pretrained` on tiny random Llama, GPT-2 and BERT models built from a
config, in float64, against the base model with the source tool's formula added by hand
(forward hooks: mlx-lm scale * (x @ lora_a) @ lora_b, loralib (x @ A.T @ B.T) * alpha / r,
an alpha-scaled file (x @ A.T @ B.T) * alpha). Tolerance 1e-10 absolute on outputs of size
~1: the two sides multiply in different orders, float64 rounding is ~1e-15.
"""

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import BertConfig, GPT2Config, LlamaConfig

from lowrank.torch.adapter_files import base_model
from lowrank.torch.convert import convert_adapter

SIZES = dict(vocab_size=40, max_position_embeddings=16)
CONFIGS = {
    "llama": LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2,
                         architectures=["LlamaForCausalLM"], **SIZES),
    "gpt2": GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=16,
                       architectures=["GPT2LMHeadModel"]),
    "bert": BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, architectures=["BertModel"], **SIZES),
}  # fmt: skip
LAYERS = {
    "llama": [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")],
    "gpt2": ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"],
    "bert": [f"encoder.layer.{i}.attention.self.query" for i in (0, 1)],
}


def by_hand(model, updates):
    """The base model with each layer's update (a function of its input) added by a hook."""
    model = copy.deepcopy(model)
    for name, update in updates.items():
        model.get_submodule(name).register_forward_hook(lambda m, a, out, f=update: out + f(a[0]))
    return model


def mlx_formula(lora_a, lora_b, scale):
    return lambda x: scale * (x @ lora_a) @ lora_b  # mlx-lm's LoRALinear: (in, r), (r, out)


def loralib_formula(A, B, scaling):
    return lambda x: (x @ A.T @ B.T) * scaling  # loralib's Linear.forward: (r, in), (out, r)


def in_out(model, name):
    module = model.get_submodule(name)
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores (in, out)
    return module.in_features, module.out_features


def outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids)[0]


@pytest.fixture
def ids():
    return torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_mlx_adapter_loads_in_peft_with_mlx_outputs(tmp_path, kind, ids):
    CONFIGS[kind].save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    model = base_model(tmp_path / "base", meta=False)
    g = torch.Generator().manual_seed(2)
    tensors, updates = {}, {}
    for name in LAYERS[kind]:
        size_in, size_out = in_out(model, name)
        lora_a = torch.randn(size_in, 4, generator=g) * 0.1  # (in, r)
        lora_b = torch.randn(4, size_out, generator=g) * 0.1  # (r, out)
        tensors |= {f"{name}.lora_a": lora_a, f"{name}.lora_b": lora_b}
        updates[name] = mlx_formula(lora_a.double(), lora_b.double(), 20.0)
    (tmp_path / "mlx").mkdir()
    save_file(tensors, tmp_path / "mlx" / "adapters.safetensors")
    params = {"rank": 4, "scale": 20.0, "dropout": 0.0}
    raw = {"lora_parameters": params, "num_layers": 2}
    (tmp_path / "mlx" / "adapter_config.json").write_text(json.dumps(raw))
    result = convert_adapter(tmp_path / "mlx", tmp_path / "peft", base=tmp_path / "base")
    assert result.model_difference is not None and result.model_difference <= result.bound
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval()
    expected = outputs(by_hand(model, updates), ids)
    assert (outputs(peft_model, ids) - expected).abs().max() <= 1e-10
    assert (expected - outputs(model, ids)).abs().max() > 1e-4  # the update is not negligible
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    name = LAYERS[kind][0]
    assert torch.equal(saved[f"base_model.model.{name}.lora_A.weight"], tensors[f"{name}.lora_a"].T)


def test_loralib_and_alpha_convention_without_a_base(tmp_path, ids):
    CONFIGS["llama"].save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    model = base_model(tmp_path / "base", meta=False)
    g = torch.Generator().manual_seed(3)
    state, updates = {}, {}
    for r, name in zip((2, 4, 4, 4), LAYERS["llama"], strict=True):
        A, B = torch.randn(r, 16, generator=g) * 0.1, torch.randn(16, r, generator=g) * 0.1
        state |= {f"{name}.lora_A": A, f"{name}.lora_B": B, f"{name}.weight": torch.zeros(16, 16)}
        updates[name] = loralib_formula(A.double(), B.double(), 8 / r)
    torch.save(state, tmp_path / "lora.pt")
    result = convert_adapter(tmp_path / "lora.pt", tmp_path / "peft", alpha=8)
    assert result.model_difference is None and len(result.layers) == 4
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(LAYERS["llama"]) and config["rank_pattern"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval()
    expected = outputs(by_hand(model, updates), ids)
    assert (outputs(peft_model, ids) - expected).abs().max() <= 1e-10
    # the PEFT folder read under the "alpha" convention (s = lora_alpha), and back again
    convert_adapter(tmp_path / "peft", tmp_path / "scaled", convention="alpha")
    scaled = json.loads((tmp_path / "scaled" / "adapter_config.json").read_text())
    assert scaled["lora_alpha"] == config["lora_alpha"] * config["r"]
    again = convert_adapter(tmp_path / "peft", tmp_path / "round-trip")
    assert again.layers
    trip = load_file(tmp_path / "round-trip" / "adapter_model.safetensors")
    first = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert trip.keys() == first.keys() and all(torch.equal(trip[k], first[k]) for k in first)


def test_refusals_leave_no_folder(tmp_path, monkeypatch):
    CONFIGS["llama"].save_pretrained(tmp_path / "base")
    name = LAYERS["llama"][0]
    wrong = {f"{name}.lora_A": torch.ones(2, 12), f"{name}.lora_B": torch.ones(16, 2)}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="does not fit the model"):
        convert_adapter(tmp_path / "wrong.pt", tmp_path / "out", alpha=4, base=tmp_path / "base")
    assert not (tmp_path / "out").exists()
    good = {f"{name}.lora_A": torch.ones(2, 16), f"{name}.lora_B": torch.ones(16, 2)}
    torch.save(good, tmp_path / "good.pt")
    import lowrank.torch.convert as convert

    real = convert._source_update
    monkeypatch.setattr(convert, "_source_update", lambda *a: 1.5 * real(*a))  # a wrong scale
    with pytest.raises(ValueError, match="refused: the converted adapter's outputs differ"):
        convert_adapter(tmp_path / "good.pt", tmp_path / "out", alpha=4)
    assert not (tmp_path / "out").exists()

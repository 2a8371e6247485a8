"""`inspect_adapter`: per-layer spectra from the factors alone, coverage against a base model,
and the keys PEFT would skip.

Oracles: NumPy's dense SVD of s * B @ A built in full on small layers (float64; the factored
path agrees to 1e-10 relative: both are backward-stable SVDs of the same matrix); PEFT itself
for the skipped keys (`set_peft_model_state_dict(...).unexpected_keys` on the same model and
the same tensors); the real all-MiniLM-L6-v2 for an adapter as `lowrank demo` writes one.
"""

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

from lowrank.torch import add_lora, lora_layers, save_adapter
from lowrank.torch.adapter_report import inspect_adapter
from lowrank.torch.hf import minilm_path

PREFIX = "base_model.model."


def llama_config():
    return LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=40,
        max_position_embeddings=16,
        architectures=["LlamaForCausalLM"],
    )


def dense_spectrum(A, B, s):
    return np.linalg.svd(s * B.double().numpy() @ A.double().numpy(), compute_uv=False)


def test_spectra_match_dense_svd_and_analysis_definitions(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "a.lora_A": torch.randn(3, 12, generator=g),
        "a.lora_B": torch.randn(10, 3, generator=g),
        "b.lora_A": torch.randn(2, 7, generator=g),
        "b.lora_B": torch.zeros(5, 2),
    }
    state["a.lora_B"][:, 2] = 0.0  # rank 2 update
    torch.save(state, tmp_path / "lora.pt")
    report = inspect_adapter(tmp_path / "lora.pt", alpha=6, energy=0.99)
    a, b = report.layers
    s = dense_spectrum(state["a.lora_A"], state["a.lora_B"], 6 / 3)
    np.testing.assert_allclose(a.singular_values, s[:3], rtol=1e-10, atol=1e-10 * s[0])
    assert a.norm == pytest.approx(np.linalg.norm(s), rel=1e-10)
    shares = np.cumsum(s**2) / np.sum(s**2)
    assert a.energy_rank == int(np.argmax(shares >= 0.99 - 1e-12)) + 1 == 2
    p = s[s > 1e-12 * s[0]] / s.sum()
    assert a.effective_rank == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-8)
    assert (b.norm, b.energy_rank, b.effective_rank) == (0.0, 0, 0.0)
    assert (a.shape, a.r, a.scale, a.dtype) == ((10, 12), 3, 2.0, "float32")
    assert all(len(line) < 100 for line in report.to_text().splitlines())
    json.dumps(report.to_dict())  # JSON-ready


def test_peft_skips_equal_peft_unexpected_keys(tmp_path):
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(LlamaForCausalLM(llama_config()), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    llama_config().save_pretrained(tmp_path / "base")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    layer = "model.layers.0.self_attn."
    tensors.update(
        {  # what real files carry that PEFT drops: an untargeted layer's factors,
            f"{PREFIX}{layer}k_proj.lora_A.weight": torch.zeros(2, 16),  # a typo'd module,
            f"{PREFIX}{layer}k_proj.lora_B.weight": torch.zeros(16, 2),  # a base weight under
            f"{PREFIX}{layer}qproj.lora_A.weight": torch.zeros(2, 16),  # its pre-wrap name
            f"{PREFIX}{layer}qproj.lora_B.weight": torch.zeros(16, 2),
            f"{PREFIX}{layer}q_proj.weight": torch.zeros(16, 16),
        }
    )
    save_file(tensors, weights)
    report = inspect_adapter(tmp_path / "adapter", base=tmp_path / "base" / "config.json")
    fresh = get_peft_model(LlamaForCausalLM(llama_config()), config)
    theirs = set_peft_model_state_dict(fresh, tensors).unexpected_keys
    assert sorted(report.base.peft_skips) == sorted(theirs) and len(theirs) == 5
    assert report.base.unmatched == [f"{layer}qproj"]
    assert report.base.missing == [] and report.base.shape_problems == []


def test_coverage_and_shapes_against_a_bare_config(tmp_path):
    llama_config().save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    state = {
        f"{names[0]}.lora_A": torch.randn(2, 16, generator=g),
        f"{names[0]}.lora_B": torch.randn(16, 2, generator=g),
        f"{names[1]}.lora_A": torch.randn(2, 12, generator=g),  # wrong in
        f"{names[1]}.lora_B": torch.randn(16, 2, generator=g),
    }
    torch.save(state, tmp_path / "lora.pt")
    report = inspect_adapter(tmp_path / "lora.pt", tmp_path / "base", alpha=4)
    assert report.base.missing is None and report.base.peft_skips is None  # loralib: no targets
    assert len(report.base.shape_problems) == 1 and names[1] in report.base.shape_problems[0]
    (tmp_path / "mlx").mkdir()
    mlx = {
        f"{names[1]}.lora_a": torch.randn(16, 2, generator=g),
        f"{names[1]}.lora_b": torch.randn(2, 16, generator=g),
    }
    save_file(mlx, tmp_path / "mlx" / "adapters.safetensors")
    params = {
        "rank": 2,
        "scale": 10.0,
        "dropout": 0.0,
        "keys": ["self_attn.q_proj", "self_attn.v_proj"],
    }
    (tmp_path / "mlx" / "adapter_config.json").write_text(
        json.dumps({"num_layers": 1, "lora_parameters": params})
    )
    report = inspect_adapter(tmp_path / "mlx", tmp_path / "base")  # only the last block
    assert report.base.missing == ["model.layers.1.self_attn.v_proj"]
    out = report.plot(tmp_path / "spectra.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_minilm_adapter_as_the_demo_writes_it(tmp_path):
    torch.manual_seed(0)
    model = add_lora(AutoModel.from_pretrained(minilm_path()), ["query", "value"], r=8, alpha=16)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.B["default"].normal_(std=0.02)  # as if trained
    save_adapter(model, tmp_path / "adapter")
    report = inspect_adapter(tmp_path / "adapter", base=minilm_path())
    assert len(report.layers) == 12 and {layer.shape for layer in report.layers} == {(384, 384)}
    assert report.base.missing == report.base.unmatched == report.base.peft_skips == []
    assert report.base.shape_problems == []
    first = next(lora_layers(model))[1]
    s = dense_spectrum(first.A["default"].detach(), first.B["default"].detach(), 2.0)
    np.testing.assert_allclose(report.layers[0].singular_values, s[:8], rtol=1e-9)

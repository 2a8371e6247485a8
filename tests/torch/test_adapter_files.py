"""Reading PEFT, mlx-lm and loralib adapters into one canonical form (`adapter_files`).

Oracles: files written by hand in each tool's layout (mlx-lm: lora_a (in, r), lora_b (r, out),
`scale` in adapter_config.json, as mlx-lm's tuner/lora.py saves them), loralib's own
`lora_state_dict` on a loralib model, PEFT's own `save_pretrained`; the expected scale is
computed by hand from the numbers in the files. Every bad input is refused by name.
"""

import json

import loralib
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

from lowrank.torch.adapter_files import base_model, detect_format, read_adapter


def write_mlx(folder, tensors, **config):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapters.safetensors")
    params = {"rank": 2, "scale": 20.0, "dropout": 0.0}
    raw = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params, **config}
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    return folder


def mlx_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.self_attn.q_proj.lora_a": torch.randn(8, 2, generator=g),  # (in, r)
        "model.layers.0.self_attn.q_proj.lora_b": torch.randn(2, 6, generator=g),  # (r, out)
    }


def test_mlx_is_transposed_into_peft_layout(tmp_path):
    tensors = mlx_tensors()
    adapter = read_adapter(write_mlx(tmp_path / "mlx", tensors))
    layer = adapter.layers["model.layers.0.self_attn.q_proj"]
    assert adapter.format == "mlx-lm" and layer.scale == 20.0 and layer.r == 2
    assert torch.equal(layer.A, tensors["model.layers.0.self_attn.q_proj.lora_a"].T)
    assert torch.equal(layer.B, tensors["model.layers.0.self_attn.q_proj.lora_b"].T)
    x = torch.randn(3, 8, dtype=torch.float64)
    lora_a, lora_b = (t.double() for t in tensors.values())
    by_hand = 20.0 * (x @ lora_a) @ lora_b  # mlx-lm's LoRALinear.__call__
    ours = layer.scale * x @ (layer.B.double() @ layer.A.double()).T
    torch.testing.assert_close(ours, by_hand, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["dora", "full", "qlora-ish"])
def test_mlx_other_fine_tune_types_refused_by_name(tmp_path, kind):
    folder = write_mlx(tmp_path / "mlx", mlx_tensors(), fine_tune_type=kind)
    with pytest.raises(ValueError, match=f"fine_tune_type='{kind}' is not supported"):
        read_adapter(folder)


def test_mlx_switch_layers_and_strays_refused(tmp_path):
    experts = {"m.lora_a": torch.randn(4, 2, 8), "m.lora_b": torch.randn(4, 6, 2)}
    with pytest.raises(ValueError, match="3-D factors are mixture-of-experts"):
        read_adapter(write_mlx(tmp_path / "a", experts))
    stray = {**mlx_tensors(), "model.norm.weight": torch.ones(8)}
    with pytest.raises(ValueError, match="model.norm.weight is no mlx-lm LoRA factor"):
        read_adapter(write_mlx(tmp_path / "b", stray))


def test_loralib_state_dict_from_loralib_itself(tmp_path):
    model = nn.Sequential(loralib.Linear(8, 6, r=3, lora_alpha=12))
    nn.init.normal_(model[0].lora_B)
    torch.save(model.state_dict(), tmp_path / "full.pt")  # base weights saved along
    torch.save(loralib.lora_state_dict(model), tmp_path / "lora.pt")
    for name in ("full.pt", "lora.pt"):
        adapter = read_adapter(tmp_path / name, alpha=12)
        layer = adapter.layers["0"]
        assert adapter.format == "loralib" and layer.scale == 12 / 3 == model[0].scaling
        assert torch.equal(
            layer.B @ layer.A * layer.scale, model[0].lora_B @ model[0].lora_A * model[0].scaling
        )
    assert read_adapter(tmp_path / "full.pt", alpha=12).ignored == ["0.weight", "0.bias"]
    assert read_adapter(tmp_path / "lora.pt", alpha=12).ignored == []


def test_loralib_refusals(tmp_path):
    torch.save({"q.lora_A": torch.ones(2, 8), "q.lora_B": torch.ones(4, 2)}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="does not hold lora_alpha"):
        read_adapter(tmp_path / "a.pt")
    merged = loralib.MergedLinear(8, 12, r=2, enable_lora=[True, False, True])
    torch.save(loralib.lora_state_dict(nn.Sequential(merged)), tmp_path / "merged.pt")
    with pytest.raises(ValueError, match="MergedLinear"):
        read_adapter(tmp_path / "merged.pt", alpha=4)
    torch.save({"q.lora_A": torch.ones(2, 8)}, tmp_path / "alone.pt")
    with pytest.raises(ValueError, match="q.lora_A has no matching lora_B"):
        read_adapter(tmp_path / "alone.pt", alpha=4)
    nan = {"q.lora_A": torch.full((2, 8), float("nan")), "q.lora_B": torch.ones(4, 2)}
    save_file(nan, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="nan.safetensors: q.lora_A holds NaN"):
        read_adapter(tmp_path / "nan.safetensors", alpha=4)
    with pytest.raises(ValueError, match="for loralib state dicts only"):
        read_adapter(write_mlx(tmp_path / "mlx", mlx_tensors()), alpha=4)


def peft_folder(tmp_path, **options):
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    config = LoraConfig(target_modules=["0", "2"], **options)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def test_peft_patterns_and_conventions(tmp_path):
    folder = peft_folder(tmp_path, r=4, lora_alpha=8, rank_pattern={"2": 2}, alpha_pattern={"2": 6})
    adapter = read_adapter(folder)
    assert (adapter.layers["0"].r, adapter.layers["0"].scale) == (4, 8 / 4)
    assert (adapter.layers["2"].r, adapter.layers["2"].scale) == (2, 6 / 2)
    assert read_adapter(folder, convention="alpha").layers["2"].scale == 6
    assert read_adapter(folder, convention="none").layers["0"].scale == 1.0
    rs = read_adapter(peft_folder(tmp_path / "rs", r=4, lora_alpha=8, use_rslora=True))
    assert rs.layers["0"].scale == 8 / 2  # alpha / sqrt(r)
    assert (
        detect_format(folder) == "peft"
        and detect_format(folder / "adapter_model.safetensors") == "peft"
    )


def test_peft_bin_read_without_pickle_code(tmp_path):
    folder = peft_folder(tmp_path, r=2, lora_alpha=4)
    from safetensors.torch import load_file

    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    adapter = read_adapter(folder)
    assert sorted(adapter.layers) == ["0", "2"] and adapter.files[-1].name == "adapter_model.bin"


def test_peft_lookalike_factor_refused(tmp_path):
    folder = peft_folder(tmp_path, r=2, lora_alpha=4)
    save_file(
        {"base_model.model.0.lora_A.default.weight": torch.ones(2, 8)},
        folder / "adapter_model.safetensors",
    )
    with pytest.raises(ValueError, match="looks like a LoRA factor"):
        read_adapter(folder)


def test_none_of_the_formats(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="is none of the adapter formats"):
        read_adapter(tmp_path)
    with pytest.raises(ValueError, match="format must be one of"):
        read_adapter(tmp_path, format="gguf")


def test_base_model_from_a_bare_config(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               vocab_size=30, architectures=["BertModel"]).save_pretrained(tmp_path)  # fmt: skip
    meta = base_model(tmp_path / "config.json", meta=True)
    real = base_model(tmp_path, meta=False)
    assert type(meta).__name__ == "BertModel" and meta.pooler.dense.weight.is_meta
    assert real.pooler.dense.weight.dtype == torch.float64 and not real.pooler.dense.weight.is_meta
    with pytest.raises(ValueError, match="no config.json"):
        base_model(tmp_path / "nowhere", meta=True)

"""lowrank.torch.resize against independent oracles: an adapter built by hand whose update has
known singular values (the errors are hand-computed numbers), NumPy's dense SVD of the update
built in the test (the best rank-r' matrix, the energy rank, the Eckart-Young tail), and PEFT's
own loader (`PeftModel.from_pretrained`) on the written folder for tiny GPT-2 (Conv1D), Llama
and BERT models.

Tolerances: float64 adapters agree to 1e-10 relative to the update's norm (two QR + SVD routes
against LAPACK's dense SVD); float32 ones to 1e-5 (the factors are stored in float32, ~6e-8
relative each, and PEFT's merge adds one float32 rounding of W).
"""

import copy
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank.torch import add_lora, lora_layers, save_adapter
from lowrank.torch.resize import resize_adapter

peft = pytest.importorskip("peft")


def _hand_adapter(folder, sigmas, out=12, inp=10, alpha=8.0):
    """One layer "q" whose update s B A = s U diag(sigmas) V^T has singular values s * sigmas
    (U, V with orthonormal columns; s = alpha / r), stored in float64."""
    r = len(sigmas)
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.normal(size=(out, r)))
    V, _ = np.linalg.qr(rng.normal(size=(inp, r)))
    model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(inp, out))).double(), ["q"], r=r)
    model.q.alpha["default"] = alpha
    with torch.no_grad():
        model.q.B["default"].copy_(torch.tensor(U * np.asarray(sigmas)))  # (out, r)
        model.q.A["default"].copy_(torch.tensor(V.T))  # (r, in)
    save_adapter(model, folder)
    return alpha / r, U, V


def test_a_hand_built_update_is_cut_to_its_known_tail(tmp_path):
    sigmas = [4.0, 3.0, 2.0, 1.0]
    scale, U, V = _hand_adapter(tmp_path / "src", sigmas)
    report = resize_adapter(tmp_path / "src", tmp_path / "r2", rank=2)
    (row,) = report.layers
    assert (row.old_rank, row.new_rank, row.capped) == (4, 2, False)
    # by hand: singular values 2 * (4, 3, 2, 1); the tail after 2 is 2 * sqrt(4 + 1)
    assert row.norm == pytest.approx(scale * np.sqrt(30), rel=1e-12)
    assert row.bound == pytest.approx(scale * np.sqrt(5), rel=1e-12)
    assert row.error == pytest.approx(scale * np.sqrt(5), rel=1e-10)
    assert row.relative_error == pytest.approx(np.sqrt(5 / 30), rel=1e-10)
    tensors = load_file(tmp_path / "r2" / "adapter_model.safetensors")
    A, B = tensors["base_model.model.q.lora_A.weight"], tensors["base_model.model.q.lora_B.weight"]
    assert A.shape == (2, 10) and B.shape == (12, 2) and A.dtype == torch.float64
    expected = scale * (U[:, :2] * sigmas[:2]) @ V[:, :2].T  # the top two directions
    np.testing.assert_allclose((B @ A).numpy(), expected, atol=1e-12)
    config = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (2, 2, False)


def _random_adapter(folder, rslora=False):
    """Three layers with ranks 6, 4, 2 (rank_pattern) and alphas 3, 5, 3, float64, random."""
    model = nn.Sequential(
        OrderedDict(q=nn.Linear(20, 16), k=nn.Linear(16, 20), v=nn.Linear(20, 20))
    ).double()
    add_lora(
        model, ["q", "k", "v"], r=6, alpha=3, use_rslora=rslora,
        rank_pattern={"k": 4, "v": 2}, alpha_pattern={"k": 5},
    )  # fmt: skip
    generator = torch.Generator().manual_seed(3)
    updates = {}
    with torch.no_grad():
        for name, layer in lora_layers(model):
            layer.A["default"].copy_(torch.randn(layer.A["default"].shape, generator=generator))
            layer.B["default"].copy_(torch.randn(layer.B["default"].shape, generator=generator))
            updates[name] = layer.delta_weight("default").numpy()  # s B A, (out, in)
    save_adapter(model, folder)
    return updates


def _numpy_best(update, r):
    U, s, Vh = np.linalg.svd(update, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vh[:r], s


@pytest.mark.parametrize("rslora", [False, True])
def test_energy_picks_each_layers_rank_as_numpy_does(tmp_path, rslora):
    updates = _random_adapter(tmp_path / "src", rslora)
    report = resize_adapter(tmp_path / "src", tmp_path / "out", energy=0.9)
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for row in report.layers:
        _, s = _numpy_best(updates[row.name], 1)
        shares = np.cumsum(s**2) / np.sum(s**2)
        assert row.new_rank == int(np.argmax(shares >= 0.9)) + 1
        best, _ = _numpy_best(updates[row.name], row.new_rank)
        A = tensors[f"base_model.model.{row.name}.lora_A.weight"].numpy()
        B = tensors[f"base_model.model.{row.name}.lora_B.weight"].numpy()
        norm = np.linalg.norm(updates[row.name])
        np.testing.assert_allclose(B @ A, best, atol=1e-10 * norm)
        tail = np.sqrt(np.sum(s[row.new_rank :] ** 2))
        assert row.bound == pytest.approx(tail, rel=1e-9, abs=1e-10 * norm)
        assert row.error == pytest.approx(np.linalg.norm(updates[row.name] - B @ A), abs=1e-9)
        assert row.error == pytest.approx(row.bound, abs=1e-10 * norm)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    ranks = {row.name: row.new_rank for row in report.layers}
    common = config["r"]
    assert config["lora_alpha"] == common and config["use_rslora"] is False
    assert config["rank_pattern"] == {n: r for n, r in ranks.items() if r != common}
    assert config["alpha_pattern"] == config["rank_pattern"]


def test_a_rank_above_a_layer_keeps_it_and_the_update(tmp_path):
    updates = _random_adapter(tmp_path / "src")
    report = resize_adapter(tmp_path / "src", tmp_path / "out", rank=4)
    rows = {row.name: row for row in report.layers}
    assert {n: (r.old_rank, r.new_rank, r.capped) for n, r in rows.items()} == {
        "q": (6, 4, False),
        "k": (4, 4, False),
        "v": (2, 2, True),
    }
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    A, B = (tensors[f"base_model.model.v.lora_{x}.weight"].numpy() for x in "AB")
    np.testing.assert_allclose(B @ A, updates["v"], atol=1e-10 * np.linalg.norm(updates["v"]))
    assert rows["v"].bound == 0.0 and rows["v"].error < 1e-10 * rows["v"].norm


def _tiny(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64)
        return transformers.GPT2LMHeadModel(config).eval(), ["c_attn", "c_fc"], None
    if kind == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config).eval(), ["q_proj", "v_proj", "down_proj"], None
    config = transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=64,
    )  # fmt: skip
    return (
        transformers.BertForSequenceClassification(config).eval(),
        ["query", "value"],
        "classifier",
    )


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_peft_loads_the_resized_folder_with_the_truncated_updates(tmp_path, kind):
    base, targets, head = _tiny(kind)
    trained = add_lora(copy.deepcopy(base), targets, r=6, alpha=12, modules_to_save=head and [head])
    generator = torch.Generator().manual_seed(1)
    updates = {}
    with torch.no_grad():
        for name, layer in lora_layers(trained):
            layer.A["default"].copy_(torch.randn(layer.A["default"].shape, generator=generator))
            layer.B["default"].normal_(std=0.02, generator=generator)
            updates[name] = layer.delta_weight("default").double().numpy()  # (out, in)
        if head:
            trained.get_submodule(head).modules_to_save["default"].weight.add_(1.0)
    save_adapter(trained, tmp_path / "src")
    report = resize_adapter(tmp_path / "src", tmp_path / "r3", rank=3)
    assert {row.name for row in report.layers} == set(updates)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "r3")
    merged = loaded.merge_and_unload()
    for name, update in updates.items():
        best, s = _numpy_best(update, 3)
        weight = merged.get_submodule(name).weight.detach().double()
        original = base.get_submodule(name).weight.detach().double()
        delta = (weight - original).numpy()
        if kind == "gpt2":
            delta = delta.T  # Conv1D stores (in, out)
        np.testing.assert_allclose(delta, best, atol=1e-5 * s[0])
    if head:  # modules_to_save pass through, bit for bit
        expected = trained.get_submodule(head).modules_to_save["default"].weight
        assert torch.equal(merged.get_submodule(head).weight, expected)


def test_the_folder_may_be_resized_in_place(tmp_path):
    _random_adapter(tmp_path / "a")
    resize_adapter(tmp_path / "a", tmp_path / "a", rank=1)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["rank_pattern"] == {}


def test_bad_inputs_are_refused_by_name(tmp_path):
    _random_adapter(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="not both"):
        resize_adapter(tmp_path / "src", out, rank=2, energy=0.9)
    with pytest.raises(ValueError, match="one of them"):
        resize_adapter(tmp_path / "src", out)
    with pytest.raises(ValueError, match="rank must be"):
        resize_adapter(tmp_path / "src", out, rank=0)
    for energy in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"energy must be a share in \(0, 1\]"):
            resize_adapter(tmp_path / "src", out, energy=energy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is no PEFT adapter"):
        resize_adapter(tmp_path / "empty", out, rank=2)
    tensors = load_file(tmp_path / "src" / "adapter_model.safetensors")
    tensors["base_model.model.q.lora_A.weight"] = tensors["base_model.model.q.lora_A.weight"][:5]
    save_file(tensors, tmp_path / "src" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="layer 'q' has A"):
        resize_adapter(tmp_path / "src", out, rank=2)
    assert not out.exists()  # nothing is written before every check passed

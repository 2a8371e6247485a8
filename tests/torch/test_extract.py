"""lowrank.torch.extract against independent oracles: a synthetic "fine-tune" made here (the
base plus known rank-k updates on some layers, a changed LayerNorm, a new head) must come back
exactly at r = k; NumPy's dense SVD of W_tuned - W_base gives the energy ranks and the
Eckart-Young tails; PEFT's `PeftModel.from_pretrained` on the saved folder must compute the
tuned model's outputs (tiny BERT, GPT-2 with Conv1D, Llama from small configs).

Tolerances: the weights are float32, so a stored delta is the rank-k update plus the rounding
of W + Delta W (~6e-8 relative to W); recovery at r = k is checked to 1e-5 relative to the
update, outputs to 1e-5.
"""

import copy

import numpy as np
import pytest
import torch
import transformers

from lowrank.torch import save_adapter
from lowrank.torch.extract import extract_adapter, load_base_and_tuned

peft = pytest.importorskip("peft")

BERT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(**BERT, vocab_size=64, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def _add_rank_k(module, k, generator, conv1d=False):
    """Add a random rank-k update to module.weight; returns it as (out, in) float64."""
    weight = module.weight
    out, inp = (weight.shape[1], weight.shape[0]) if conv1d else weight.shape
    update = torch.randn(out, k, generator=generator) @ torch.randn(k, inp, generator=generator)
    with torch.no_grad():
        weight += update.T if conv1d else update
    return update.double()


def _synthetic_finetune(k=2):
    """base, tuned: rank-k updates on two layers, a changed LayerNorm, a new head."""
    base = _bert()
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(5)
    layers = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]
    for name in layers:
        _add_rank_k(tuned.get_submodule(name), k, generator)
    with torch.no_grad():
        tuned.bert.encoder.layer[0].output.LayerNorm.weight.mul_(1.5)
        tuned.classifier.weight.normal_(generator=generator)  # a head trained from scratch
        tuned.classifier.bias.normal_(generator=generator)
    return base, tuned, layers


IDS = torch.tensor([[1, 5, 9, 2], [3, 3, 7, 0]])


def test_a_synthetic_finetune_comes_back_exactly_at_its_rank(tmp_path):
    base, tuned, layers = _synthetic_finetune(k=2)
    model, report = extract_adapter(base, tuned, rank=2, modules_to_save=["classifier"])
    assert [row.name for row in report.layers] == layers  # only the changed linear layers
    for row in report.layers:
        assert row.rank == 2 and row.energy == pytest.approx(1.0, abs=1e-10)
        assert row.error < 1e-5 * row.norm and row.bound < 1e-5 * row.norm
    assert report.modules_to_save == ["classifier"]
    ln = "bert.encoder.layer.0.output.LayerNorm.weight"
    assert [(item.name, item.shape) for item in report.not_captured] == [(ln, (32,))]
    before = base.state_dict()[ln].double()
    expected_change = float(torch.linalg.norm(0.5 * before) / torch.linalg.norm(before))
    assert report.not_captured[0].relative_change == pytest.approx(expected_change, rel=1e-6)
    # PEFT's loader on the saved folder computes the tuned model with the LayerNorm undone
    save_adapter(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    expected = copy.deepcopy(tuned)
    expected.state_dict()[ln].copy_(base.state_dict()[ln])
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected(IDS).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(IDS).logits, expected(IDS).logits, rtol=0, atol=1e-5)
    assert not torch.allclose(base(IDS).logits, expected(IDS).logits, atol=1e-3)  # it acts


def test_errors_match_numpys_svd_and_never_grow_with_rank():
    base, tuned, layers = _synthetic_finetune(k=6)
    weights = [{n: m.get_submodule(n).weight.detach().double().numpy() for n in layers}
               for m in (base, tuned)]  # fmt: skip
    deltas = {n: weights[1][n] - weights[0][n] for n in layers}  # exact in float64
    previous = {n: np.inf for n in layers}
    for rank in (1, 2, 4, 6):
        _, report = extract_adapter(base, tuned, rank=rank, modules_to_save=["classifier"])
        for row in report.layers:
            s = np.linalg.svd(deltas[row.name], compute_uv=False)
            tail = np.sqrt(np.sum(s[rank:] ** 2))
            assert row.bound == pytest.approx(tail, rel=1e-9, abs=1e-9 * s[0])
            assert row.error == pytest.approx(tail, abs=1e-5 * s[0])  # float32 factors
            assert row.energy == pytest.approx(np.sum(s[:rank] ** 2) / np.sum(s**2), rel=1e-9)
            assert row.error <= previous[row.name] + 1e-6 * s[0]  # Eckart-Young: monotone
            previous[row.name] = row.error
    _, report = extract_adapter(base, tuned, energy=0.8, modules_to_save=["classifier"])
    for row in report.layers:
        s = np.linalg.svd(deltas[row.name], compute_uv=False)
        assert row.rank == int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= 0.8)) + 1


def test_gpt2_conv1d_layers_and_a_tied_embedding(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64)
    base = transformers.GPT2LMHeadModel(config).eval()
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(2)
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"):
        _add_rank_k(tuned.get_submodule(name), 1, generator, conv1d=True)
    with torch.no_grad():
        tuned.transformer.wte.weight.add_(0.01)  # lm_head shares it
    model, report = extract_adapter(base, tuned, rank=1)
    assert [row.name for row in report.layers] == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.mlp.c_fc",
    ]
    assert all(row.error < 1e-5 * row.norm for row in report.layers)
    assert [item.name for item in report.not_captured] == ["transformer.wte.weight"]
    save_adapter(model, tmp_path / "adapter")
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    merged = merged.merge_and_unload()
    for row in report.layers:
        torch.testing.assert_close(
            merged.get_submodule(row.name).weight,
            tuned.get_submodule(row.name).weight,
            rtol=0,
            atol=1e-5,
        )


def test_llama_with_targets(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **BERT, num_key_value_heads=2, vocab_size=64
    )  # a tiny Llama of the same sizes
    base = transformers.LlamaForCausalLM(config).eval()
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(3)
    for name, module in tuned.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            _add_rank_k(module, 3, generator)
    model, report = extract_adapter(base, tuned, rank=3, targets=["q_proj"])
    assert [row.name for row in report.layers] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    # v_proj changed but was not a target: listed, not dropped
    assert [item.name for item in report.not_captured] == [
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
    ]
    save_adapter(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def test_bad_inputs_are_refused_by_name():
    base, tuned, _ = _synthetic_finetune()
    with pytest.raises(ValueError, match="not both"):
        extract_adapter(base, tuned, rank=2, energy=0.5)
    with pytest.raises(ValueError, match="one of them"):
        extract_adapter(base, tuned)
    with pytest.raises(ValueError, match="rank must be"):
        extract_adapter(base, tuned, rank=0)
    with pytest.raises(ValueError, match=r"energy must be a share in \(0, 1\]"):
        extract_adapter(base, tuned, energy=1.5)
    torch.manual_seed(0)
    wider = transformers.BertForSequenceClassification(
        transformers.BertConfig(**{**BERT, "intermediate_size": 48}, vocab_size=64, num_labels=3)
    )
    message = r"tensor 'bert.encoder.layer.0.intermediate.dense.weight' is \(64, 32\) in base"
    with pytest.raises(ValueError, match=message):
        extract_adapter(base, wider, rank=2)
    with pytest.raises(ValueError, match="no linear layer's weight differs"):
        extract_adapter(base, copy.deepcopy(base), rank=2)
    with pytest.raises(ValueError, match="is a Embedding, not a Linear or Conv1D"):
        extract_adapter(base, tuned, rank=2, targets=["word_embeddings"])


def test_load_base_and_tuned_names_the_new_head(tmp_path):
    base, tuned, _ = _synthetic_finetune()
    base.bert.save_pretrained(tmp_path / "base")  # a plain encoder, as a hub checkpoint is
    tuned.save_pretrained(tmp_path / "tuned")
    loaded_base, loaded_tuned, new = load_base_and_tuned(tmp_path / "base", tmp_path / "tuned")
    assert new == ["classifier"] and type(loaded_base) is type(loaded_tuned)
    assert torch.equal(loaded_base.bert.pooler.dense.weight, base.bert.pooler.dense.weight)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="is a gpt2 model and tuned .* a bert model"):
        load_base_and_tuned(tmp_path / "gpt2", tmp_path / "tuned")

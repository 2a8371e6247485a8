"""`lowrank.torch.merge_audit` on tiny BERT (classification) and Llama (causal) models from
configs, and once on the real MiniLM.

Oracles: KL computed by hand on tiny logits; the dense update s B A in float64 (the audit
uses the factors' QR core); the trained QLoRA model itself (built by `add_lora(quant_type=...)`,
the audit rebuilds (a) from the adapter file); a choice constructed to equal (a) (float32 (c):
KL ~ 0); an adapter with B = 0, whose (b) KL is the pure quantization effect, computed here
from the base model and its 4-bit copy. bitsandbytes' quantizer: tests/interop/ (same stem).
"""

import copy
import math

import pytest
import torch
import transformers

from lowrank.torch import add_lora, all_linear_targets, lora_layers, save_trainable
from lowrank.torch.hf import MeanPoolClassifier, load_model, minilm_path
from lowrank.torch.merge_audit import (
    CHOICES,
    ChoiceAudit,
    LayerAudit,
    MergeAuditReport,
    kl_divergence,
    merge_audit,
)

VOCAB = 50


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def qlora_adapter(base, folder, *, std=0.05, heads=None, quant_type="nf4", seed=1):
    """Train-shaped QLoRA on every linear layer (B random: as if trained), saved; the model."""
    targets = [t for t in all_linear_targets(base) if t.rsplit(".", 1)[-1] not in ("classifier",)]
    trained = add_lora(
        copy.deepcopy(base), targets, r=4, alpha=8, quant_type=quant_type, modules_to_save=heads
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(trained):
            B = layer.B["default"]
            B.copy_(torch.randn(B.shape, generator=generator) * std)
        if heads:
            head = trained.get_submodule(heads[0]).modules_to_save["default"]
            head.weight.add_(torch.randn(head.weight.shape, generator=generator))
    save_trainable(trained, folder)
    return trained.eval()


def batches(n_batches=2, rows=6, length=7, seed=0, padded=False):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(VOCAB, (rows, length), generator=generator)
        mask = torch.ones_like(ids)
        if padded:
            mask[0, 3:] = 0
            mask[1, 5:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_kl_by_hand():
    reference = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    other = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    p = [[math.exp(v) for v in row] for row in reference.tolist()]
    q = [[math.exp(v) for v in row] for row in other.tolist()]
    expected = []
    for p_row, q_row in zip(p, q, strict=True):
        p_row = [v / sum(p_row) for v in p_row]
        q_row = [v / sum(q_row) for v in q_row]
        expected.append(sum(a * math.log(a / b) for a, b in zip(p_row, q_row, strict=True)))
    got = kl_divergence(reference, other)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(expected, rel=1e-12)  # float64 throughout
    assert kl_divergence(reference, reference).abs().max() < 1e-15


def test_bert_layers_and_choices(tmp_path):
    base = tiny_bert()
    trained = qlora_adapter(base, tmp_path, heads=["classifier"])
    inputs = batches()
    labels = [torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 1, 0, 0, 1])]
    report = merge_audit(base, tmp_path, inputs, labels=labels, dtype=torch.float32)
    assert [c.key for c in report.choices] == ["a", "b", "c", "d"]
    trained_layers = dict(lora_layers(trained))
    assert [layer.name for layer in report.layers] == list(trained_layers)
    for layer in report.layers:  # against the trained model's own 4-bit base and dense update
        wrapper = trained_layers[layer.name]
        W = base.get_submodule(layer.name).weight.detach().double()
        deq = wrapper.base_layer.dequantize_weight().double()
        dense = wrapper.scale["default"] * (
            wrapper.B["default"].detach().double() @ wrapper.A["default"].detach().double()
        )
        assert layer.quant_error == pytest.approx(float(torch.linalg.norm(W - deq)), rel=1e-12)
        # the audit's norm comes from the QR core of float32 factors: float64 maths, ~1e-12
        assert layer.update_norm == pytest.approx(float(torch.linalg.norm(dense)), rel=1e-9)
        assert layer.weight_norm == pytest.approx(float(torch.linalg.norm(W)), rel=1e-12)
        assert layer.ratio == pytest.approx(layer.quant_error / layer.update_norm)
    # (a) is the trained model: same predictions, so the same accuracy on these labels
    predicted = torch.cat([trained(**batch).logits.argmax(-1) for batch in inputs])
    expected_accuracy = float((predicted == torch.cat(labels)).float().mean())
    a, b, c, d = report.choices
    assert a.kl == 0 and a.max_logit_diff == 0 and a.agreement == 1
    assert a.accuracy == pytest.approx(expected_accuracy)
    # (c) in float32 computes deq(Q(W)) x + s B A x merged: (a) up to float32 rounding of the
    # sum (relative ~1e-7 per weight), so a KL of ~1e-12 and logits equal to ~1e-5
    assert c.kl < 1e-9 and c.max_logit_diff < 1e-4 and c.agreement == 1
    assert b.kl > 1e3 * c.kl and d.kl > 1e3 * c.kl  # the 4-bit rounding is far larger
    assert report.recommended == "c"
    assert report.settings["compared"] == 12 and report.settings["dtype"] == "float32"
    # memory: float32 storage here, 4 bytes a weight for (b) and (c); 4 bits for (d)
    n_weights = sum(math.prod(layer.shape) for layer in report.layers)
    assert b.weight_bytes == c.weight_bytes == 4 * n_weights
    assert 0.5 * n_weights < d.weight_bytes < 0.6 * n_weights  # ~4.13 bits a weight
    assert not list(lora_layers(base))  # the model given is not changed


def test_zero_update_gives_the_pure_quantization_effect(tmp_path):
    base = tiny_bert(seed=3)
    quantized = qlora_adapter(base, tmp_path, std=0.0)  # B = 0: (a) is the 4-bit base alone
    inputs = batches(seed=5)
    report = merge_audit(base, tmp_path, inputs, dtype=torch.float32)
    with torch.no_grad():
        kl = torch.cat(
            [kl_divergence(quantized(**x).logits, base(**x).logits) for x in inputs]
        ).mean()
    b = report.choices[1]
    assert b.kl == pytest.approx(float(kl), rel=1e-6)  # (b) is W itself; float32 logits
    assert all(layer.update_norm == 0 and math.isinf(layer.ratio) for layer in report.layers)
    assert report.to_dict()["layers"][0]["ratio"] is None  # JSON has no inf


def test_llama_padding_is_not_compared(tmp_path):
    base = tiny_llama()
    qlora_adapter(base, tmp_path, std=0.02, quant_type="fp4")
    inputs = batches(padded=True)
    report = merge_audit(base, tmp_path, inputs, quant_type="fp4", blocksize=128)
    assert report.settings["compared"] == sum(int(x["attention_mask"].sum()) for x in inputs)
    assert report.settings["quant_type"] == "fp4" and report.settings["blocksize"] == 128
    assert len(report.layers) == 2 * 7  # q, k, v, o, gate, up, down per block
    a, *_ = report.choices
    assert a.kl == 0 and a.accuracy is None
    text = report.table()
    assert "recommended: (" in text and "model.layers.0.self_attn.q_proj" in text


def test_labels_follow_positions_and_ignore_minus_100(tmp_path):
    base = tiny_llama(seed=2)
    trained = qlora_adapter(base, tmp_path, std=0.02)
    inputs = batches(n_batches=1)
    with torch.no_grad():
        predicted = trained(**inputs[0]).logits.argmax(-1)  # (rows, length)
    labels = predicted.clone()
    labels[:, -1] = -100
    labels[0, 0] = (predicted[0, 0] + 1) % VOCAB  # one wrong of 6 * 6 scored
    report = merge_audit(base, tmp_path, inputs, labels=[labels])
    assert report.choices[0].accuracy == pytest.approx(35 / 36)


def test_recommendation_ties_take_the_smaller():
    layers = [LayerAudit("q", (8, 8), 2, 4.0, 0.2, 0.02)]

    def report(kls, sizes):
        choices = [
            ChoiceAudit(key, CHOICES[key], kl, 0.0, 1.0, None, size)
            for key, kl, size in zip("abcd", kls, sizes, strict=True)
        ]
        return MergeAuditReport(layers, choices, {})

    assert report([0, 1e-3, 1e-4, 2e-3], [40, 128, 128, 36]).recommended == "c"
    tied = report([0, 1e-3, 1e-12, 1e-11], [40, 128, 128, 36])
    assert tied.recommended == "d" and "tied with (c)" in tied.reason()


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"quant_type": "int4"}, ValueError, "unknown quant_type 'int4'"),
        ({"blocksize": 48}, ValueError, "blocksize must be a positive power of two"),
        ({"dtype": torch.int8}, TypeError, "dtype must be one of"),
        ({"dtype": "bfloat16"}, TypeError, "dtype must be one of"),
        ({"double_quant": "yes"}, TypeError, "double_quant must be True or False"),
        ({"inputs": []}, ValueError, "inputs is empty"),
        ({"inputs": [[1, 2]]}, TypeError, "inputs[0] must be a tensor or a dict"),
        ({"labels": []}, ValueError, "labels has 0 entries for 2 batches"),
    ],
)
def test_bad_arguments_are_refused_by_name(tmp_path, change, error, words):
    base = tiny_bert()
    qlora_adapter(base, tmp_path)
    arguments = {"inputs": batches(), **change}
    inputs = arguments.pop("inputs")
    with pytest.raises(error) as raised:
        merge_audit(base, tmp_path, inputs, **arguments)
    assert words in str(raised.value)


def test_adapters_that_do_not_fit_are_refused(tmp_path):
    base = tiny_bert()
    qlora_adapter(tiny_llama(), tmp_path / "llama")
    with pytest.raises(ValueError, match="does not fit the model"):
        merge_audit(base, tmp_path / "llama", batches())
    with pytest.raises(ValueError, match="nothing to load"):
        merge_audit(base, tmp_path / "nothing", batches())
    embedded = add_lora(copy.deepcopy(base), ["word_embeddings", "query"], r=2)
    save_trainable(embedded, tmp_path / "embedding")
    with pytest.raises(ValueError, match="'bert.embeddings.word_embeddings' is a Embedding"):
        merge_audit(base, tmp_path / "embedding", batches())
    with pytest.raises(ValueError, match="already has LoRA layers"):
        merge_audit(embedded, tmp_path / "embedding", batches())


def test_minilm_qlora(tmp_path):
    """The real MiniLM inside the demo's MeanPoolClassifier, QLoRA on every linear layer,
    its head in trainable.safetensors (save_trainable): a few rows, seconds."""
    torch.manual_seed(0)
    encoder = load_model(minilm_path())
    encoder.pooler = None  # as the demo: unused by mean pooling
    base = MeanPoolClassifier(encoder, num_labels=2).eval()
    targets = [f"encoder.{t}" for t in all_linear_targets(base.encoder)]
    trained = add_lora(copy.deepcopy(base), targets, r=8, alpha=16, quant_type="nf4")
    trained.head.requires_grad_(True)
    with torch.no_grad():
        for _, layer in lora_layers(trained):
            layer.B["default"].normal_(std=1e-3)
    save_trainable(trained, tmp_path)
    ids = torch.tensor([[101, 2204, 102], [101, 9643, 102], [101, 2307, 102]])
    inputs = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    with torch.no_grad():
        predicted = trained.eval()(**inputs[0]).argmax(-1)  # (rows,)
    report = merge_audit(base, tmp_path, inputs, labels=[predicted])
    assert len(report.layers) == 36
    assert report.choices[0].accuracy == 1  # (a), rebuilt from the files, is the trained model
    assert report.ratio_summary()["min"] > 1  # this small an update is below the 4-bit error

"""lowrank.torch.hf: targets against PEFT's tables and its "all-linear", k-bit preparation,
loading from a folder, and the word task (pooling against a hand loop, the loss against
transformers' own, metrics against models whose outputs are known in advance). Tiny random
models built from configs; nothing is downloaded."""

import math

import pytest
import torch
import transformers
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from lowrank.torch import add_lora
from lowrank.torch.hf import (
    DEFAULT_TARGETS,
    MeanPoolClassifier,
    accuracy,
    all_linear_targets,
    classification_loss,
    collate_token_ids,
    default_targets,
    load_model,
    load_tokenizer,
    logits,
    minilm_path,
    prepare_for_kbit_training,
    tokenize_examples,
)

CONFIGS = {
    "llama": dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=100),
    "bert": dict(
        model_type="bert",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
    ),
}


def _tiny(kind, dtype=torch.float32):
    """A causal LM (llama, gpt2) or a BertModel with random weights."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**CONFIGS[kind])
    auto = transformers.AutoModel if kind == "bert" else transformers.AutoModelForCausalLM
    return auto.from_config(config).to(dtype)


def test_minilm_folder_is_shipped():
    folder = minilm_path()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_default_targets_match_peft():
    # Oracle: PEFT's own table of default LoRA targets per model_type.
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    for model_type, targets in DEFAULT_TARGETS.items():
        assert targets == PEFT[model_type], model_type
    assert default_targets(_tiny("gpt2")) == ["c_attn"]
    with pytest.raises(ValueError, match="no default LoRA targets for model_type 't5'"):
        default_targets(transformers.T5Model(transformers.T5Config(d_model=8, num_layers=1)))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_all_linear_matches_peft(kind):
    # Oracle: the layers PEFT wraps for target_modules="all-linear" (it skips the output head).
    # (With a classification head PEFT would wrap it too; we leave it out on purpose.)
    import peft

    ours = all_linear_targets(_tiny(kind))
    wrapped = peft.get_peft_model(_tiny(kind), peft.LoraConfig(target_modules="all-linear", r=2))
    theirs = [
        name.removeprefix("base_model.model.")
        for name, module in wrapped.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    ]
    assert sorted(ours) == sorted(theirs)


@pytest.mark.parametrize("quant_type", [None, "nf4"])
def test_all_linear_on_an_adapted_model_names_the_wrappers(quant_type):
    model = _tiny("llama")
    first = all_linear_targets(model)
    add_lora(model, first, r=2, quant_type=quant_type)
    assert all_linear_targets(model) == first  # the same layers, by the same names
    add_lora(model, all_linear_targets(model), r=2, adapter_name="second")
    assert all(set(model.get_submodule(n).A) == {"default", "second"} for n in first)


def test_prepare_for_kbit_training():
    model = _tiny("llama", dtype=torch.bfloat16)
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    assert not any(p.requires_grad for p in model.parameters())
    for name, parameter in model.named_parameters():
        expected = torch.float32 if "norm" in name else torch.bfloat16
        assert parameter.dtype == expected, name
    assert model.is_gradient_checkpointing
    embedded = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embedded.requires_grad  # so checkpointed blocks have a graph to recompute into


def test_load_model_from_folder(tmp_path):
    config = transformers.AutoConfig.for_model(**CONFIGS["bert"])  # saved with a 2-class head
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    model = load_model(tmp_path, task="classification", num_labels=3)
    assert isinstance(model, transformers.BertForSequenceClassification)
    assert model.classifier.out_features == 3
    with pytest.raises(ValueError, match="cannot load a model from"):
        load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="task must be one of"):
        load_model(tmp_path, task="translation")


# --- the word task ----------------------------------------------------------------------------


def test_tokenize_examples_matches_the_tokenizer_word_by_word():
    # Oracle: the tokenizer called on one word at a time.
    tokenizer = load_tokenizer(minilm_path())
    pairs = [("good", 1), ("awful", 0), ("unbelievably", 1)]
    expected = [(tokenizer(word)["input_ids"], label) for word, label in pairs]
    assert tokenize_examples(tokenizer, iter(pairs)) == expected
    assert expected[0] == ([101, 2204, 102], 1)  # [CLS] good [SEP] in BERT's vocabulary
    assert tokenize_examples(tokenizer, []) == []


def test_collate_token_ids_pads_to_the_longest():
    batch = collate_token_ids([([101, 7, 8, 102], 1), ([101, 102], 0)])
    assert batch["input_ids"].tolist() == [[101, 7, 8, 102], [101, 102, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    assert all(tensor.dtype == torch.long for tensor in batch.values())
    padded = collate_token_ids([([5], 0), ([5, 6], 1)], pad_id=9)["input_ids"]
    assert padded.tolist() == [[5, 9], [5, 6]]


def test_mean_pool_classifier_averages_only_real_tokens():
    # Oracle: a loop over each sequence's non-padded token states, the head applied by hand.
    encoder = _tiny("bert").eval()
    model = MeanPoolClassifier(encoder, num_labels=3).eval()
    sequences = [[1, 5, 9, 7, 2], [1, 7, 2]]
    batch = collate_token_ids([(ids, 0) for ids in sequences])
    with torch.no_grad():
        got = model(batch["input_ids"], batch["attention_mask"])  # (2, 3)
        states = encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state  # (2, 5, 32)
        alone = model(torch.tensor([sequences[1]]), torch.ones(1, 3, dtype=torch.long))
    assert got.shape == (2, 3)
    for row, ids in enumerate(sequences):
        pooled = sum(states[row, t] for t in range(len(ids))) / len(ids)
        expected = [
            sum(w * v for w, v in zip(weights.tolist(), pooled.tolist(), strict=True)) + bias
            for weights, bias in zip(model.head.weight, model.head.bias.tolist(), strict=True)
        ]
        assert got[row].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # the encoder sees the mask too: padding does not change the short sequence's logits
    torch.testing.assert_close(alone[0], got[1], rtol=1e-5, atol=1e-5)


class _FirstTokenLogits(nn.Module):
    """A stand-in model whose logits are known in advance: row `input_ids[i, 0]` of `table`,
    as a tensor or, like transformers' classifiers, as the `.logits` of an output object."""

    def __init__(self, table: torch.Tensor, hf_output: bool = False) -> None:
        super().__init__()
        self.table, self.hf_output = nn.Parameter(table), hf_output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.table[input_ids[:, 0]]  # (batch, labels)
        return SequenceClassifierOutput(logits=out) if self.hf_output else out


TABLE = torch.tensor([[2.0, -1.0], [0.5, 1.5], [-3.0, 0.0], [1.0, 2.0]])


def test_classification_loss_is_the_mean_cross_entropy():
    # Oracle: -log softmax(z)[label], averaged, in plain Python floats.
    examples = [([0, 9], 0), ([1], 0), ([2, 2, 2], 1), ([3], 1)]
    batch = collate_token_ids(examples)
    rows = TABLE.tolist()
    expected = sum(
        math.log(sum(math.exp(z) for z in rows[ids[0]])) - rows[ids[0]][label]
        for ids, label in examples
    ) / len(examples)
    for hf_output in (False, True):
        loss = classification_loss(_FirstTokenLogits(TABLE, hf_output), batch)
        assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_classification_loss_matches_transformers_on_a_classifier():
    # Oracle: transformers computes the loss itself when given the labels.
    config = transformers.AutoConfig.for_model(**CONFIGS["bert"], num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    batch = collate_token_ids([([1, 5, 2], 1), ([1, 2], 0), ([1, 8, 9, 2], 1)])
    with torch.no_grad():
        theirs = model(**batch).loss
        ours = classification_loss(model, batch)
    torch.testing.assert_close(ours, theirs)


def test_logits_and_accuracy_in_chunks():
    # Oracle: the table rows themselves; 600 examples go through in chunks of 250.
    first_tokens = [i % 4 for i in range(600)]
    examples = [([token] + [0] * (i % 3), i % 2) for i, token in enumerate(first_tokens)]
    for hf_output in (False, True):
        model = _FirstTokenLogits(TABLE.to(torch.bfloat16), hf_output).train()
        got = logits(model, examples, "cpu")
        assert not model.training  # evaluated in eval mode
        assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (600, 2)
        torch.testing.assert_close(got, TABLE.to(torch.bfloat16).float()[first_tokens])
    # the larger of each table row: token 0 -> class 0, tokens 1, 2, 3 -> class 1
    predicted = {0: 0, 1: 1, 2: 1, 3: 1}
    right = sum(predicted[token] == label for (token, *_), label in examples)
    assert 0 < right < 600
    model = _FirstTokenLogits(TABLE)
    assert accuracy(model, examples, torch.device("cpu")) == pytest.approx(right / 600)

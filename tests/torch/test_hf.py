"""lowrank.torch.hf: targets against PEFT's tables and its "all-linear", k-bit preparation,
loading from a folder. Tiny random models built from configs; nothing is downloaded."""

import pytest
import torch
import transformers

from lowrank.torch.hf import (
    DEFAULT_TARGETS,
    all_linear_targets,
    default_targets,
    load_model,
    minilm_path,
    prepare_for_kbit_training,
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

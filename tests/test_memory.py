"""lowrank.memory: the estimate against transformers' parameter counts, PEFT's trainable counts,
the QLoRA paper's LLaMA-65B numbers, and `training_memory` for the parts it shares. The
estimate against peaks measured while training tiny models: tests/torch/test_measure.py."""

import dataclasses
import json
import subprocess
import sys

import pytest

from lowrank.accounting import training_memory
from lowrank.memory import estimate_memory
from lowrank.shapes import config_to_shape

TINY = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 8000,
    },
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 256,
        "n_layer": 4,
        "n_head": 4,
        "vocab_size": 8000,
        "n_positions": 512,
    },
    "bert": {
        "model_type": "bert",
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "vocab_size": 8000,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
    },
}
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}

# The paper's LLaMA-65B (Touvron et al. 2023) as its Hugging Face config.json states it.
LLAMA_65B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 22016,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "vocab_size": 32000,
}


def _tiny_model(kind: str):
    import transformers

    config = transformers.AutoConfig.for_model(**TINY[kind])
    if kind == "bert":  # the estimate counts BertModel without its pooler
        return transformers.AutoModel.from_config(config, add_pooling_layer=False)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_parameter_counts_match_transformers_and_peft(kind):
    # Oracles: transformers' own parameter count, and PEFT's count of LoRA's trainable numbers.
    import peft

    model = _tiny_model(kind)
    full = estimate_memory(TINY[kind], method="full", batch_size=1, seq_len=8)
    assert full.total_params == sum(p.numel() for p in model.parameters())
    lora = estimate_memory(TINY[kind], method="lora", r=4, batch_size=1, seq_len=8)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind])
    trainable, _ = peft.get_peft_model(model, config).get_nb_trainable_parameters()
    assert lora.trainable_params == trainable


def test_llama_65b_qlora_matches_the_paper():
    # QLoRA paper (Dettmers et al. 2023): NF4 + double quantization costs 4.127 bits per weight,
    # so LLaMA-65B's weights take 65.2e9 * 4.127 / 8 = 33.6 GB ("33-34 GB"); our figure keeps the
    # 1.05 GB of embeddings and output head in bf16 on top of the 4-bit linear layers.
    estimate = estimate_memory(
        LLAMA_65B, method="qlora", batch_size=1, seq_len=512, gradient_checkpointing=True
    )
    assert 33e9 < estimate.weights < 35e9
    assert 33e9 < config_to_shape(LLAMA_65B).n_params() * 4.127 / 8 < 34e9
    # "finetune a 65B parameter model on a single 48GB GPU"; and not on a 24 GB one
    assert estimate.fits(48e9) and not estimate.fits(24e9)
    full = estimate_memory(LLAMA_65B, method="full", batch_size=1, seq_len=512)
    assert full.total > 780e9  # the paper's ">780 GB of GPU memory" for 16-bit full fine-tuning
    assert "total" in str(estimate) and "fits in 48 GB" in str(estimate)


def test_checkpointing_and_methods_order():
    kwargs = dict(batch_size=8, seq_len=512)
    full, lora, qlora = (
        estimate_memory(LLAMA_65B, method=m, **kwargs) for m in ("full", "lora", "qlora")
    )
    assert full.total > lora.total > qlora.total
    checkpointed = estimate_memory(LLAMA_65B, method="lora", gradient_checkpointing=True, **kwargs)
    assert checkpointed.activations < lora.activations / 5


def test_config_from_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY["bert"]))
    assert estimate_memory(tmp_path).total == estimate_memory(TINY["bert"]).total


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="adam"), "method must be one of"),
        (dict(targets=["q_proj"]), r"unknown targets \['q_proj'\]"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(targets=[]), "method 'lora' needs targets"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_memory(TINY["bert"], **kwargs)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="model_type 't5' is not supported"):
        estimate_memory({"model_type": "t5"})


def test_estimate_is_training_memory_plus_activations():
    # What does not depend on the batch is training_memory's, with the Hugging Face names
    # translated to the shape's keys (GPT-2's c_attn -> qkv).
    for kind, targets in [("gpt2", ("qkv",)), ("llama", ("q", "v")), ("bert", ("q", "v"))]:
        shape = config_to_shape(TINY[kind])
        for method, weight_dtype in [("full", "fp32"), ("lora", "fp32"), ("qlora", "nf4")]:
            estimate = estimate_memory(TINY[kind], method=method, dtype="fp32", seq_len=64)
            fixed = training_memory(
                shape, method=method, targets=targets, weight_dtype=weight_dtype,
                unquantized_dtype="fp32",
            )  # fmt: skip
            activations = estimate.activations
            assert estimate.breakdown == dataclasses.replace(fixed, activations=activations)
            assert estimate.total == fixed.total + activations + estimate.working > fixed.total


def test_memory_imports_neither_numpy_nor_torch():
    code = (
        "import sys; sys.modules['numpy'] = None; sys.modules['torch'] = None\n"
        "from lowrank.memory import estimate_memory\n"
        "from lowrank.claims import lora_paper_claims\n"
        "assert estimate_memory({'model_type': 'gpt2', 'n_embd': 8, 'n_layer': 1, 'n_head': 2,"
        " 'vocab_size': 5, 'n_positions': 4}).total > 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

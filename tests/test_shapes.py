"""Tests for lowrank.shapes. Oracles: Hugging Face models built on the `meta` device (parameter
counts and the shapes of each block's layers, found by the names in `HF_LINEAR_NAMES`), Meta's
released LLaMA-7B count, and PEFT's default targets."""

import dataclasses
import functools
import json
import subprocess
import sys

import pytest

from lowrank.shapes import (
    DEFAULT_TARGETS,
    GPT3_175B,
    HF_LINEAR_NAMES,
    LLAMA_7B,
    LLAMA_65B,
    MODEL_FAMILIES,
    ROBERTA_BASE,
    ROBERTA_LARGE,
    TransformerShape,
    config_to_shape,
    hf_linear_shapes,
    read_config,
)

# --- parameter counts against Hugging Face models on the meta device ------------------------


def meta_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are listed once


BERT_BASE = TransformerShape(
    "BERT-base", 768, 12, 12, vocab_size=30522, max_positions=512, n_token_types=2
)
TINY_GQA = TransformerShape(
    "tiny Llama, GQA", 64, 3, 8, d_ff=160, vocab_size=100, n_kv_heads=2, gated_mlp=True,
    bias=False, norm="rmsnorm", tie_embeddings=False,
)  # fmt: skip
TINY_TIED = TransformerShape(
    "tiny Llama, tied", 48, 2, 4, d_ff=96, vocab_size=77, gated_mlp=True, bias=False,
    norm="rmsnorm", tie_embeddings=True,
)  # fmt: skip


def llama_config(transformers, shape: TransformerShape):
    return transformers.LlamaConfig(
        hidden_size=shape.d_model, intermediate_size=shape.d_ff,
        num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads, vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_embeddings,
    )  # fmt: skip


def on_meta(build):
    import torch

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return build()


def hf_models() -> list:
    """(our shape, a function that builds the matching Hugging Face model on the meta device)."""
    t = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    roberta = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)
    large = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=4096)  # fmt: skip
    gpt3 = dict(n_embd=12288, n_layer=96, n_head=96, n_positions=2048)
    builders = [
        (BERT_BASE, lambda: t.BertModel(t.BertConfig(), add_pooling_layer=False)),
        (ROBERTA_BASE, lambda: t.RobertaModel(t.RobertaConfig(**roberta), add_pooling_layer=False)),
        (ROBERTA_LARGE,
         lambda: t.RobertaModel(t.RobertaConfig(**roberta, **large), add_pooling_layer=False)),
        (GPT3_175B, lambda: t.GPT2LMHeadModel(t.GPT2Config(**gpt3))),  # GPT-2's design, scaled
        *[(s, lambda s=s: t.LlamaForCausalLM(llama_config(t, s)))
          for s in (LLAMA_7B, LLAMA_65B, TINY_GQA, TINY_TIED)],
    ]  # fmt: skip
    return [(shape, functools.partial(on_meta, build)) for shape, build in builders]


def test_n_params_matches_hugging_face_models():
    for shape, make in hf_models():
        assert shape.n_params() == meta_count(make()), shape.name


def test_published_totals():
    # LLaMA-7B: 6,738,415,616 parameters, the count of Meta's released checkpoint
    assert LLAMA_7B.n_params() == 6_738_415_616
    assert LLAMA_65B.n_params() == pytest.approx(65.2e9, rel=0.002)


# module names inside one Hugging Face block, for each of our linear_shapes() names
HF_LINEARS = {
    "BertLayer": dict(q="attention.self.query", k="attention.self.key", v="attention.self.value",
                      o="attention.output.dense", up="intermediate.dense", down="output.dense"),
    "RobertaLayer": dict(q="attention.self.query", k="attention.self.key",
                         v="attention.self.value", o="attention.output.dense",
                         up="intermediate.dense", down="output.dense"),
    "LlamaDecoderLayer": dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                              o="self_attn.o_proj", gate="mlp.gate_proj", up="mlp.up_proj",
                              down="mlp.down_proj"),
}  # fmt: skip


def test_linear_shapes_match_hugging_face_modules():
    checked = 0
    for shape, make in hf_models():
        model = make()
        for block in model.modules():
            if type(block).__name__ in HF_LINEARS:
                break
        else:
            continue  # GPT-3 here is unfused; the fused GPT-2 block is checked below
        modules = dict(block.named_modules())
        hf_names = HF_LINEARS[type(block).__name__]
        assert set(hf_names) == set(shape.linear_shapes()), shape.name
        for ours, hf_name in hf_names.items():
            assert shape.linear_shapes()[ours] == tuple(modules[hf_name].weight.shape), shape.name
        checked += 1
    assert checked == 7


# --- Hugging Face configs -------------------------------------------------------------------

TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=100),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=3, n_head=4, vocab_size=100,
                 n_positions=32),
    "bert": dict(model_type="bert", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, vocab_size=100, max_position_embeddings=32,
                 type_vocab_size=2),
}  # fmt: skip


def hf_model(config: dict):
    t = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    hf_config = t.AutoConfig.for_model(**config)
    if config["model_type"] == "bert":  # the shape counts BertModel without its pooler
        return on_meta(lambda: t.AutoModel.from_config(hf_config, add_pooling_layer=False))
    return on_meta(lambda: t.AutoModelForCausalLM.from_config(hf_config))


def block_layer(block, hf_name: str):
    """The layer `hf_name` names in `block`: the exact name, else the one name ending in it."""
    modules = dict(block.named_modules())
    if hf_name in modules:
        return modules[hf_name]
    (layer,) = [m for name, m in modules.items() if name.endswith("." + hf_name)]
    return layer


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_config_shapes_match_hugging_face_models(kind):
    config = TINY_CONFIGS[kind]
    model = hf_model(config)
    assert config_to_shape(config).n_params() == meta_count(model)
    block = next(m for m in model.modules() if type(m).__name__.endswith(("Layer", "Block")))
    for hf_name, (out, in_) in hf_linear_shapes(config).items():
        layer = block_layer(block, hf_name)
        weight = tuple(layer.weight.shape)  # nn.Linear: [out, in]; GPT-2's Conv1D: [in, out]
        assert weight == ((in_, out) if type(layer).__name__ == "Conv1D" else (out, in_)), hf_name


def test_gpt2_fuses_q_k_v_without_changing_the_count():
    # One c_attn matrix [3d, d] holds what q, k and v hold: the same weights and biases.
    gpt2 = config_to_shape(TINY_CONFIGS["gpt2"])
    assert gpt2.fused_qkv and list(gpt2.linear_shapes()) == ["qkv", "o", "up", "down"]
    assert gpt2.linear_shapes()["qkv"] == (3 * 64, 64)
    unfused = dataclasses.replace(gpt2, fused_qkv=False)
    assert gpt2.param_groups() == unfused.param_groups()
    # GPT-3 175B fused as GPT-2 fuses it: the count of GPT2LMHeadModel at GPT-3's sizes
    fused_gpt3 = dataclasses.replace(GPT3_175B, fused_qkv=True)
    assert fused_gpt3.n_params() == GPT3_175B.n_params() == 174_604_259_328


def test_every_family_table_covers_its_shape_and_default_targets():
    for model_type, family in MODEL_FAMILIES.items():
        assert set(DEFAULT_TARGETS[model_type]) <= set(HF_LINEAR_NAMES[family]), model_type
    for kind, config in TINY_CONFIGS.items():
        shape_keys = set(HF_LINEAR_NAMES[MODEL_FAMILIES[kind]].values())
        assert shape_keys == set(config_to_shape(config).linear_shapes()), kind


def test_read_config_from_dict_file_and_folder(tmp_path):
    config = TINY_CONFIGS["bert"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_config(config) is config
    assert read_config(tmp_path) == read_config(tmp_path / "config.json") == config
    with pytest.raises(FileNotFoundError, match="no Hugging Face config"):
        read_config(tmp_path / "missing")


def test_unknown_model_type():
    with pytest.raises(ValueError, match="model_type 't5' is not supported"):
        config_to_shape({"model_type": "t5"})


# --- validation, and no framework needed -----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(d_model=100, n_heads=3), ValueError, "not divisible by n_heads"),
        (dict(n_kv_heads=3), ValueError, "not divisible by n_kv_heads"),
        (dict(n_layers=0), ValueError, "n_layers must be a positive int"),
        (dict(vocab_size=-1), ValueError, "vocab_size must be a non-negative int"),
        (dict(d_ff=0), ValueError, "d_ff must be a positive int"),
        (dict(d_model=64.0), TypeError, "d_model must be a positive int"),
        (dict(norm="batchnorm"), ValueError, "norm must be"),
    ],
)
def test_bad_shapes_raise(kwargs, error, match):
    args = dict(name="x", d_model=64, n_layers=2, n_heads=4) | kwargs
    with pytest.raises(error, match=match):
        TransformerShape(**args)


def test_shapes_import_neither_numpy_nor_torch():
    code = (
        "import sys; sys.modules['numpy'] = None; sys.modules['torch'] = None\n"
        "import lowrank.shapes as s\n"
        "assert s.config_to_shape({'model_type': 'gpt2', 'n_embd': 8, 'n_layer': 1, 'n_head': 2,"
        " 'vocab_size': 5, 'n_positions': 4}).fused_qkv\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

"""Tests for lowrank.accounting. Oracles: the LoRA and QLoRA papers' printed numbers, PEFT's
adapters on Hugging Face models built on the `meta` device, bitsandbytes' 4-bit storage, and
the bytes a real PyTorch AdamW step allocates."""

import functools
import subprocess
import sys

import pytest

from lowrank._validate import RankWarning
from lowrank.accounting import (
    adapter_checkpoint_bytes,
    bits_per_weight,
    format_bytes,
    lora_parameters,
    lora_target_shapes,
    param_counts,
    tensor_bytes,
    training_memory,
    weight_bytes,
)
from lowrank.shapes import (
    GPT3_175B,
    LLAMA_7B,
    LLAMA_65B,
    ROBERTA_BASE,
    ROBERTA_LARGE,
    TransformerShape,
    config_to_shape,
)

# --- the LoRA paper's numbers (Hu et al. 2021, Table 4 and section 4.2; Table 2 for RoBERTa) ---


@pytest.mark.parametrize(
    "shape, r, expected",
    [
        (GPT3_175B, 1, 4_718_592),  # Table 4: GPT-3 LoRA 4.7M
        (GPT3_175B, 4, 18_874_368),  # section 4.2: the r=4 checkpoint
        (GPT3_175B, 8, 37_748_736),  # Table 4: GPT-3 LoRA 37.7M
        (ROBERTA_BASE, 8, 294_912),  # Table 2: RoBERTa-base LoRA 0.3M
        (ROBERTA_LARGE, 8, 786_432),  # Table 2: RoBERTa-large LoRA 0.8M
    ],
)
def test_lora_on_wq_wv_reproduces_the_paper(shape, r, expected):
    counts = param_counts(shape, method="lora", r=r, targets=("q", "v"))
    assert counts.trainable == expected
    assert lora_parameters(lora_target_shapes(shape, ("q", "v")), r) == expected
    assert param_counts(shape, method="qlora", r=r).trainable == expected
    assert counts.total == shape.n_params() + expected


def test_gpt3_r4_checkpoint_is_the_papers_35mb():
    # 18,874,368 fp16 numbers = 37,748,736 bytes = exactly 36 MiB (37.7 MB decimal); the paper
    # writes "35MB". The full checkpoint: 175B fp16 numbers = the paper's "350GB" (decimal GB).
    assert adapter_checkpoint_bytes(GPT3_175B, r=4, dtype="fp16") == 36 * 2**20
    assert weight_bytes(GPT3_175B, "fp16") == pytest.approx(350e9, rel=0.01)
    assert GPT3_175B.n_params() == pytest.approx(175e9, rel=0.005)


# --- LoRA counts against PEFT on Hugging Face models (meta device) ----------------------------


def meta_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are listed once


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


def hf_models() -> list:
    """(our shape, a function that builds the matching Hugging Face model on the meta device);
    tests/test_shapes.py checks their parameter counts and layer shapes."""
    t = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    roberta = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)
    builders = [
        (ROBERTA_BASE, lambda: t.RobertaModel(t.RobertaConfig(**roberta), add_pooling_layer=False)),
        *[(s, lambda s=s: t.LlamaForCausalLM(llama_config(t, s))) for s in (TINY_GQA, TINY_TIED)],
    ]

    def on_meta(build):
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            return build()

    return [(shape, functools.partial(on_meta, build)) for shape, build in builders]


def test_lora_counts_match_peft():
    peft = pytest.importorskip("peft")
    models = {shape.name: (shape, make) for shape, make in hf_models()}
    cases = [
        ("RoBERTa-base", 8, ("q", "v"), ["query", "value"]),
        ("tiny Llama, GQA", 4, ("q", "k", "v", "o", "gate", "up", "down"),
         ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("tiny Llama, tied", 2, ("k", "down"), ["k_proj", "down_proj"]),
    ]  # fmt: skip
    for name, r, ours, theirs in cases:
        shape, make = models[name]
        model = peft.get_peft_model(make(), peft.LoraConfig(r=r, target_modules=theirs))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        counts = param_counts(shape, method="lora", r=r, targets=ours)
        assert counts.trainable == trainable, name
        assert counts.total == meta_count(model), name


GPT2_SMALL = dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257,
                  n_positions=1024)  # fmt: skip


def test_gpt2_fused_qkv_is_one_adapted_matrix():
    # PEFT on GPT-2 small, r=8 on c_attn: "trainable params: 294,912 || all params: 124,734,720"
    gpt2 = config_to_shape(GPT2_SMALL)
    counts = param_counts(gpt2, method="lora", r=8, targets="qkv")
    assert (counts.trainable, counts.total) == (294_912, 124_734_720)
    assert gpt2.n_params() == 124_439_808  # GPT2LMHeadModel("gpt2")


# --- bytes -----------------------------------------------------------------------------------


def test_bits_per_weight_follow_the_qlora_paper():
    # QLoRA section 3: double quantization cuts 32/64 = 0.5 bits to 8/64 + 32/(64*256) = 0.127
    assert bits_per_weight("nf4") == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(bits_per_weight("nf4"), 3) == 4.127
    assert bits_per_weight("fp4", double_quant=False) == 4.5
    assert bits_per_weight("nf4", blocksize=128, double_quant=False) == 4.25
    assert [bits_per_weight(d) for d in ("fp32", "fp16", "bf16", "int8")] == [32, 16, 16, 8]


@pytest.mark.parametrize("n", [1, 63, 64, 65, 4097, 64 * 256 + 1, 70_003])
@pytest.mark.parametrize("double_quant", [True, False])
def test_four_bit_tensor_bytes_match_bitsandbytes(n, double_quant):
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(n, generator=torch.Generator().manual_seed(n))
    packed, state = functional.quantize_4bit(
        w, blocksize=64, quant_type="nf4", compress_statistics=double_quant
    )
    stored = [packed, state.absmax]
    if double_quant:
        stored += [state.state2.absmax, state.offset]  # the 256-entry code is a shared constant
    expected = sum(t.numel() * t.element_size() for t in stored)
    assert tensor_bytes(n, "nf4", blocksize=64, double_quant=double_quant) == expected


def test_llama_65b_in_four_bits():
    at_4127_bits = LLAMA_65B.n_params() * 4.127 / 8  # every parameter at the paper's rate
    assert 33e9 < at_4127_bits < 34e9
    # as stored: linear layers in NF4 + double quantization, embeddings/head/norms in 16 bits
    assert 33e9 < weight_bytes(LLAMA_65B, "nf4") < 35e9
    assert weight_bytes(LLAMA_65B, "nf4", double_quant=False) > weight_bytes(LLAMA_65B, "nf4")


def test_weights_left_unquantized_take_their_own_dtype():
    # embeddings, norms and the output head of a 4-bit or 8-bit model: bf16 unless told otherwise
    rest = LLAMA_7B.n_params() - LLAMA_7B.param_groups()["linear weights"]
    in_bf16 = weight_bytes(LLAMA_7B, "nf4")
    assert weight_bytes(LLAMA_7B, "nf4", unquantized_dtype="fp32") == in_bf16 + 2 * rest
    assert weight_bytes(LLAMA_7B, "int8", unquantized_dtype="fp16") == weight_bytes(
        LLAMA_7B, "int8"
    )
    assert weight_bytes(LLAMA_7B, "fp32", unquantized_dtype="bf16") == 4 * LLAMA_7B.n_params()
    qlora = training_memory(LLAMA_7B, method="qlora", unquantized_dtype="fp32")
    assert qlora.weights == in_bf16 + 2 * rest
    # GPT-2's c_attn is quantized as the one [3d, d] tensor it is
    gpt2 = config_to_shape(GPT2_SMALL)
    d, n_layers = 768, 12
    linears = [3 * d * d, d * d, 4 * d * d, 4 * d * d]  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    quantized = n_layers * sum(tensor_bytes(n, "nf4") for n in linears)
    rest = gpt2.n_params() - n_layers * sum(linears)
    assert weight_bytes(gpt2, "nf4", unquantized_dtype="fp32") == quantized + 4 * rest


def test_format_bytes():
    assert format_bytes(37_748_736) == "37.7 MB (36.0 MiB)"
    assert format_bytes(512) == "512 B"
    assert format_bytes(350e9) == "350.0 GB (326.0 GiB)"


# --- training memory -------------------------------------------------------------------------


def test_full_finetuning_costs_12_or_16_bytes_per_parameter():
    n = LLAMA_65B.n_params()
    full = training_memory(LLAMA_65B, method="full", weight_dtype="bf16")
    # bf16 weights 2 + bf16 gradients 2 + fp32 AdamW moments 8 = 12 bytes: QLoRA's ">780GB"
    assert (full.weights, full.gradients, full.optimizer_states) == (2 * n, 2 * n, 8 * n)
    assert full.total == 12 * n > 780e9
    # mixed precision with an fp32 master copy: ZeRO's 16 bytes per parameter
    assert training_memory(LLAMA_65B, method="full", master_weights=True).total == 16 * n
    assert training_memory(LLAMA_65B, method="full", optimizer="sgd").total == 4 * n


def test_lora_memory_keeps_the_frozen_weights():
    lora = training_memory(LLAMA_7B, method="lora", r=8, weight_dtype="fp16")
    adapters = param_counts(LLAMA_7B, method="lora", r=8).trainable
    assert lora.weights == 2 * LLAMA_7B.n_params()
    assert lora.adapters == lora.gradients == 4 * adapters  # fp32 adapters, as PEFT keeps them
    assert lora.optimizer_states == 8 * adapters
    assert lora.activations == 0 and lora.total == sum(lora.as_dict().values()) - lora.total
    qlora = training_memory(LLAMA_7B, method="qlora", r=8)
    assert qlora.weights == weight_bytes(LLAMA_7B, "nf4") < lora.weights / 3


def test_memory_breakdown_matches_a_real_adamw_step():
    """Count the bytes PyTorch actually holds after one AdamW step on a tiny fp32 Llama, fully
    fine-tuned and with PEFT LoRA, and compare with training_memory."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    shape, config = TINY_GQA, llama_config(transformers, TINY_GQA)

    def step(model):
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable)
        model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
        optimizer.step()
        moments = sum(
            t.numel() * t.element_size()
            for state in optimizer.state.values()
            for key, t in state.items()
            if key in ("exp_avg", "exp_avg_sq")
        )
        return model, trainable, moments

    def nbytes(params):
        return sum(p.numel() * p.element_size() for p in params)

    torch.manual_seed(0)
    model, trainable, moments = step(transformers.LlamaForCausalLM(config))
    full = training_memory(shape, method="full", weight_dtype="fp32")
    assert full.weights == nbytes(model.parameters())
    assert full.gradients == nbytes(p.grad for p in trainable)
    assert full.optimizer_states == moments

    targets = ["q_proj", "v_proj", "down_proj"]
    lora_model = peft.get_peft_model(
        transformers.LlamaForCausalLM(config), peft.LoraConfig(r=4, target_modules=targets)
    )
    lora_model, trainable, moments = step(lora_model)
    lora = training_memory(shape, method="lora", r=4, targets=("q", "v", "down"),
                           weight_dtype="fp32")  # fmt: skip
    assert lora.weights == nbytes(p for p in lora_model.parameters() if not p.requires_grad)
    assert lora.adapters == nbytes(trainable) == lora.gradients
    assert lora.gradients == nbytes(p.grad for p in trainable)
    assert lora.optimizer_states == moments


# --- validation, and no framework needed -----------------------------------------------------


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"targets must be a non-empty selection of \['q'"):
        param_counts(ROBERTA_BASE, method="lora", targets=("query",))
    with pytest.raises(ValueError, match="targets"):
        param_counts(ROBERTA_BASE, method="lora", targets=())
    with pytest.raises(ValueError, match="method must be one of"):
        param_counts(ROBERTA_BASE, method="adapter")
    with pytest.warns(RankWarning, match=r"r=1000 exceeds min\(in_features, out_features\)"):
        counts = param_counts(ROBERTA_BASE, method="lora", r=1000)  # counted as stored
    assert counts.trainable == 12 * 2 * 1000 * (768 + 768)
    with pytest.raises(ValueError, match="r must be a positive int"):
        lora_parameters([(4, 4)], 0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        bits_per_weight("int4")
    with pytest.raises(ValueError, match="power of two"):
        tensor_bytes(100, "nf4", blocksize=48)
    with pytest.raises(ValueError, match="weight_dtype for method='lora' must be one of"):
        training_memory(LLAMA_7B, method="lora", weight_dtype="nf4")
    with pytest.raises(ValueError, match="weight_dtype for method='qlora' must be one of"):
        training_memory(LLAMA_7B, method="qlora", weight_dtype="bf16")
    with pytest.raises(ValueError, match="unquantized_dtype must be one of"):
        weight_bytes(LLAMA_7B, "nf4", unquantized_dtype="int8")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        training_memory(LLAMA_7B, method="full", optimizer="adam8")


def test_accounting_imports_neither_numpy_nor_torch():
    code = (
        "import sys; sys.modules['numpy'] = None; sys.modules['torch'] = None\n"
        "import lowrank.accounting as a\n"
        "from lowrank.shapes import GPT3_175B\n"
        "assert a.param_counts(GPT3_175B, method='lora', r=4).trainable == 18_874_368\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

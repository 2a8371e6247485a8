"""lowrank.torch.measure: the process's resident memory and `PeakMemory` against allocations of
known size; the receipt's counts against the tensors of a model built here the same way, and the
estimate's parts against the receipt's census (saved_tensors_hooks in the measuring process,
independent of the estimate). The estimate against the measured peaks: tests/test_memory.py."""

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from lowrank.memory import estimate_memory
from lowrank.torch import Linear4bit, add_lora, measure
from lowrank.torch.measure import (
    PeakMemory,
    current_rss_bytes,
    measure_peak_memory,
    measure_receipt,
    peak_rss_bytes,
    reset_peak_rss,
)

linux_only = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc"
)
MB = 2**20

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


# --- resident memory and PeakMemory ---------------------------------------------------------


@linux_only
def test_rss_peak_is_reset_to_the_current_resident_memory():
    block = np.ones(64 * MB // 8)  # [8M] float64, every page touched
    del block  # 64 MB is far above glibc's mmap threshold: returned to the OS at once
    assert peak_rss_bytes() - current_rss_bytes() >= 60 * MB
    reset_peak_rss()
    assert 0 <= peak_rss_bytes() - current_rss_bytes() < 16 * MB


@linux_only
def test_peak_memory_sees_a_64_mb_array_on_cpu():
    with PeakMemory("cpu") as quiet:
        pass
    with PeakMemory("cpu") as peak:
        block = np.ones(64 * MB // 8)  # [8M] float64, every page touched
        del block
    assert peak.rise_bytes >= 60 * MB and peak.peak_bytes >= peak.rise_bytes
    assert quiet.rise_bytes < 16 * MB


def test_peak_memory_is_none_where_it_cannot_be_measured(monkeypatch):
    def no_proc() -> None:
        raise FileNotFoundError("/proc/self/clear_refs")

    monkeypatch.setattr(measure, "reset_peak_rss", no_proc)
    with PeakMemory() as peak:
        block = np.ones(MB)
    del block
    assert peak.peak_bytes is None and peak.rise_bytes is None


@pytest.mark.cuda
def test_peak_memory_sees_a_64_mb_tensor_on_cuda():
    with PeakMemory("cuda") as peak:
        block = torch.empty(64 * MB, dtype=torch.uint8, device="cuda")
        del block
    assert peak.rise_bytes >= 64 * MB and peak.peak_bytes >= peak.rise_bytes


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="adam"), "method must be one of"),
        (dict(steps=0), "steps must be a positive int"),
        (dict(targets=[]), "targets must be layer names or 'all-linear'"),
        (dict(device="tpu"), "device must be one of"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(config={"model_type": "t5"}), "model_type 't5' is not supported"),
    ],
)
def test_bad_arguments(kwargs, message):
    arguments = {"config": TINY["bert"], "targets": ["query"]} | kwargs
    with pytest.raises(ValueError, match=message):
        measure_peak_memory(arguments.pop("config"), **arguments)


# --- the receipt ----------------------------------------------------------------------------


@linux_only
def test_receipt_counts_the_model_s_own_tensors():
    # Oracle: the same model built here (random weights, NF4 on every linear layer) and its
    # tensors summed; AdamW's two moments per adapter number, plus one step counter each.
    receipt = measure_receipt(TINY["llama"], method="qlora", batch_size=2, seq_len=32)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**TINY["llama"])
    )
    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    add_lora(model, every_linear, r=8, alpha=16, quant_type="nf4")
    four_bit = [m for m in model.modules() if isinstance(m, Linear4bit)]
    packed = sum(m.weight_packed.nbytes for m in four_bit)
    constants = sum(m.quantized().nbytes for m in four_bit) - packed
    adapters = [p for p in model.parameters() if p.requires_grad]
    adapter_bytes = sum(p.nbytes for p in adapters)
    embeddings = model.get_input_embeddings().weight.nbytes
    embeddings += model.get_output_embeddings().weight.nbytes
    assert receipt["weights"]["4-bit packed weights"] == packed
    assert receipt["weights"]["absmax, double-quant"] == constants
    assert receipt["weights"]["embeddings and head"] == embeddings
    assert receipt["adapters"] == receipt["gradients"] == adapter_bytes
    assert receipt["optimizer (AdamW)"] == 2 * adapter_bytes + 4 * len(adapters)
    itemised = sum(receipt["weights"].values()) + sum(receipt["activations"].values())
    assert itemised + adapter_bytes < receipt["peak"]


RECEIPT_CASES = [  # (architecture, method, targets, options)
    ("llama", "qlora", "all-linear", {}),
    ("llama", "lora", None, {"dtype": "bf16"}),  # each adapted layer: its own fp32 input
    ("gpt2", "lora", None, {}),  # attention dropout on a CPU: seq x seq scores
    ("bert", "full", None, {"gradient_checkpointing": True}),
]


@linux_only
@pytest.mark.parametrize("case", RECEIPT_CASES, ids=lambda case: f"{case[0]}-{case[1]}")
def test_estimate_matches_the_receipt_part_by_part(case):
    # Oracle: the census of the measuring process (every tensor autograd saved, by the module
    # that saved it; the model's tensors), which shares nothing with the estimate. Each part
    # within 2% or 64 KiB: the estimate leaves out token ids, rotary tables and one layer's
    # small differences (the first block's key projection saves nothing under LoRA).
    kind, method, targets, options = case
    step = dict(method=method, targets=targets, batch_size=4, seq_len=128, **options)
    receipt = measure_receipt(TINY[kind], **step)
    estimate = estimate_memory(TINY[kind], **{"dtype": "fp32", **step}, device="cpu")
    pairs = [(f"weights: {k}", estimate.weight_parts.get(k, 0), n)
             for k, n in receipt["weights"].items()]  # fmt: skip
    pairs += [(f"activations: {k}", estimate.per_batch.saved.get(k, 0), n)
              for k, n in receipt["activations"].items() if k != "other"]  # fmt: skip
    pairs += [("adapters", estimate.adapters, receipt["adapters"])]
    if method != "full":  # a full 16-bit model keeps AdamW's moments in 16 bits, not fp32
        pairs += [("gradients", estimate.gradients, receipt["gradients"])]
        pairs += [("optimizer", estimate.optimizer_states, receipt["optimizer (AdamW)"])]
    for name, estimated, counted in pairs:
        assert abs(estimated - counted) <= max(0.02 * counted, 2**16), (name, estimated, counted)
    assert set(estimate.per_batch.saved) == set(receipt["activations"]) - {"other"}

"""lowrank.torch.measure: the process's resident memory and `PeakMemory` against allocations of
known size, and `estimate_memory` against the peak `measure_peak_memory` measures while a fresh
process trains tiny Llama, GPT-2 and BERT models (it shares nothing with the estimate)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank.memory import estimate_memory
from lowrank.torch import measure
from lowrank.torch.measure import (
    PeakMemory,
    current_rss_bytes,
    measure_peak_memory,
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
        (dict(method="lora", targets=None), "method 'lora' needs targets"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        measure_peak_memory(TINY["bert"], **({"targets": ["query"]} | kwargs))


# --- the estimate against measurement ------------------------------------------------------

CASES = [  # (architecture, method, batch, tokens, gradient checkpointing)
    ("llama", "full", 8, 128, False),
    ("llama", "qlora", 8, 128, False),
    ("llama", "qlora-all-linear", 8, 128, False),
    ("gpt2", "lora", 8, 128, False),
    ("bert", "full", 8, 128, True),
    ("bert", "lora", 8, 128, False),
]
ALL_LINEAR = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
}


@linux_only
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case[0]}-{case[1]}")
def test_estimate_within_25_percent_of_measured_peak_on_cpu(case):
    # Oracle: the peak resident memory of a fresh process that builds the model and trains two
    # AdamW steps (measure_peak_memory; it shares nothing with the estimate).
    kind, method, batch_size, seq_len, checkpointing = case
    targets = TARGETS[kind]
    if method == "qlora-all-linear":
        method, targets = "qlora", ALL_LINEAR[kind]
    common = dict(method=method, batch_size=batch_size, seq_len=seq_len)
    peak = measure_peak_memory(
        TINY[kind], **common, targets=targets, gradient_checkpointing=checkpointing
    )
    estimate = estimate_memory(
        TINY[kind],
        **common,
        targets=targets if method != "full" else None,
        gradient_checkpointing=checkpointing,
        dtype="fp32",
    )
    assert abs(peak - estimate.total) <= 0.25 * estimate.total, (peak, estimate.total)


@pytest.mark.cuda
@pytest.mark.parametrize("kind, method", [("llama", "full"), ("llama", "lora"), ("bert", "lora")])
def test_estimate_within_15_percent_of_cuda_peak(kind, method):
    # Oracle: the CUDA caching allocator's own peak (torch.cuda.max_memory_allocated) in a fresh
    # process, counted from just before the model is built; fp32 weights, 2 AdamW steps.
    targets = TARGETS[kind] if method == "lora" else None
    common = dict(method=method, batch_size=8, seq_len=256, targets=targets)
    peak = measure_peak_memory(TINY[kind], **common, device="cuda")
    estimate = estimate_memory(TINY[kind], **common, dtype="fp32")
    assert abs(peak - estimate.total) <= 0.15 * estimate.total, (peak, estimate.total)

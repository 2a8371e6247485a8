"""`lowrank estimate` through a subprocess (the real entry point, offline): the breakdown, the
shared QLoRA default in the header, both checkpointing totals, the largest batch for `--gpu`
(against `largest_batch_size` and the estimate's own `fits`), `--measure`'s receipt on a tiny
model, and one-line errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lowrank.accounting import format_bytes
from lowrank.memory import estimate_memory
from lowrank.torch.hf import minilm_path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 8000,
}


def _lowrank(*argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lowrank", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)


def test_estimate_prints_the_breakdown():
    done = _lowrank("estimate", str(minilm_path()), "--method", "qlora", "--batch-size", "4")
    assert done.returncode == 0, done.stderr
    for part in ("weights", "adapters", "gradients", "optimizer", "activations", "total", "fits"):
        assert part in done.stdout
    header = " ".join(done.stdout.split())
    assert "query,key,value,attention.output.dense,intermediate.dense,output.dense" in header
    assert "(qlora's default: every linear layer)" in header
    assert "attention: fused SDPA kernel" in header  # on cuda, the default device


def test_both_checkpointing_totals_and_the_largest_batch_on_a_24_gb_gpu(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    options = ["--seq-len", "2048", "--gpu", "24GB"]
    done = _lowrank("estimate", str(tmp_path), *options)
    assert done.returncode == 0, done.stderr
    step = dict(method="qlora", seq_len=2048)
    found = re.search(r"on a 24 GB GPU \(24 GiB\): at most (\d+) sequences of 2048 tokens per "
                      r"step, (\d+) with gradient checkpointing", done.stdout)  # fmt: skip
    assert found, done.stdout
    for n, checkpointing in zip(map(int, found.groups()), (False, True), strict=True):
        fits = [estimate_memory(TINY_LLAMA, batch_size=b, gradient_checkpointing=checkpointing,
                                **step).fits(24 * 2**30) for b in (n, n + 1)]  # fmt: skip
        assert fits == [True, False]
    assert int(found.group(2)) > int(found.group(1))
    checkpointed = estimate_memory(TINY_LLAMA, batch_size=1, gradient_checkpointing=True, **step)
    assert f"with gradient checkpointing: {format_bytes(checkpointed.total)}" in done.stdout


def test_dora_and_several_gpus_reach_the_estimate(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    argv = ["--dora", "--batch-size", "8", "--gpus", "4", "--strategy", "fsdp", "--gpu", "24GB"]
    done = _lowrank("estimate", str(tmp_path), *argv)
    assert done.returncode == 0, done.stderr
    step = dict(method="qlora", dora=True, gpus=4, strategy="fsdp")
    estimate = estimate_memory(TINY_LLAMA, batch_size=8, **step)
    assert f"{'total (the peak)':<22} {format_bytes(estimate.total):>20}" in done.stdout
    assert "on 4 x cuda" in done.stdout and "per GPU (FSDP, 2 sequences each)" in done.stdout
    assert "adapters: DoRA r=8" in done.stdout
    found = re.search(r"on 4 GPUs of 24 GB \(24 GiB\): at most (\d+) sequences", done.stdout)
    assert found and int(found.group(1)) % 4 == 0, done.stdout
    n = int(found.group(1))
    fits = [estimate_memory(TINY_LLAMA, batch_size=b, **step).fits(24 * 2**30) for b in (n, n + 4)]
    assert fits == [True, False]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_measure_prints_a_receipt_beside_the_estimate(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    done = _lowrank(
        "estimate", str(tmp_path), "--batch-size", "8", "--seq-len", "128", "--device", "cpu",
        "--dtype", "fp32", "--measure",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    receipt = done.stdout[done.stdout.index("receipt:") :]
    for row in ("4-bit packed weights", "absmax, double-quant", "embeddings and head",
                "adapters", "gradients", "optimizer (AdamW)", "adapter inputs", "MLP",
                "logits and loss", "rest: working + slack", "peak"):  # fmt: skip
        assert f"\n  {row}" in receipt or f"\n    {row}" in receipt, row
    ratio = float(re.search(r"measured / estimated: ([\d.]+)", receipt).group(1))
    assert 0.85 <= ratio <= 1.15  # the CPU bound of tests/test_memory.py


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--gpu", "24 furlongs"], "argument --gpu: must be a size such as 24GB"),
        (["--gpu", "0GB"], "argument --gpu: must be a size"),
        (["--device", "tpu"], "argument --device: invalid choice"),
        (["--method", "full", "--dora"], "dora=True needs method 'lora' or 'qlora'"),
        (["--gpus", "3", "--batch-size", "8"], "batch_size 8 does not split evenly over 3 GPUs"),
        (["--gpus", "0"], "argument --gpus"),
        (["--strategy", "zero3"], "argument --strategy: invalid choice"),
        (["--gpus", "2", "--batch-size", "2", "--measure"], "--measure runs one process"),
    ],
)
def test_bad_options_are_one_line(argv, words):
    done = _lowrank("estimate", str(minilm_path()), *argv)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("lowrank: error: ")
    assert words in done.stderr


def test_measure_on_cuda_without_a_gpu_is_one_line():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = _lowrank("estimate", str(minilm_path()), "--measure")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "lowrank: error: --measure --device cuda needs a CUDA GPU" in done.stderr

"""lowrank.sharding through `estimate_memory(gpus=N, strategy=...)`, against what torch itself
holds on each rank: two CPU processes under torchrun (gloo) wrap a tiny Llama as DDP or FSDP2
(`lowrank.torch.distributed`'s wrappers: `fully_shard` per block, then the root), and each rank
reports its parameters' local bytes (FSDP's shards), its 4-bit layers' buffers, its gradients'
and DDP's gradient buckets (the reducer's own bucket sizes).
The estimate shares nothing with these numbers: they are read off the wrapped model."""

import json
import os
from pathlib import Path

import pytest
from torchrun import run_torchrun

from lowrank.memory import estimate_memory

pytest.importorskip("transformers")
WORKER = Path(__file__).with_name("sharding_worker.py")
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 8000,
}


CASES = [  # (method, targets, strategy, dora)
    ("lora", ["q_proj", "v_proj"], "fsdp", False),
    ("lora", ["q_proj", "k_proj", "v_proj", "o_proj"], "fsdp", True),
    ("full", None, "fsdp", False),
    ("qlora", "all-linear", "fsdp", False),  # codes sharded, their constants replicated
    ("lora", ["q_proj", "v_proj"], "ddp", False),
    ("qlora", "all-linear", "ddp", False),
    ("full", None, "ddp", False),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[list[dict]]:
    """Both ranks' reports of every case, from one torchrun launch (imports dominate its time)."""
    out = tmp_path_factory.mktemp("sharding")
    cases = [
        dict(config=TINY_LLAMA, method=method, targets=targets, r=8, strategy=strategy, dora=dora)
        for method, targets, strategy, dora in CASES
    ]
    job = json.dumps({"out": str(out), "cases": cases})
    done = run_torchrun([str(WORKER), job], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: "-".join(
    map(str, (CASES[i][0], CASES[i][2], "dora" if CASES[i][3] else "lora"))))  # fmt: skip
def test_each_rank_holds_what_the_estimate_says(ranks, index):
    method, targets, strategy, dora = CASES[index]
    estimate = estimate_memory(
        TINY_LLAMA, method=method, targets=targets, r=8, dora=dora, batch_size=2, seq_len=16,
        dtype="fp32", gpus=2, strategy=strategy,
    )  # fmt: skip
    for reports in ranks:
        rank = reports[index]
        # Exact: the tiny model's row counts split evenly in two, so FSDP pads nothing.
        assert rank["parameters"] + rank["4-bit buffers"] == estimate.weights + estimate.adapters
        buffers = ["absmax, double-quant"] + (["4-bit packed weights"] if strategy == "ddp" else [])
        assert rank["4-bit buffers"] == sum(estimate.weight_parts.get(kind, 0) for kind in buffers)
        assert rank["gradients"] == estimate.gradients
        if strategy == "ddp":
            assert rank["buckets"] == estimate.parallel_parts["DDP gradient buckets"]

"""One rank of tests/torch/test_sharding.py, launched by torchrun on CPU (gloo): for each case,
builds a tiny model with adapters, wraps it as lowrank's trainer does (`wrap_ddp`, or `wrap_fsdp`:
FSDP2's `fully_shard` per block, then the root, with 4-bit codes stored as a uint8 parameter),
runs one forward and backward pass and records what this rank holds: its parameters' local bytes
(FSDP's shards), its 4-bit layers' buffers, its gradients' local bytes and DDP's gradient bucket
sizes; the list goes, as JSON, to `<out>/rank<N>.json`."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from lowrank.torch import Linear4bit, add_lora
from lowrank.torch.distributed import set_quant_storage, wrap_ddp, wrap_fsdp
from lowrank.torch.hf import all_linear_targets


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's shard


def held(case: dict) -> dict:
    """What this rank holds after one forward and backward pass of `case`'s wrapped model."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**case["config"])
    model = transformers.AutoModelForCausalLM.from_config(config)
    if case["method"] != "full":
        quant_type = "nf4" if case["method"] == "qlora" else None
        targets = case["targets"]
        targets = all_linear_targets(model) if targets == "all-linear" else targets
        add_lora(model, targets, r=case["r"], use_dora=case["dora"], quant_type=quant_type)
    if case["strategy"] == "fsdp":
        set_quant_storage(model, torch.uint8)  # 4-bit codes as a parameter FSDP can shard
        wrapped = wrap_fsdp(model, torch.device("cpu"))
    else:
        wrapped = wrap_ddp(model, torch.device("cpu"))
    ids = torch.randint(0, config.vocab_size, (2, 16))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    parameters = list(model.parameters())
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    report = {
        "parameters": sum(_local(p).numel() * p.element_size() for p in parameters),
        "4-bit buffers": sum(b.numel() * b.element_size() for m in quantized for b in m.buffers()),
        "gradients": sum(
            _local(p.grad).numel() * p.grad.element_size() for p in parameters if p.grad is not None
        ),
    }
    if case["strategy"] == "ddp":
        sizes = wrapped._get_ddp_logging_data()["bucket_sizes"]
        report["buckets"] = sum(int(size) for size in str(sizes).split(", "))
    return report


def main() -> None:
    job = json.loads(sys.argv[1])  # {"out": folder, "cases": [case, ...]}
    dist.init_process_group("gloo")
    reports = [held(case) for case in job["cases"]]
    Path(job["out"], f"rank{dist.get_rank()}.json").write_text(json.dumps(reports))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

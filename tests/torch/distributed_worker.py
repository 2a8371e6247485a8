"""One training run of a tiny LoRA (or QLoRA) model, as `tests/torch/test_distributed.py` launches
it: under `torchrun --nproc_per_node 2` (each rank runs this file) or as one plain process, the
reference with the same global batch.

    python -m torch.distributed.run --standalone --nproc_per_node 2 distributed_worker.py OUT \
        ddp fsdp ddp:nf4 fsdp:nf4:uint8        # runs: parallel[:quant_type[:quant_storage]]

The runs share one launch (the imports cost more than the training). For each run NAME every
rank writes OUT/NAME/rank<r>.json (the losses, what DDP's reducer registered, the shapes of
the FSDP shards it holds) and OUT/NAME/rank<r>.safetensors (its trainable tensors, whole:
gathered under FSDP). `run` called in one process is the reference.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lowrank.torch.distributed import launch_from_env, set_quant_storage, trainable_state
from lowrank.torch.model import add_lora
from lowrank.torch.train import TrainConfig, train

DIM = 16
EXAMPLES = 22  # micro-batches of 7, 7, 7, 1: the last leaves rank 1 without an example


class Block(nn.Module):
    """x + tanh(fc(x)): (batch, DIM) -> (batch, DIM)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class Tiny(nn.Module):
    """Two blocks in a ModuleList (FSDP shards each) and a linear head: (batch, DIM) -> (batch,)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x).squeeze(-1)


def run(
    out: Path,
    parallel: str | None,
    quant_type: str | None,
    quant_storage: str | None,
    device: str = "cpu",
    resume_from: str | None = None,
) -> None:
    """Train the tiny model (3 epochs, 6 steps) and write this rank's results to `out`; but
    for FSDP, with a checkpoint every 3 steps (out/run/checkpoint-3), or resume from one."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # the same model and data on every rank
    model = Tiny()
    add_lora(model, ["fc"], r=2, alpha=4, quant_type=quant_type)
    model.head.requires_grad_(True)  # a head trained in full, next to the adapters
    if quant_storage is not None:
        set_quant_storage(model, getattr(torch, quant_storage))
    with torch.no_grad():  # B = 0 would make A's first gradients zero: give B a start
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    examples = [(torch.randn(DIM), torch.randn(())) for _ in range(EXAMPLES)]
    held_out = torch.randn(5, DIM), torch.randn(5)
    config = TrainConfig(
        epochs=3,
        batch_size=7,
        grad_accum_steps=2,
        lr=1e-2,
        warmup_steps=1,
        max_grad_norm=0.5,
        bf16=False,  # float32 on CUDA too: the runs are compared within float32 tolerances
        device=device,
        progress=False,
        parallel=parallel,
        out_dir=str(out / "run"),
        save_steps=None if parallel == "fsdp" else 3,
        resume_from=resume_from,
    )
    registered = {}

    def loss_fn(runner: nn.Module, batch) -> torch.Tensor:
        if hasattr(runner, "_get_ddp_logging_data") and not registered:
            data = runner._get_ddp_logging_data()  # what DDP's reducer all-reduces
            registered["num_parameter_tensors"] = data["num_parameter_tensors"]
            registered["total_parameter_size_bytes"] = data["total_parameter_size_bytes"]
        return F.mse_loss(runner(batch[0]), batch[1])

    def evaluate(model: nn.Module) -> dict[str, float]:  # every rank, the whole held-out set
        x, y = (tensor.to(device) for tensor in held_out)
        return {"mse": F.mse_loss(model(x), y).item()}

    result = train(
        model,
        examples,
        config,
        loss_fn=loss_fn,
        evaluate=evaluate,
        collate=lambda items: tuple(torch.stack(column) for column in zip(*items, strict=True)),
    )
    rank = launch_from_env().rank
    state = trainable_state(model)  # gathered: the process group is still up (ours)
    shards = {
        name: tuple(p.to_local().shape)
        for name, p in model.named_parameters()
        if hasattr(p, "to_local")
    }
    record = {"losses": result.losses, "evals": result.evals, "steps": result.steps}
    record |= {"ddp": registered, "shards": shards}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    save_file(state, out / f"rank{rank}.safetensors")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", nargs="+", help="parallel[:quant_type[:quant_storage]]")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.device == "cuda":
        torch.cuda.set_device(launch_from_env().local_rank)
    # made here, not in train, so that it outlives each run (trainable_state gathers)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    for spec in args.runs:
        parallel, quant_type, quant_storage = (spec.split(":") + [None, None])[:3]
        out = args.out / spec.replace(":", "-")
        run(out, parallel, quant_type, quant_storage, args.device)
    dist.destroy_process_group()

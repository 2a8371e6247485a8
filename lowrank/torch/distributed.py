"""Training under torch.distributed: one process per GPU (or CPU), launched by `torchrun`.

PyTorch's own engine does the work (Li et al. 2020, "PyTorch Distributed: Experiences on
Accelerating Data Parallel Training", arXiv:2006.15704, for DDP; Zhao et al. 2023, "PyTorch
FSDP", arXiv:2304.11277, for FSDP; `fully_shard` is FSDP2, which shards each parameter on its
own as a DTensor). This file only reads the launch, wraps the model and splits the data:

    torchrun --nproc_per_node 2 train.py       # every process runs the same script
    parallel = Parallel.start("ddp", device)    # reads RANK, WORLD_SIZE, LOCAL_RANK
    runner = parallel.wrap(model)               # DDP, or fully_shard in place
    mine, weight = parallel.share(indices)      # this rank's part of each micro-batch

What is synchronised, and what is not:

- DDP (`wrap_ddp`): every rank holds the whole model; DDP registers only the parameters that
  require grad, so only the adapters' gradients are all-reduced (averaged). Frozen weights and
  buffers (QLoRA's 4-bit codes are buffers) are never all-reduced, and buffers are broadcast
  once at the start, not before every forward (the 4-bit base would travel every step).
- FSDP (`wrap_fsdp`, `fully_shard` on each block of every `nn.ModuleList`, then the root):
  every parameter, frozen base included, is split across ranks and gathered for a block's
  forward and backward; the adapters' gradients are reduce-scattered, so each rank keeps and
  updates its shard of AdamW's moments. Buffers are not sharded: to shard a 4-bit base, store
  its codes as parameters (`set_quant_storage`, `Linear4bit.quant_storage`, as bitsandbytes'
  `quant_storage` does for FSDP-QLoRA); the block scales stay replicated buffers.
- the data (`shard_micro_batch`): every rank draws the same global order and takes every
  world_size-th example of each micro-batch (as `DistributedSampler` does), and its mean loss
  is weighted by its share, so that the averaged gradient and the all-reduced loss are those
  of the whole micro-batch: the same run as one process with the same `batch_size`.

(About 450 lines, two thirds of them docstrings: the launch, the two wrappers, the gathering
of sharded weights for saving, the split of the data, and `Parallel`, which `train` calls.)
"""

import inspect
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lowrank._validate import PARALLEL_MODES
from lowrank.torch.qlora import QUANT_STORAGE_DTYPES, Linear4bit

__all__ = [
    "PARALLEL_MODES",
    "check_parallel",
    "Launch",
    "Parallel",
    "launch_from_env",
    "is_main_process",
    "shard_micro_batch",
    "wrap_ddp",
    "wrap_fsdp",
    "full_trainable",
    "trainable_state",
    "set_quant_storage",
]


def check_parallel(mode: object) -> str | None:
    """`TrainConfig.parallel`: None, or one of `PARALLEL_MODES` ("ddp", "fsdp").

    Examples:
        >>> from lowrank.torch.distributed import check_parallel
        >>> check_parallel("fsdp"), check_parallel(None)
        ('fsdp', None)
    """
    if mode is not None and mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {list(PARALLEL_MODES)} or None, got {mode!r}")
    return mode


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a run, as `torchrun` says it in the environment.

    Attributes:
        rank: this process's number among all processes, 0 to world_size - 1.
        local_rank: its number on this machine (the GPU it takes).
        world_size: the number of processes.

    Examples:
        >>> from lowrank.torch.distributed import Launch
        >>> Launch(rank=0, local_rank=0, world_size=1)
        Launch(rank=0, local_rank=0, world_size=1)
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch:
    """Read RANK, LOCAL_RANK and WORLD_SIZE (set by `torchrun`); unset: one process.

    Args:
        environ: the environment to read; None: `os.environ`.

    Returns:
        The `Launch`.

    Raises:
        ValueError: a variable that is not an integer, or ranks outside [0, world_size).

    Examples:
        >>> from lowrank.torch.distributed import launch_from_env
        >>> launch_from_env({})
        Launch(rank=0, local_rank=0, world_size=1)
        >>> launch_from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
        Launch(rank=3, local_rank=1, world_size=4)
        >>> launch_from_env({"RANK": "2", "WORLD_SIZE": "2"})
        Traceback (most recent call last):
        ...
        ValueError: RANK must be in [0, WORLD_SIZE=2), got 2
    """
    environ = os.environ if environ is None else environ
    values = {}
    for name, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)):
        text = environ.get(name, str(default))
        try:
            values[name] = int(text)
        except ValueError:
            raise ValueError(
                f"{name} must be an integer (torchrun sets it), got {text!r}"
            ) from None
    world_size = values["WORLD_SIZE"]
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be at least 1, got {world_size}")
    for name in ("RANK", "LOCAL_RANK"):
        if not 0 <= values[name] < world_size:
            raise ValueError(f"{name} must be in [0, WORLD_SIZE={world_size}), got {values[name]}")
    return Launch(values["RANK"], values["LOCAL_RANK"], world_size)


def is_main_process() -> bool:
    """True in rank 0 (or in a run of one process): the process that logs, prints and saves.

    Examples:
        >>> from lowrank.torch.distributed import is_main_process
        >>> is_main_process()  # no torchrun here
        True
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return launch_from_env().rank == 0


def shard_micro_batch(indices: list[int], rank: int, world_size: int) -> tuple[list[int], float]:
    """This rank's examples of one micro-batch, and the weight of their mean loss.

    Rank r takes `indices[r::world_size]`. With B examples in the micro-batch and B_r here, the
    weight is world_size * B_r / B: the gradient average that DDP and FSDP take over ranks,
    (1 / world_size) * sum_r weight_r * grad(mean loss_r), is then the gradient of the whole
    micro-batch's mean loss, even when B does not divide evenly. A rank left without an example
    (B < world_size) takes the first one with weight 0, so that it still runs the forward and
    backward that the collectives wait for.

    Args:
        indices: the example indices of the micro-batch, the same list on every rank.
        rank: this process's rank.
        world_size: the number of processes.

    Returns:
        (this rank's indices, the weight of their mean loss).

    Examples:
        >>> from lowrank.torch.distributed import shard_micro_batch
        >>> shard_micro_batch([5, 6, 7, 8, 9], 0, 2), shard_micro_batch([5, 6, 7, 8, 9], 1, 2)
        (([5, 7, 9], 1.2), ([6, 8], 0.8))
        >>> shard_micro_batch([5], 1, 2)  # nothing left for rank 1: a stand-in of weight 0
        ([5], 0.0)
    """
    mine = indices[rank::world_size]
    if not mine:
        return indices[:1], 0.0
    return mine, world_size * len(mine) / len(indices)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` under DistributedDataParallel: the adapters' gradients averaged over ranks.

    DDP registers only parameters that require grad (frozen weights and all buffers are left
    alone), and broadcasts rank 0's parameters and buffers once, so every rank starts alike.
    Buffers are not broadcast again before each forward (`forward_sync_buffers=False`, called
    `broadcast_buffers` before torch 2.13): LoRA's base is frozen, and QLoRA's 4-bit codes
    are buffers that would otherwise travel every step.

    Args:
        model: the model, on `device`, with a process group initialised.
        device: this rank's device (a CUDA device, or the CPU with gloo).

    Returns:
        The DDP wrapper: call it (pass it to the loss); the weights stay `model`'s.

    Examples:
        >>> from lowrank.torch.distributed import wrap_ddp
        >>> ddp = wrap_ddp(model, torch.device("cuda", 0))  # doctest: +SKIP
    """
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        no_buffer_sync = {"forward_sync_buffers": False}  # torch >= 2.13's name
    else:
        no_buffer_sync = {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)


def wrap_fsdp(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` sharded in place with FSDP2's `fully_shard`: each block, then the root.

    Blocks are the entries of every `nn.ModuleList` (a transformer's layers), so one block's
    weights are gathered at a time. Every parameter is sharded, frozen ones too (FSDP's memory
    saving: the base is split across ranks); buffers are replicated. Rank 0's trainable
    tensors are broadcast first, so the adapters start alike whatever each rank's seed was
    (the frozen base must already be the same everywhere: loaded from the same files).

    Args:
        model: the model, on `device`, with a process group initialised.
        device: this rank's device.

    Returns:
        `model` itself, now an FSDP module: its parameters are DTensors (`full_trainable`).

    Examples:
        >>> from lowrank.torch.distributed import wrap_fsdp
        >>> model = wrap_fsdp(model, torch.device("cuda", 0))  # doctest: +SKIP
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                dist.broadcast(parameter, src=0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = [
        block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module
    ]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextmanager
def full_trainable(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, `model`'s sharded trainable parameters are whole tensors.

    Under FSDP each trainable DTensor is gathered (`full_tensor()`, a collective: every rank
    must enter) and put in its place until the block ends; the frozen base stays sharded, so
    only the adapters' size is gathered. Without DTensors nothing changes.

    Args:
        model: the model (sharded or not).

    Yields:
        `model`.

    Examples:
        >>> from torch import nn
        >>> from lowrank.torch.distributed import full_trainable
        >>> model = nn.Linear(2, 2)
        >>> with full_trainable(model) as whole:
        ...     whole is model
        True
    """
    from torch.distributed.tensor import DTensor

    swapped = []
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if isinstance(parameter, DTensor) and parameter.requires_grad:
                whole = nn.Parameter(parameter.full_tensor().detach())
                module._parameters[name] = whole
                swapped.append((module, name, parameter))
    try:
        yield model
    finally:
        for module, name, parameter in swapped:
            module._parameters[name] = parameter


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor by name, whole (gathered under FSDP) and copied to the CPU.

    Args:
        model: the model (sharded or not).

    Returns:
        name -> tensor.

    Examples:
        >>> from torch import nn
        >>> from lowrank.torch.distributed import trainable_state
        >>> {name: tuple(t.shape) for name, t in trainable_state(nn.Linear(3, 2)).items()}
        {'weight': (2, 3), 'bias': (2,)}
    """
    with full_trainable(model):
        return {
            name: parameter.detach().cpu().clone()
            for name, parameter in model.named_parameters()
            if parameter.requires_grad
        }


def set_quant_storage(model: nn.Module, quant_storage: torch.dtype | None) -> int:
    """Store the codes of every `Linear4bit` in `model` as `quant_storage` (see
    `Linear4bit.set_quant_storage`): a dtype makes them frozen parameters that FSDP shards,
    None puts them back in uint8 buffers. The decoded weights do not change.

    Args:
        model: the model.
        quant_storage: None, or one of `lowrank.torch.qlora.QUANT_STORAGE_DTYPES`.

    Returns:
        How many layers were changed.

    Raises:
        ValueError: `quant_storage` is not None nor one of those dtypes (nothing changed).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.distributed import set_quant_storage
        >>> from lowrank.torch.qlora import Linear4bit
        >>> model = nn.Sequential(Linear4bit(8, 8), nn.ReLU(), Linear4bit(8, 2))
        >>> set_quant_storage(model, torch.uint8)
        2
        >>> sorted(name for name, _ in model.named_parameters())
        ['0.bias', '0.weight_packed', '2.bias', '2.weight_packed']
    """
    if quant_storage is not None and quant_storage not in QUANT_STORAGE_DTYPES:
        names = ["None"] + [str(dtype) for dtype in QUANT_STORAGE_DTYPES]
        raise ValueError(f"quant_storage must be one of {names}, got {quant_storage!r}")
    layers = [module for module in model.modules() if isinstance(module, Linear4bit)]
    for layer in layers:
        layer.set_quant_storage(quant_storage)
    return len(layers)


class Parallel:
    """One process's part in a training run: its rank, device and model wrapper.

    `Parallel.start` reads the launch; in a run of one process every method is the identity
    (no wrapper, all examples, weight 1), so `train` reads the same either way.

    Attributes:
        mode: "ddp", "fsdp", or None in a run of one process.
        launch: the `Launch` (rank, local_rank, world_size).
        device: the device this rank computes on.
        is_main: True on rank 0, which logs, shows progress and writes files.

    Examples:
        >>> import torch
        >>> from lowrank.torch.distributed import Parallel
        >>> one = Parallel.start(None, torch.device("cpu"))  # no torchrun: one process
        >>> one.mode, one.is_main, one.share([3, 1, 2])
        (None, True, ([3, 1, 2], 1.0))
        >>> Parallel.start("zero3", torch.device("cpu"))
        Traceback (most recent call last):
        ...
        ValueError: parallel must be one of ['ddp', 'fsdp'] or None, got 'zero3'
    """

    def __init__(self, mode: str | None, launch: Launch, device: torch.device, owns_group: bool):
        self.mode = mode
        self.launch = launch
        self.device = device
        self.is_main = launch.rank == 0
        self._owns_group = owns_group

    @classmethod
    def start(cls, mode: str | None, device: torch.device) -> "Parallel":
        """Join the run `torchrun` launched: with WORLD_SIZE > 1, take this rank's GPU (a CUDA
        `device` without an index becomes cuda:LOCAL_RANK) and initialise the process group
        (nccl on CUDA, gloo on the CPU) unless it already is.

        Args:
            mode: "ddp", "fsdp", or None (DDP when there are several processes).
            device: where to compute (CUDA or CPU).

        Returns:
            The `Parallel`.

        Raises:
            ValueError: an unknown mode, a bad launch environment, or a process group of
                another size than WORLD_SIZE.
        """
        mode = check_parallel(mode)
        launch = launch_from_env()
        if launch.world_size == 1:
            return cls(None, launch, device, owns_group=False)
        if device.type == "cuda":
            index = launch.local_rank if device.index is None else device.index
            device = torch.device("cuda", index)
            torch.cuda.set_device(device)
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if dist.get_world_size() != launch.world_size:
            raise ValueError(
                f"the process group has {dist.get_world_size()} processes but WORLD_SIZE is "
                f"{launch.world_size}"
            )
        return cls(mode or "ddp", launch, device, owns_group)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call in the loss: `wrap_ddp`'s wrapper, `wrap_fsdp`'s (in place), or
        `model` itself in one process."""
        if self.mode == "ddp":
            return wrap_ddp(model, self.device)
        if self.mode == "fsdp":
            return wrap_fsdp(model, self.device)
        return model

    def share(self, indices: list[int]) -> tuple[list[int], float]:
        """This rank's part of a micro-batch and its loss weight (`shard_micro_batch`)."""
        return shard_micro_batch(indices, self.launch.rank, self.launch.world_size)

    def sync(self, runner: nn.Module, last: bool):
        """A context for one micro-batch's forward and backward: gradients are averaged over
        ranks only after the `last` micro-batch of a step (DDP's `no_sync`, FSDP's
        `set_requires_gradient_sync`); before that each rank accumulates its own."""
        if self.mode == "ddp" and not last:
            return runner.no_sync()
        if self.mode == "fsdp":
            runner.set_requires_gradient_sync(last)
        return nullcontext()

    def mean(self, value: float) -> float:
        """`value` summed over ranks and divided by their number (float64); in one process,
        `value` itself."""
        if self.mode is None:
            return value
        total = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item() / self.launch.world_size

    def scalar(self, value: torch.Tensor) -> float:
        """A 0-d tensor's value as a float (under FSDP, a norm is a replicated DTensor)."""
        if self.mode == "fsdp":
            value = value.full_tensor()
        return value.item()

    def barrier(self) -> None:
        """Wait for every rank (after rank 0 wrote files the others may read)."""
        if self.mode is not None:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if `start` created it."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

"""The training loop, written out: what `Trainer` libraries do, in one readable function.

    config = TrainConfig(epochs=2, batch_size=32, lr=1e-3, out_dir="runs/lora")
    result = train(model, train_examples, config, loss_fn=loss_fn, collate=collate,
                   evaluate=lambda m: {"accuracy": accuracy(m, test_examples)})

What happens, step by step:

- seeding: Python's and torch's generators are seeded (init, dropout), and the shuffling has its own
  generator, so a run repeats exactly on the same machine.
- the optimizer is AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization",
  arXiv:1711.05101) over the parameters that require grad, and only those. With LoRA
  that is A and B (plus a task head): the optimizer's two moments exist only for them, which
  is most of LoRA's memory saving (Hu et al. 2021, arXiv:2106.09685, section 4.2).
  With `loraplus_lr_ratio` (LoRA+, Hayou et al. 2024, arXiv:2402.12354) B trains at that
  many times the learning rate of A (`parameter_groups`).
- the learning rate rises linearly from 0 over the warmup steps (`warmup_steps`, or
  `warmup_ratio` of all steps), then follows `schedule` (`SCHEDULES`): half a cosine down to 0
  at the last step (`cosine_with_warmup`, transformers' `get_cosine_schedule_with_warmup`;
  cosine annealing as in SGDR, Loshchilov & Hutter 2017, arXiv:1608.03983), a straight line
  down to 0 (`linear_with_warmup`) or the peak rate to the end (`constant_with_warmup`).
- gradient accumulation: `grad_accum_steps` micro-batches of `batch_size` examples are
  back-propagated (each loss divided by their number) before one optimizer step, so the step
  sees the mean gradient of batch_size * grad_accum_steps examples.
- gradient clipping: the trainable gradients are rescaled when their global L2 norm exceeds
  `max_grad_norm`.
- mixed precision: on CUDA the forward and backward run under bfloat16 autocast (same range as
  float32, so no loss scaling is needed); on CPU everything stays in the model's dtype.
- gradient checkpointing (optional): activations inside each transformer block are recomputed
  in the backward pass instead of stored, trading about one extra forward for memory.
- after each epoch, `evaluate(model)` (no grad, eval mode) returns metrics; every optimizer
  step and every evaluation is appended as one JSON line to `out_dir/log.jsonl`.
- at the end the trainable weights are written to `out_dir` (`save`, by default
  `checkpoint.save_trainable`): LoRA adapters in the PEFT layout (`peft_format.save_adapter`),
  and any other trainable tensors (the whole model in full fine-tuning) to
  `trainable.safetensors`.
- checkpoints: every `save_steps` optimizer steps to `out_dir/checkpoint-<step>`, and after
  each epoch with `save_every_epoch` to `out_dir/epoch-<n>`, the weights, AdamW's moments, the
  schedule's position, the random generators' states and the position in the data are
  written (`checkpoint.save_checkpoint`); `resume_from` one of them continues the run from
  that step as if it had never stopped: on the CPU, the same final weights bit for bit.
- several processes (`torchrun --nproc_per_node N`, `distributed.py`): DDP by default, or
  FSDP2 with `parallel="fsdp"`. `batch_size` stays the size of the whole micro-batch: each rank
  takes its share of it, the gradients and the logged loss are averaged over ranks, so the
  run is the one a single process would make with the same settings (up to the order of
  float additions). Rank 0 alone logs, shows progress and writes files; `evaluate` runs on
  every rank (FSDP needs every rank in each forward).

(About 600 lines, a third of them docstrings: the loop, its checkpoints and their resumption
read together; the file format of a checkpoint is `checkpoint.py`.)

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) needs nothing special here: its base weights
are frozen 4-bit buffers, and only the adapters reach the optimizer.
"""

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank._validate import check_positive_number
from lowrank.torch.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    save_trainable,
    trainable_parameters,
)
from lowrank.torch.distributed import Parallel, check_parallel, full_trainable
from lowrank.torch.model import lora_layers

__all__ = [
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "seed_everything",
    "default_device",
    "torch_threads",
    "cosine_with_warmup",
    "linear_with_warmup",
    "constant_with_warmup",
    "enable_gradient_checkpointing",
    "move_to",
    "parameter_groups",
    "train",
]


@dataclass
class TrainConfig:
    """Every knob of `train`, with defaults that suit LoRA on a small model.

    Checked when made: counts must be positive ints, lr and max_grad_norm positive,
    warmup_ratio in [0, 1), warmup_steps a non-negative int, schedule one of `SCHEDULES`,
    loraplus_lr_ratio None or a positive number, parallel None, "ddp" or "fsdp" (and "fsdp"
    without checkpoints); ValueError otherwise. `parallel` matters only under torchrun.

    Examples:
        >>> from lowrank.torch.train import TrainConfig
        >>> config = TrainConfig(epochs=2, batch_size=4, grad_accum_steps=2, progress=False)
        >>> config.batch_size * config.grad_accum_steps  # examples per optimizer step
        8
        >>> TrainConfig(lr=0)
        Traceback (most recent call last):
            ...
        ValueError: lr must be positive, got 0
    """

    epochs: int = 1
    batch_size: int = 16  # examples per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4  # peak learning rate, reached at the end of warmup
    schedule: str = "cosine"  # after warmup: "cosine", "linear" (both to 0) or "constant"
    warmup_ratio: float = 0.06  # share of all optimizer steps spent warming up
    warmup_steps: int | None = None  # optimizer steps of warmup; None: warmup_ratio of them
    weight_decay: float = 0.0  # AdamW's decoupled decay, on every trainable tensor
    loraplus_lr_ratio: float | None = None  # LoRA+: B's lr = this * lr; None: plain LoRA
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None: no clipping
    bf16: bool = True  # bfloat16 autocast when on CUDA; ignored on CPU
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str | None = None  # None: CUDA if available, else CPU
    out_dir: str | None = None  # where log.jsonl and the weights go; None: nothing written
    save_every_epoch: bool = False  # also write a checkpoint to out_dir/epoch-<n>
    save_steps: int | None = None  # a checkpoint every this many steps: out_dir/checkpoint-<n>
    resume_from: str | None = None  # a checkpoint folder to continue from (the same setup)
    log_every: int = 1  # optimizer steps between log lines
    progress: bool = True  # tqdm progress bar
    parallel: str | None = None  # under torchrun: "ddp" (None means it) or "fsdp"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum_steps", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or self.warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps must be a non-negative int, got {self.warmup_steps!r}")
        if self.save_steps is not None and (
            isinstance(self.save_steps, bool)
            or not isinstance(self.save_steps, int)
            or self.save_steps < 1
        ):
            raise ValueError(f"save_steps must be a positive int or None, got {self.save_steps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")
        if self.loraplus_lr_ratio is not None:
            check_positive_number("loraplus_lr_ratio", self.loraplus_lr_ratio)
        check_parallel(self.parallel)
        checkpoints = self.save_steps or self.save_every_epoch or self.resume_from
        if self.parallel == "fsdp" and checkpoints:
            raise ValueError(
                "checkpoints (save_steps, save_every_epoch, resume_from) need parallel='ddp': "
                "under FSDP AdamW's moments are sharded across ranks, and checkpoint.py writes "
                "and reads whole tensors"
            )


@dataclass
class TrainResult:
    """What a run produced: per-step losses, per-epoch metrics, time, and where files went.

    Examples:
        >>> from lowrank.torch.train import TrainResult
        >>> TrainResult()  # what `train` fills in as it goes
        TrainResult(losses=[], evals=[], steps=0, wall_time_s=0.0, out_dir=None)
    """

    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step
    evals: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    steps: int = 0
    wall_time_s: float = 0.0
    out_dir: str | None = None


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's (CPU and CUDA) global generators: weight init, dropout.

    Examples:
        >>> import torch
        >>> from lowrank.torch.train import seed_everything
        >>> seed_everything(0)
        >>> first = torch.rand(3)
        >>> seed_everything(0)
        >>> torch.equal(torch.rand(3), first)
        True
    """
    random.seed(seed)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """CUDA if it is available, else the CPU: where `train` runs when `config.device` is None.

    Examples:
        >>> from lowrank.torch.train import default_device
        >>> default_device().type in ("cuda", "cpu")
        True
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch CPU threads, then restore the previous count (on error too).

    The demos and timings compute on small batches: there, threads only wait for each other,
    and on cores other processes share, 2 threads made a MiniLM step 30x slower (measured).

    Examples:
        >>> import torch
        >>> from lowrank.torch.train import torch_threads
        >>> before = torch.get_num_threads()
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning-rate multiplier at optimizer step `step` (0-based): 0 -> 1 linearly over
    `warmup_steps`, then 1 -> 0 along half a cosine at `total_steps`.

    Examples:
        >>> from lowrank.torch.train import cosine_with_warmup
        >>> [round(cosine_with_warmup(step, 10, 2), 4) for step in range(0, 11, 2)]
        [0.0, 1.0, 0.8536, 0.5, 0.1464, 0.0]
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def linear_with_warmup(step: int, total_steps: int, warmup_steps: int) -> float:
    """The multiplier at step `step`: 0 -> 1 linearly over `warmup_steps`, then 1 -> 0 in a
    straight line at `total_steps` (transformers' `get_linear_schedule_with_warmup`).

    Examples:
        >>> from lowrank.torch.train import linear_with_warmup
        >>> [round(linear_with_warmup(step, 10, 2), 4) for step in range(0, 11, 2)]
        [0.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def constant_with_warmup(step: int, total_steps: int, warmup_steps: int) -> float:
    """The multiplier at step `step`: 0 -> 1 linearly over `warmup_steps`, then 1 to the end
    (transformers' `get_constant_schedule_with_warmup`).

    Examples:
        >>> from lowrank.torch.train import constant_with_warmup
        >>> [round(constant_with_warmup(step, 10, 2), 4) for step in range(0, 11, 2)]
        [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    """
    return step / max(1, warmup_steps) if step < warmup_steps else 1.0


# TrainConfig.schedule -> the learning-rate multiplier (step, total_steps, warmup_steps) -> float
SCHEDULES = {
    "cosine": cosine_with_warmup,
    "linear": linear_with_warmup,
    "constant": constant_with_warmup,
}


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation recomputation in the outermost Hugging Face model inside `model`.

    Non-reentrant checkpointing (use_reentrant=False) computes correct gradients even when the
    block's inputs do not require grad, which is the case when the embeddings are frozen.

    Examples:
        >>> from torch import nn
        >>> from lowrank.torch.hf import load_model, minilm_path
        >>> from lowrank.torch.train import enable_gradient_checkpointing
        >>> model = load_model(minilm_path())  # doctest: +SKIP
        >>> enable_gradient_checkpointing(model)  # doctest: +SKIP
        >>> enable_gradient_checkpointing(nn.Linear(8, 8))
        Traceback (most recent call last):
            ...
        ValueError: gradient checkpointing needs a Hugging Face model ...
    """
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            return
    raise ValueError(
        "gradient checkpointing needs a Hugging Face model (one with gradient_checkpointing_enable)"
    )


def move_to(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor inside (dicts, lists, tuples) moved to `device`.

    Examples:
        >>> import torch
        >>> from lowrank.torch.train import move_to
        >>> batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "extra": [torch.ones(2)]}
        >>> moved = move_to(batch, torch.device("meta"))
        >>> moved["input_ids"].device, moved["extra"][0].device
        (device(type='meta'), device(type='meta'))
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: move_to(value, device) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(move_to(value, device) for value in batch)
    return batch


def parameter_groups(
    model: nn.Module, parameters: dict[str, nn.Parameter], lr: float, loraplus_lr_ratio: float
) -> list[dict]:
    """The optimizer's two parameter groups for LoRA+ (Hayou et al. 2024, arXiv:2402.12354).

    As PEFT's `create_loraplus_optimizer` (and the paper's reference code): every LoRA B
    factor and every other trainable tensor with one dimension (the biases and norms of a
    head trained in full) at lr * loraplus_lr_ratio; the rest (A factors, other matrices) at
    lr. The paper's argument: in a wide layer B must move faster than A for the update B A to
    learn features efficiently. One deliberate difference: PEFT puts both factors of an
    adapted embedding at a fixed `loraplus_lr_embedding` (1e-6 by default); here an
    embedding's B is a B like any other and its A an A.

    `parameters` is name -> trainable tensor (`checkpoint.trainable_parameters`); the groups
    are [A group, B group], in the order of `parameters` inside each.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.checkpoint import trainable_parameters
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.train import parameter_groups
        >>> model = add_lora(nn.Sequential(OrderedDict(fc=nn.Linear(4, 4))), ["fc"], r=2)
        >>> groups = parameter_groups(model, trainable_parameters(model), 1e-3, 16)
        >>> [(group["lr"], [tuple(p.shape) for p in group["params"]]) for group in groups]
        [(0.001, [(2, 4)]), (0.016, [(4, 2)])]
    """
    b_factors = {id(B) for _, layer in lora_layers(model) for B in layer.B.values()}
    fast = [p for p in parameters.values() if id(p) in b_factors or p.ndim == 1]
    fast_ids = {id(p) for p in fast}
    slow = [p for p in parameters.values() if id(p) not in fast_ids]
    return [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * loraplus_lr_ratio}]


def train(
    model: nn.Module,
    examples: Sequence,
    config: TrainConfig,
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    collate: Callable[[list], Any],
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    save: Callable[[nn.Module, Path], object] = save_trainable,
) -> TrainResult:
    """Train the parameters of `model` that require grad on `examples`; see the module doc.

    AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101) with linear warmup and cosine decay,
    gradient accumulation and clipping; with LoRA only A and B (and a task head) train, with
    LoRA+ B faster (`config.loraplus_lr_ratio`, `parameter_groups`).

    Args:
        model: the model; moved to the device, left in eval mode at the end.
        examples: anything indexable with a length (a list of dicts, a Dataset).
        config: epochs, batch size, learning rate and the rest (`TrainConfig`).
        loss_fn: `loss_fn(model, batch)` is the mean loss of the batch, a scalar tensor
            (under DDP `model` is the DDP wrapper: call it, do not read its attributes).
        collate: turns a list of examples into a batch (tensors, or dicts/tuples of tensors);
            the batch is moved to the device for you.
        evaluate: `evaluate(model)` gives metrics after each epoch, called under no_grad in
            eval mode. None: no evaluation.
        save: `save(model, out_dir)` writes the trained weights at the end (checkpoints are
            always `checkpoint.save_checkpoint`'s).

    Returns:
        The per-step losses, per-epoch metrics and wall time (`TrainResult`).

    Examples:
        >>> from collections import OrderedDict
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.train import TrainConfig, train
        >>> _ = torch.manual_seed(0)
        >>> examples = [(torch.randn(4), torch.randn(1)) for _ in range(8)]  # (x, y) pairs
        >>> model = add_lora(nn.Sequential(OrderedDict(fc=nn.Linear(4, 1))), ["fc"], r=1)
        >>> W = model.fc.base_layer.weight.detach().clone()
        >>> config = TrainConfig(epochs=2, batch_size=4, lr=1e-2, device="cpu", progress=False)
        >>> result = train(
        ...     model,
        ...     examples,
        ...     config,
        ...     loss_fn=lambda model, batch: F.mse_loss(model(batch[0]), batch[1]),
        ...     collate=lambda items: tuple(torch.stack(column) for column in zip(*items)),
        ... )
        >>> result.steps, len(result.losses)  # 2 epochs of 8 / 4 = 2 optimizer steps
        (4, 4)
        >>> torch.equal(model.fc.base_layer.weight, W)  # the frozen base did not move
        True
    """
    if len(examples) == 0:
        raise ValueError("no training examples")
    seed_everything(config.seed)
    device = torch.device(config.device) if config.device else default_device()
    parallel = Parallel.start(config.parallel, device)  # one process: does nothing
    device = parallel.device  # under torchrun on CUDA: cuda:LOCAL_RANK
    model.to(device)
    if not trainable_parameters(model):
        raise ValueError("the model has no parameters that require grad: nothing to train")
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    runner = parallel.wrap(model)  # what the loss calls: DDP, FSDP (in place) or model
    parameters = trainable_parameters(model)  # under FSDP: the shards
    groups = list(parameters.values())  # one group at lr; LoRA+: B at lr * ratio
    if config.loraplus_lr_ratio is not None:
        groups = parameter_groups(model, parameters, config.lr, config.loraplus_lr_ratio)
    optimizer = torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    micro_batches_per_epoch = math.ceil(len(examples) / config.batch_size)
    steps_per_epoch = math.ceil(micro_batches_per_epoch / config.grad_accum_steps)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = config.warmup_steps
    if warmup_steps is None:
        warmup_steps = round(config.warmup_ratio * total_steps)
    schedule = SCHEDULES[config.schedule]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule(step, total_steps, warmup_steps)
    )
    autocast = torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16 and device.type == "cuda"
    )
    shuffler = torch.Generator().manual_seed(config.seed)  # the data order, on its own
    out_dir = Path(config.out_dir) if config.out_dir else None
    result = TrainResult(out_dir=str(out_dir) if out_dir else None)
    start_epoch, skip = 1, 0  # where the run begins: epoch, optimizer steps done in it
    if config.resume_from:
        state, generators = load_checkpoint(model, config.resume_from, optimizer, scheduler)
        _check_same_run(state, config, len(examples), config.resume_from)
        result.losses, result.evals, result.steps = state["losses"], state["evals"], state["step"]
        start_epoch, skip = state["epoch"], state["steps_in_epoch"]
        shuffler.set_state(generators["shuffler"])  # as at the start of that epoch
        torch.set_rng_state(generators["torch"])  # dropout goes on as it would have
        if "cuda" in generators and device.type == "cuda":
            torch.cuda.set_rng_state(generators["cuda"], device)
        version, internal, gauss = state["python_random"]
        random.setstate((version, tuple(internal), gauss))
    log = None
    if out_dir is not None and parallel.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log = open(out_dir / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed below)
        _write_line(log, {"event": "config", **asdict(config), "trainable": list(parameters)})
        if config.resume_from:
            _write_line(log, {"event": "resume", "from": config.resume_from, "step": result.steps})

    def checkpoint(name: str, epoch: int, steps_in_epoch: int, epoch_start: torch.Tensor) -> None:
        generators = {"shuffler": epoch_start, "torch": torch.get_rng_state()}
        if device.type == "cuda":
            generators["cuda"] = torch.cuda.get_rng_state(device)
        state = {
            "step": result.steps,
            "epoch": epoch,
            "steps_in_epoch": steps_in_epoch,
            "losses": result.losses,
            "evals": result.evals,
            "examples": len(examples),
            "config": json.loads(json.dumps(asdict(config), default=str)),
            "python_random": random.getstate(),
        }
        if parallel.is_main:  # DDP: weights and moments are the same on every rank
            save_checkpoint(model, out_dir / name, optimizer, scheduler, state, generators)
        parallel.barrier()

    start = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        initial=result.steps,
        desc="train",
        disable=not (config.progress and parallel.is_main),
        leave=False,
    )
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            epoch_start = shuffler.get_state()
            order = torch.randperm(len(examples), generator=shuffler).tolist()
            micro_batches = [
                order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)
            ]
            groups = [
                micro_batches[i : i + config.grad_accum_steps]
                for i in range(0, len(micro_batches), config.grad_accum_steps)
            ]
            first = skip if epoch == start_epoch else 0  # steps a resumed run has done
            model.train()
            for index in range(first, len(groups)):
                group = groups[index]
                step_loss = 0.0
                for position, indices in enumerate(group):
                    mine, weight = parallel.share(indices)  # one process: all, weight 1
                    batch = move_to(collate([examples[i] for i in mine]), device)
                    with parallel.sync(runner, last=position == len(group) - 1):
                        with autocast:
                            loss = loss_fn(runner, batch) * weight / len(group)  # group mean
                        loss.backward()
                    step_loss += loss.item()
                step_loss = parallel.mean(step_loss)  # the whole micro-batches' mean
                grad_norm = None
                if config.max_grad_norm is not None:
                    norm = nn.utils.clip_grad_norm_(parameters.values(), config.max_grad_norm)
                    grad_norm = parallel.scalar(norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                result.steps += 1
                result.losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", epoch=epoch)
                if log is not None and result.steps % config.log_every == 0:
                    _write_line(
                        log,
                        {
                            "event": "step",
                            "step": result.steps,
                            "epoch": epoch,
                            "loss": step_loss,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "time_s": time.perf_counter() - start,
                        },
                    )
                every = config.save_steps
                if out_dir is not None and every is not None and result.steps % every == 0:
                    checkpoint(f"checkpoint-{result.steps}", epoch, index + 1, epoch_start)
            evaluated = False
            if evaluate is not None and len(result.evals) < epoch:  # not done before a resume
                model.eval()
                with torch.no_grad(), autocast:
                    metrics = {key: float(value) for key, value in evaluate(model).items()}
                result.evals.append(metrics)
                evaluated = True
                if log is not None:
                    _write_line(log, {"event": "eval", "epoch": epoch, **metrics})
            if out_dir is not None and config.save_every_epoch:
                done_now = first < len(groups) or evaluated  # else: resumed from its end
                if done_now or not (out_dir / f"epoch-{epoch}").exists():
                    checkpoint(f"epoch-{epoch}", epoch, len(groups), epoch_start)
    finally:
        bar.close()
        if log is not None:
            log.close()
    model.eval()
    result.wall_time_s = time.perf_counter() - start
    if out_dir is not None:
        with full_trainable(model):  # FSDP: the adapters gathered (on every rank)
            if parallel.is_main:
                save(model, out_dir)
        parallel.barrier()
    parallel.close()
    return result


# Settings that decide a run's trajectory: a resumed run must have the checkpoint's.
_SAME_RUN = (
    "epochs",
    "batch_size",
    "grad_accum_steps",
    "lr",
    "schedule",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
    "loraplus_lr_ratio",
    "betas",
    "eps",
    "max_grad_norm",
    "seed",
)


def _check_same_run(state: dict, config: TrainConfig, examples: int, folder: str) -> None:
    """ValueError naming every setting in which this run differs from the checkpoint's."""
    now = json.loads(json.dumps(asdict(config), default=str))
    differ = [
        f"{key} {state['config'].get(key)!r} -> {now[key]!r}"
        for key in _SAME_RUN
        if state["config"].get(key) != now[key]
    ]
    if state["examples"] != examples:
        differ.append(f"examples {state['examples']} -> {examples}")
    if differ:
        raise ValueError(
            f"cannot resume from {folder}: this run differs from the one that wrote it in "
            f"{'; '.join(differ)} (a resumed run must continue the same run)"
        )


def _write_line(log, record: dict) -> None:
    """Append one JSON object as a line and flush, so a crash leaves a readable log."""
    log.write(json.dumps(record, default=str) + "\n")
    log.flush()

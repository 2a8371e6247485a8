"""What training writes, as files (a file format): `save_trainable` / `load_trainable`, and
the resumable checkpoints `save_checkpoint` / `load_checkpoint`.

A training run's folder holds the LoRA adapters (Hu et al. 2021, arXiv:2106.09685) in the
Hugging Face PEFT layout (`peft_format.py`: adapter_config.json + adapter_model.safetensors,
loadable by `PeftModel.from_pretrained`) and every other trainable tensor (a classification
head, or the whole model in full fine-tuning) under its parameter name in
`trainable.safetensors` (`TRAINABLE_NAME`); a module the adapter trains in full
(`modules_to_save`, a classification head) goes into the adapter file, as PEFT saves it. The
folder changes as a unit (`lowrank._folders`); a load checks everything (`peft_load.py` for
the adapter) before the model changes, and puts the model back on failure.

A checkpoint, from which `train` can resume, is that folder plus the rest of the run's state,
with no pickle (unpickling runs code; `torch.save` pickles):

    training_state.safetensors   optimizer.<i>.<key>   AdamW's exp_avg, exp_avg_sq, step for
                                                        trainable parameter i
                                 rng.<name>            random generator states (uint8)
    trainer_state.json           the step, epoch and position in it, the losses and metrics so
                                 far, the config, the parameter names in optimizer order, the
                                 optimizer's param_groups, the scheduler's state, Python's
                                 random state (what the loop in `train.py` puts in `state`)

(About 350 lines, nearly half of them docstrings: the weights and the checkpoint around them share
their writer and their checks, and read best together.)
"""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowrank._folders import reading_folder, write_folder_atomically
from lowrank.torch import peft_format, peft_load
from lowrank.torch.model import active_adapter, lora_layers
from lowrank.torch.modules_to_save import saved_modules

__all__ = [
    "TRAINABLE_NAME",
    "TRAINER_STATE_NAME",
    "TRAINING_STATE_NAME",
    "trainable_parameters",
    "save_trainable",
    "load_trainable",
    "save_checkpoint",
    "load_checkpoint",
]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the optimizer will update, by qualified name.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.checkpoint import trainable_parameters
        >>> from lowrank.torch.model import add_lora
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), head=nn.Linear(8, 2)))
        >>> model = add_lora(model, ["q"], r=2)
        >>> _ = model.head.requires_grad_(True)  # a new head trains in full
        >>> {name: tuple(p.shape) for name, p in trainable_parameters(model).items()}
        {'q.A.default': (2, 8), 'q.B.default': (8, 2), 'head.weight': (2, 8), 'head.bias': (2,)}
    """
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


TRAINABLE_NAME = "trainable.safetensors"  # the trainable tensors that are not LoRA factors
TRAINER_STATE_NAME = "trainer_state.json"  # a checkpoint's step, position, config, schedule
TRAINING_STATE_NAME = "training_state.safetensors"  # a checkpoint's optimizer and RNG tensors


def save_trainable(
    model: nn.Module, folder: str | os.PathLike, *, base_model_name_or_path: str | None = None
) -> Path:
    """Write what training changed: LoRA adapters (PEFT layout, as `save_adapter` writes them)
    and every other trainable tensor (e.g. a classifier head) to `trainable.safetensors`.

    The adapter written is the active one (the one whose factors train); it loads as
    "default", as any PEFT adapter does. The folder changes as a unit
    (`lowrank._folders.write_folder_atomically`): a process killed at any instant leaves the old
    adapter + head or the new ones, never a mix, and files of a kind this save does not write
    this time (an old head) do not survive it. Other entries in the folder stay: `train` writes
    `log.jsonl` and `epoch-<n>/` into the same folder, and the adapter files stay at its top,
    so `PeftModel.from_pretrained(model, out_dir)` works on a training run's folder.

    `base_model_name_or_path` goes into adapter_config.json (PEFT's AutoPeftModel loads the
    base from it). Returns the folder's path.

    Examples:
        >>> import tempfile
        >>> from collections import OrderedDict
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from lowrank.torch.checkpoint import save_trainable
        >>> from lowrank.torch.model import add_lora
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), head=nn.Linear(8, 2)))
        >>> model = add_lora(model, ["q"], r=2)
        >>> _ = model.head.requires_grad_(True)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folder = save_trainable(model, Path(tmp) / "run")
        ...     sorted(path.name for path in folder.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors', 'trainable.safetensors']
    """
    write = _trainable_writer(model, base_model_name_or_path)
    return write_folder_atomically(folder, write, owns=(*peft_format.ADAPTER_FILES, TRAINABLE_NAME))


def _trainable_writer(model: nn.Module, base_model_name_or_path: str | None):
    """What `save_trainable` writes, gathered now; the returned function writes it."""
    trainable = trainable_parameters(model)
    adapter_ids = _adapter_parameter_ids(model)
    write_adapter = None
    if any(id(p) in adapter_ids for p in trainable.values()):
        adapter = active_adapter(model) or "default"
        write_adapter = peft_format.adapter_writer(model, adapter, base_model_name_or_path)
    others = {
        name: p.detach().to("cpu").contiguous()
        for name, p in trainable.items()
        if id(p) not in adapter_ids
    }

    def write(new: Path) -> None:
        if write_adapter is not None:
            write_adapter(new)
        if others:
            save_file(others, new / TRAINABLE_NAME)

    return write


def load_trainable(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Read back what `save_trainable` wrote into a model of the same architecture.

    Everything is checked before the model changes: the adapter (as `load_adapter` checks
    it) and every tensor of `trainable.safetensors` (a parameter of that name exists, or will
    once the adapter's layers are wrapped; the shape is the same exactly, with no
    broadcasting; floating point; finite). On any error the model is exactly as before.
    The folder is read as one version, so a concurrent save cannot mix two of them.

    Examples:
        >>> import copy
        >>> import tempfile
        >>> from collections import OrderedDict
        >>> from pathlib import Path
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.checkpoint import load_trainable, save_trainable
        >>> from lowrank.torch.model import add_lora
        >>> _ = torch.manual_seed(0)
        >>> base = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), head=nn.Linear(8, 2)))
        >>> trained = add_lora(copy.deepcopy(base), ["q"], r=2)
        >>> _ = trained.head.requires_grad_(True)
        >>> _ = nn.init.normal_(trained.q.B["default"])  # as if trained
        >>> _ = nn.init.normal_(trained.head.weight)
        >>> x = torch.randn(3, 8)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = save_trainable(trained, Path(tmp) / "run")
        ...     loaded = load_trainable(copy.deepcopy(base), Path(tmp) / "run")
        >>> type(loaded.q).__name__, torch.equal(loaded(x), trained(x))
        ('LoRALinear', True)
    """
    with reading_folder(folder) as path:
        has_adapter = (path / peft_format.CONFIG_NAME).exists()
        extra = path / TRAINABLE_NAME
        if not has_adapter and not extra.exists():
            raise ValueError(
                f"{path} holds neither {peft_format.CONFIG_NAME} nor {TRAINABLE_NAME}: "
                "nothing to load"
            )
        adapter = peft_format.read_adapter_files(path) if has_adapter else None
        tensors = peft_format.read_tensors(extra) if extra.exists() else {}
    plan = peft_load.plan_load(model, path, *adapter) if adapter is not None else None
    wrapped = {name for name, *_ in plan.layers} if plan is not None and not plan.existing else ()
    targets = _trainable_targets(model, tensors, wrapped, extra)
    if plan is not None:
        peft_load.apply_plan(model, plan, targets)  # puts everything back on failure
        return model
    snapshot = [(parameter, parameter.detach().clone()) for parameter, _ in targets]
    try:
        with torch.no_grad():
            for parameter, value in targets:
                parameter.copy_(value)
    except BaseException:
        with torch.no_grad():
            for parameter, value in snapshot:
                parameter.copy_(value)
        raise
    return model


def _trainable_targets(
    model: nn.Module, tensors: dict[str, torch.Tensor], wrapped: set[str], path: Path
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """The model's parameter for each saved tensor, checked. A layer the adapter is about to
    wrap keeps its parameters, which then live under `<layer>.base_layer.`: such a name is
    found under the layer's current name."""
    parameters = dict(model.named_parameters(remove_duplicate=False))  # tied ones too
    targets, missing, problems = [], [], []
    for name, tensor in tensors.items():
        parameter = parameters.get(name)
        if parameter is None:
            layer, _, rest = name.partition(".base_layer.")
            if layer in wrapped and rest:
                parameter = parameters.get(f"{layer}.{rest}")
        if parameter is None:
            missing.append(name)
        elif parameter.shape != tensor.shape:
            problems.append(
                f"{name}: {tuple(tensor.shape)} but the model's is {tuple(parameter.shape)}"
            )
        elif not parameter.is_floating_point():
            problems.append(f"{name}: the model's parameter has dtype {parameter.dtype}")
        else:
            targets.append((parameter, tensor))
    if missing:
        raise ValueError(f"{path} holds tensors the model lacks: {sorted(missing)[:5]}")
    if problems:
        raise ValueError(
            f"{path} does not fit the model ({len(problems)}): {'; '.join(problems[:5])}"
        )
    return targets


def _adapter_parameter_ids(model: nn.Module) -> set[int]:
    """ids of every LoRA A and B and every modules_to_save copy in the model (they go to the
    PEFT-format adapter file)."""
    factors = [  # A, B, and a DoRA layer's magnitudes
        p
        for _, layer in lora_layers(model)
        for p in (*layer.A.values(), *layer.B.values(), *getattr(layer, "magnitude", {}).values())
    ]
    copies = [p for _, w in saved_modules(model) for p in w.modules_to_save.parameters()]
    return {id(p) for p in (*factors, *copies)}


def save_checkpoint(
    model: nn.Module,
    folder: str | os.PathLike,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict,
    generators: dict[str, torch.Tensor],
) -> Path:
    """Write a checkpoint to resume from: what `save_trainable` writes, the optimizer's and
    the scheduler's state, `state` (JSON: the loop's position) and the `generators`' states
    (uint8 tensors), in one folder changed as a unit. The optimizer must hold exactly the
    model's trainable parameters, in `trainable_parameters` order (as `train` makes it).

    Examples:
        >>> import tempfile
        >>> from collections import OrderedDict
        >>> from pathlib import Path
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.checkpoint import load_checkpoint, save_checkpoint
        >>> from lowrank.torch.checkpoint import trainable_parameters
        >>> from lowrank.torch.model import add_lora
        >>> def run():
        ...     _ = torch.manual_seed(0)
        ...     model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 8))), ["q"], r=2)
        ...     optimizer = torch.optim.AdamW(trainable_parameters(model).values(), lr=0.1)
        ...     return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1)
        >>> model, optimizer, scheduler = run()
        >>> model(torch.randn(4, 8)).pow(2).sum().backward()
        >>> optimizer.step(); scheduler.step()
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = save_checkpoint(model, Path(tmp) / "c", optimizer, scheduler, {"step": 1},
        ...                         {"torch": torch.get_rng_state()})
        ...     again, optimizer2, scheduler2 = run()
        ...     state, generators = load_checkpoint(again, Path(tmp) / "c", optimizer2, scheduler2)
        >>> state["step"], torch.equal(again.q.B["default"], model.q.B["default"])
        (1, True)
        >>> optimizer2.state_dict()["state"][1]["exp_avg"].shape  # B's first moment, (out, r)
        torch.Size([8, 2])
    """
    names = list(trainable_parameters(model))
    write_trainable = _trainable_writer(model, None)
    optimizer_state = optimizer.state_dict()
    tensors = {
        f"optimizer.{index}.{key}": torch.as_tensor(value).detach().cpu().contiguous()
        for index, values in optimizer_state["state"].items()
        for key, value in values.items()
    }
    tensors.update({f"rng.{name}": value.cpu() for name, value in generators.items()})
    record = {
        **state,
        "parameters": names,
        "param_groups": optimizer_state["param_groups"],
        "scheduler": scheduler.state_dict(),
    }
    text = json.dumps(record, indent=1) + "\n"  # floats as repr: read back exactly

    def write(new: Path) -> None:
        write_trainable(new)
        save_file(tensors, new / TRAINING_STATE_NAME)
        (new / TRAINER_STATE_NAME).write_text(text, encoding="utf-8")

    owns = (*peft_format.ADAPTER_FILES, TRAINABLE_NAME, TRAINER_STATE_NAME, TRAINING_STATE_NAME)
    return write_folder_atomically(folder, write, owns=owns)


def load_checkpoint(
    model: nn.Module,
    folder: str | os.PathLike,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a `save_checkpoint` folder back: the weights into `model` (`load_trainable`), the
    optimizer's and scheduler's state into `optimizer` and `scheduler` (made as the saving run
    made them). Returns (the JSON state, the generators' states by name). The trainable
    parameters' names and shapes are checked against the file first; ValueError naming the
    folder otherwise, with the model unchanged. A round trip: `save_checkpoint`.

    Examples:
        >>> import tempfile
        >>> from torch import nn
        >>> from lowrank.torch.checkpoint import load_checkpoint
        >>> with tempfile.TemporaryDirectory() as tmp:  # a folder, but no checkpoint
        ...     load_checkpoint(nn.Linear(2, 2), tmp, None, None)
        Traceback (most recent call last):
            ...
        ValueError: ... is no training checkpoint: it lacks trainer_state.json ...
    """
    with reading_folder(folder) as path:
        state_path, tensors_path = path / TRAINER_STATE_NAME, path / TRAINING_STATE_NAME
        if not state_path.is_file() or not tensors_path.is_file():
            raise ValueError(
                f"{path} is no training checkpoint: it lacks {TRAINER_STATE_NAME} or "
                f"{TRAINING_STATE_NAME} (written by train with save_steps or save_every_epoch)"
            )
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
            with safe_open(tensors_path, framework="pt") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # bad JSON, a damaged safetensors file
            raise ValueError(f"{path}: cannot read the checkpoint: {error}") from None
    parameters = trainable_parameters(model)
    if state.get("parameters") != list(parameters):
        raise ValueError(
            f"{path} was saved for other trainable parameters than the model's "
            f"({len(state.get('parameters') or [])} vs {len(parameters)}): the run must be "
            "set up as the one that wrote it"
        )
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        kind, index, name = key.split(".", 2) if key.startswith("optimizer.") else ("", "", "")
        if kind:
            moments.setdefault(int(index), {})[name] = tensor
    shapes = [p.shape for p in parameters.values()]
    for index, values in moments.items():
        for name, tensor in values.items():
            if tensor.dim() and tensor.shape != shapes[index]:
                raise ValueError(f"{path}: optimizer.{index}.{name} does not fit its parameter")
    optimizer.load_state_dict({"state": moments, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    load_trainable(model, path)  # last: checked, and the model put back if it fails
    generators = {key[4:]: t for key, t in tensors.items() if key.startswith("rng.")}
    return state, generators

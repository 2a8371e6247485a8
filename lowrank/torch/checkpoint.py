"""What training wrote, as files (a file format): `save_trainable` / `load_trainable`.

A training run's folder holds the LoRA adapters (Hu et al. 2021, arXiv:2106.09685) in the
Hugging Face PEFT layout (`peft_format.py`: adapter_config.json + adapter_model.safetensors,
loadable by `PeftModel.from_pretrained`) and every other trainable tensor (a classification
head, or the whole model in full fine-tuning) under its parameter name in
`trainable.safetensors` (`TRAINABLE_NAME`). The
folder changes as a unit (`lowrank._folders`); a load checks everything (`peft_load.py` for
the adapter) before the model changes, and puts the model back on failure.
"""

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowrank._folders import reading_folder, write_folder_atomically
from lowrank.torch import peft_format, peft_load
from lowrank.torch.model import active_adapter, lora_layers

__all__ = ["TRAINABLE_NAME", "trainable_parameters", "save_trainable", "load_trainable"]


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


def save_trainable(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write what training changed: LoRA adapters (PEFT layout, as `save_adapter` writes them)
    and every other trainable tensor (e.g. a classifier head) to `trainable.safetensors`.

    The adapter written is the active one (the one whose factors train); it loads as
    "default", as any PEFT adapter does. The folder changes as a unit
    (`lowrank._folders.write_folder_atomically`): a process killed at any instant leaves the old
    adapter + head or the new ones, never a mix, and files of a kind this save does not write
    this time (an old head) do not survive it. Other entries in the folder stay: `train` writes
    `log.jsonl` and `epoch-<n>/` into the same folder, and the adapter files stay at its top,
    so `PeftModel.from_pretrained(model, out_dir)` works on a training run's folder.

    Returns the folder's path.

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
    trainable = trainable_parameters(model)
    adapter_ids = _adapter_parameter_ids(model)
    write_adapter = None
    if any(id(p) in adapter_ids for p in trainable.values()):
        write_adapter = peft_format.adapter_writer(model, active_adapter(model) or "default", None)
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

    return write_folder_atomically(folder, write, owns=(*peft_format.ADAPTER_FILES, TRAINABLE_NAME))


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
    """ids of every LoRA A and B in the model (they go to the PEFT-format adapter file)."""
    return {
        id(p) for _, layer in lora_layers(model) for p in (*layer.A.values(), *layer.B.values())
    }

"""Loading a PEFT-layout LoRA adapter into a model: plan, check, apply, roll back.

The file format itself (keys, adapter_config.json, reading and checking the two files) is
`peft_format.py`; this module fits what was read to a model (Hu et al. 2021,
arXiv:2106.09685): `plan_load` checks keys, shapes and ranks without changing the model,
`apply_plan` wraps the layers and copies the factors (and the tensors of the modules the
adapter trains in full: `modules_to_save.py`), and puts the model back as it was if anything
fails half-way. The folder is read as one version (`lowrank._folders.reading_folder`).
What a file may change, and where lowrank differs from PEFT there: `peft_format`'s docstring.

(About 470 lines, a third of them docstrings: planning, applying and rolling back one load
must be read together to see that a refused load changes nothing.)
"""

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowrank import _patterns
from lowrank._folders import reading_folder
from lowrank._validate import check_adapter_name
from lowrank.torch.adapters import check_unmerged
from lowrank.torch.conv import CONV_TYPES, peft_factor_shapes
from lowrank.torch.dora import DoRALinear
from lowrank.torch.lora import LoRAConv1D, LoRAEmbedding, LoRALayer
from lowrank.torch.model import (
    active_adapter,
    add_lora,
    features,
    is_conv1d,
    lora_layers,
    match_targets,
    replace_module,
)
from lowrank.torch.modules_to_save import (
    ModulesToSaveWrapper,
    install_copies,
    peft_selects,
    saved_modules,
    select_modules,
    stage_copies,
)
from lowrank.torch.peft_format import (
    CONFIG_NAME,
    PREFIX,
    _keys,
    magnitude_key,
    read_adapter_files,
)
from lowrank.torch.qlora import Linear4bit

__all__ = ["AdapterPlan", "plan_load", "apply_plan", "load_adapter"]


@dataclass
class AdapterPlan:
    """A checked adapter load: what `apply_plan` will do to the model (made by `plan_load`).

    Each entry of `layers` is (qualified name, r, alpha, A [r, in], B [out, r]); each entry of
    `base_weights` is (the model's parameter, the value the file holds for it); each entry of
    `modules_to_save` is (module path, its state dict from the file), and `staged` holds the
    copies still to be made (`modules_to_save.stage_copies`). For a DoRA adapter
    (`"use_dora": true`), `magnitudes` maps each layer to its magnitude [out] from the file.

    Examples:
        >>> import tempfile
        >>> from collections import OrderedDict
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from lowrank._folders import reading_folder
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.peft_format import read_adapter_files, save_adapter
        >>> from lowrank.torch.peft_load import apply_plan, plan_load
        >>> tmp = tempfile.TemporaryDirectory()
        >>> folder = Path(tmp.name) / "adapter"
        >>> trained = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 4))), ["q"], r=2)
        >>> save_adapter(trained, folder)
        >>> with reading_folder(folder) as path:
        ...     config, tensors = read_adapter_files(path)
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 4)))
        >>> plan = plan_load(model, folder, config, tensors)
        >>> plan.adapter_name, plan.existing  # a new adapter: its layers are wrapped first
        ('default', False)
        >>> [(name, r, alpha, A.shape, B.shape) for name, r, alpha, A, B in plan.layers]
        [('q', 2, 16.0, torch.Size([2, 8]), torch.Size([4, 2]))]
        >>> tmp.cleanup()
    """

    folder: Path
    config: dict
    adapter_name: str
    existing: bool  # the model already has this adapter on exactly these layers
    layers: list[tuple[str, int, float, torch.Tensor, torch.Tensor]]  # (name, r, alpha, A, B)
    base_weights: list[tuple[nn.Parameter, torch.Tensor]]  # saved embedding matrices
    modules_to_save: list[tuple[str, dict[str, torch.Tensor]]]  # modules trained in full
    staged: list  # (path, wrapper or None, new copy) for the modules without this adapter's copy
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA: name -> m [out]


def plan_load(
    model: nn.Module,
    folder: Path,
    config: dict,
    tensors: dict[str, torch.Tensor],
    adapter_name: str = "default",
) -> AdapterPlan:
    """Check a config and its tensors against the model without changing it: keys, shapes,
    ranks, the existing adapter. ValueError naming the first mismatches.

    `config` and `tensors` are what `peft_format.read_adapter_files` read from `folder`
    (named in errors); each layer's A must be [r, in] and B [out, r] for the layer it names
    (a convolution's PEFT's conv factors, `conv.peft_factor_shapes`, flattened into the plan),
    and with use_dora its `lora_magnitude_vector` [out] (DoRA: Linear layers only, and a layer
    already wrapped must hold adapters of the same kind).
    The config's modules_to_save select modules as PEFT selects them (`peft_selects`); each
    needs every tensor of its state dict in the file, at its shape, and like PEFT the LoRA
    targets leave out those modules and what is inside them.

    Examples:
        >>> import tempfile
        >>> from collections import OrderedDict
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from lowrank._folders import reading_folder
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.peft_format import read_adapter_files, save_adapter
        >>> from lowrank.torch.peft_load import apply_plan, plan_load
        >>> tmp = tempfile.TemporaryDirectory()
        >>> folder = Path(tmp.name) / "adapter"
        >>> trained = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 4))), ["q"], r=2)
        >>> save_adapter(trained, folder)
        >>> with reading_folder(folder) as path:
        ...     config, tensors = read_adapter_files(path)
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 4)))
        >>> plan = plan_load(model, folder, config, tensors)
        >>> [name for name, *_ in plan.layers], type(model.q).__name__  # the model is unchanged
        (['q'], 'Linear')
        >>> plan_load(nn.Sequential(OrderedDict(q=nn.Linear(8, 8))), folder, config, tensors)
        Traceback (most recent call last):
            ...
        ValueError: adapter in ... does not fit the model (1): q: A (2, 8), B (4, 2) but ...
        >>> tmp.cleanup()
    """
    check_adapter_name(adapter_name)
    modules = dict(model.named_modules())
    try:
        with _patterns.time_limit():  # every pattern of the file shares one deadline
            selected = match_targets(
                model, config["target_modules"], every_pattern_must_match=False
            )
            ranks = _patterns.pattern_values(config["rank_pattern"], selected, config["r"])
            alphas = _patterns.pattern_values(
                config["alpha_pattern"], selected, config["lora_alpha"]
            )
            saved = select_modules(
                model, config["modules_to_save"], peft_selects, every_entry_must_match=False
            )
    except ValueError as error:
        raise ValueError(f"{folder / CONFIG_NAME}: {error}") from None
    selected = [n for n in selected if not any(n == s or n.startswith(s + ".") for s in saved)]
    existing = sorted(n for n, layer in lora_layers(model) if adapter_name in layer.A)
    problems, layers, expected, magnitudes = [], [], set(), {}
    for name in selected:
        module = modules[name]
        key_A, key_B = _keys(name, isinstance(module, (nn.Embedding, LoRAEmbedding)))
        expected.update((key_A, key_B))
        if key_A not in tensors or key_B not in tensors:
            problems.append(f"missing {key_A if key_A not in tensors else key_B}")
            continue
        A, B = tensors[key_A], tensors[key_B]
        try:
            in_features, out_features = features(module)
        except ValueError as error:  # a grouped convolution
            problems.append(f"{name}: {error}")
            continue
        r, alpha = ranks[name], alphas[name]
        shape_A, shape_B = (r, in_features), (out_features, r)
        base = module.base_layer if isinstance(module, LoRALayer) else module
        if isinstance(base, CONV_TYPES):  # PEFT's conv factors, flattened to (r, in), (out, r)
            shape_A, shape_B = peft_factor_shapes(base, r)
        if A.shape != shape_A or B.shape != shape_B:
            problems.append(
                f"{name}: A {tuple(A.shape)}, B {tuple(B.shape)} but the layer and r={r} need "
                f"A {shape_A}, B {shape_B}"
            )
            continue
        A, B = A.reshape(r, in_features), B.reshape(out_features, r)
        if name in existing and module.r[adapter_name] != r:
            problems.append(f"{name}: adapter {adapter_name!r} has r={module.r[adapter_name]}")
            continue
        if config["use_dora"] or isinstance(module, DoRALinear):
            problem = _plan_magnitude(name, module, config["use_dora"], tensors, out_features)
            if problem:
                problems.append(problem)
                continue
            expected.add(magnitude_key(name))
            magnitudes[name] = tensors[magnitude_key(name)]
        layers.append((name, r, alpha, A, B))
    full_modules, staged = _plan_modules_to_save(
        model, saved, tensors, adapter_name, selected, expected, problems
    )
    base_weights, embedding_parameters = [], _embedding_parameters(model, modules)
    for key in [key for key in tensors if key not in expected]:
        parameter = embedding_parameters.get(key)
        if parameter is None:
            problems.append(f"unexpected key {key}")
        elif parameter.shape != tensors[key].shape:
            problems.append(
                f"{key}: shape {tuple(tensors[key].shape)}, the model's is {tuple(parameter.shape)}"
            )
        elif any(p is parameter and not torch.equal(v, tensors[key]) for p, v in base_weights):
            problems.append(f"{key}: a different value for a weight another key also sets")
        else:
            base_weights.append((parameter, tensors[key]))
    if existing and existing != sorted(selected):
        problems.append(
            f"adapter {adapter_name!r} exists on {existing[:3]}... but the file has "
            f"{sorted(selected)[:3]}..."
        )
    if not selected:
        problems.append(f"target_modules {config['target_modules']!r} select no layer")
    if problems:
        shown = "; ".join(problems[:5])
        raise ValueError(f"adapter in {folder} does not fit the model ({len(problems)}): {shown}")
    if existing:
        check_unmerged(model, "load into an existing adapter")
    _warn_fan_in_fan_out(config["fan_in_fan_out"], [(n, modules[n]) for n in selected])
    return AdapterPlan(
        folder,
        config,
        adapter_name,
        bool(existing),
        layers,
        base_weights,
        full_modules,
        staged,
        magnitudes,
    )


def _plan_magnitude(
    name: str, module: nn.Module, use_dora: bool, tensors: dict, out_features: int
) -> str | None:
    """What keeps layer `name` from taking a DoRA magnitude from the file (None: nothing)."""
    if isinstance(module, LoRALayer):
        if isinstance(module, DoRALinear) != use_dora:
            held = "DoRA" if isinstance(module, DoRALinear) else "plain LoRA"
            return f"{name}: the layer holds {held} adapters but the file has use_dora={use_dora}"
    elif not isinstance(module, nn.Linear | Linear4bit):
        return f"{name}: use_dora applies to Linear layers only, not {type(module).__name__}"
    key = magnitude_key(name)
    if key not in tensors:
        return f"missing {key} (use_dora: DoRA's magnitude)"
    if tensors[key].shape != (out_features,):
        return f"{key}: shape {tuple(tensors[key].shape)}, the layer needs ({out_features},)"
    return None


def _plan_modules_to_save(
    model: nn.Module,
    saved: list[str],
    tensors: dict[str, torch.Tensor],
    adapter_name: str,
    lora_names: list[str],
    expected: set[str],
    problems: list[str],
) -> tuple[list[tuple[str, dict[str, torch.Tensor]]], list]:
    """Each selected module's state dict from the file (its keys added to `expected`, what
    does not fit to `problems`), and the copies to make for those without one."""
    found, staged = [], []
    for name in saved:
        module = model.get_submodule(name)
        wrapper = module if isinstance(module, ModulesToSaveWrapper) else None
        if wrapper is None or adapter_name not in wrapper.modules_to_save:
            try:  # checks it is no LoRA layer, holds none and is not a container
                staged += stage_copies(model, [name], adapter_name, lora_names)
            except ValueError as error:
                problems.append(str(error))
                continue
        original = module if wrapper is None else wrapper.original_module
        state = {}
        for key, value in original.state_dict().items():
            file_key = f"{PREFIX}{name}.{key}"
            expected.add(file_key)
            if file_key not in tensors:
                problems.append(f"missing {file_key} (modules_to_save {name!r})")
            elif tensors[file_key].shape != value.shape:
                problems.append(
                    f"{file_key}: shape {tuple(tensors[file_key].shape)}, the model's is "
                    f"{tuple(value.shape)}"
                )
            else:
                state[key] = tensors[file_key]
        found.append((name, state))
    return found, staged


def _warn_fan_in_fan_out(fan_in_fan_out: bool, layers: list[tuple[str, nn.Module]]) -> None:
    """PEFT corrects a fan_in_fan_out that does not fit a layer (True on a Linear, False on a
    GPT-2 Conv1D) with a warning and loads; so does lowrank, whose factors' layout never
    depends on it."""
    for name, module in layers:
        base = module.base_layer if isinstance(module, LoRALayer) else module
        if isinstance(base, (nn.Embedding,)):
            continue
        conv = isinstance(module, LoRAConv1D) or is_conv1d(base)
        if conv != fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out={fan_in_fan_out} in the config, but {name!r} is a "
                f"{'Conv1D' if conv else 'Linear'} layer; it is treated as one (as PEFT does)",
                UserWarning,
                stacklevel=4,
            )
            return


def _embedding_parameters(
    model: nn.Module, modules: dict[str, nn.Module]
) -> dict[str, nn.Parameter]:
    """Full weights PEFT saves next to the factors, by key: the input and output embedding
    layers (`get_input_embeddings()` / `get_output_embeddings()` of a transformers model) when
    they are targeted (`<path>.base_layer.weight`) or `save_embedding_layers` is set
    (`<path>.weight`). Any other base weight in a file is refused: an adapter file that could
    overwrite any weight of the model would not be an adapter."""
    found = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except Exception:  # not a transformers model, or one without such a layer
            continue
        name = next((n for n, m in modules.items() if m is module and n), None)
        if name is None:
            continue
        if name.endswith(".base_layer") and isinstance(
            modules.get(name.removesuffix(".base_layer")), LoRALayer
        ):
            name = name.removesuffix(".base_layer")
        layer = modules[name]
        base = layer.base_layer if isinstance(layer, LoRALayer) else layer
        for parameter_name, parameter in base.named_parameters(recurse=False):
            found[f"{PREFIX}{name}.{parameter_name}"] = parameter
            found[f"{PREFIX}{name}.base_layer.{parameter_name}"] = parameter
    return found


def apply_plan(
    model: nn.Module,
    plan: AdapterPlan,
    extra_weights: list[tuple[nn.Parameter, torch.Tensor]] = (),
) -> None:
    """Carry out a checked load (LoRA factors, embedding matrices, modules trained in full),
    then copy `extra_weights` (checked by the caller: e.g. a trained head); if anything fails
    half-way, the model is put back as it was.

    Examples:
        >>> import tempfile
        >>> from collections import OrderedDict
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from lowrank._folders import reading_folder
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.peft_format import read_adapter_files, save_adapter
        >>> from lowrank.torch.peft_load import apply_plan, plan_load
        >>> tmp = tempfile.TemporaryDirectory()
        >>> folder = Path(tmp.name) / "adapter"
        >>> trained = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 4))), ["q"], r=2)
        >>> save_adapter(trained, folder)
        >>> with reading_folder(folder) as path:
        ...     config, tensors = read_adapter_files(path)
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 4)))
        >>> plan = plan_load(model, folder, config, tensors)
        >>> apply_plan(model, plan)
        >>> type(model.q).__name__, model.q.r, model.q.active_adapter
        ('LoRALinear', {'default': 2}, 'default')
        >>> tmp.cleanup()
    """
    weights = [*plan.base_weights, *extra_weights]
    snapshot = _snapshot(model, [parameter for parameter, _ in weights])
    config = plan.config
    try:
        with torch.no_grad():
            for parameter, value in plan.base_weights:
                parameter.copy_(value)
        if not plan.existing:
            groups: dict[tuple[int, float], list[str]] = {}
            for name, r, alpha, *_ in plan.layers:
                groups.setdefault((r, alpha), []).append(name)
            for (r, alpha), names in groups.items():  # exact names: a union of escaped ones
                add_lora(
                    model,
                    "|".join(re.escape(n) for n in names),
                    r=r,
                    alpha=alpha,
                    dropout=config["lora_dropout"],
                    adapter_name=plan.adapter_name,
                    use_rslora=config["use_rslora"],
                    use_dora=config["use_dora"],
                )
        for name, _, alpha, A, B in plan.layers:
            layer = model.get_submodule(name)
            layer.alpha[plan.adapter_name] = float(alpha)
            layer.use_rslora[plan.adapter_name] = config["use_rslora"]
            with torch.no_grad():
                layer.A[plan.adapter_name].copy_(A)
                layer.B[plan.adapter_name].copy_(B)
                if name in plan.magnitudes:
                    layer.magnitude[plan.adapter_name].copy_(plan.magnitudes[name])
        install_copies(model, plan.staged, plan.adapter_name, active_adapter(model))
        with torch.no_grad():
            for name, state in plan.modules_to_save:
                module_copy = model.get_submodule(name).modules_to_save[plan.adapter_name]
                module_copy.load_state_dict(state)
            for parameter, value in extra_weights:
                parameter.copy_(value)
    except BaseException:
        _restore(model, snapshot)
        raise


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default"
) -> nn.Module:
    """Load a PEFT-layout LoRA adapter from folder `path` as adapter `adapter_name`.

    If the model has no adapter of that name, the layers the config describes are wrapped
    first (target_modules, r, lora_alpha, rank_pattern, alpha_pattern, use_rslora), as
    `PeftModel.from_pretrained` does; if it has one on exactly those layers, its factors are
    overwritten. Everything is checked before the model changes, and the model stays as it
    was on any error:

    - the config: each value checked as `add_lora` checks it (also when loading over an
      existing adapter), fields lowrank does not implement refused by name, patterns matched
      with a time limit (`lowrank._patterns`); bad JSON or a missing file is a ValueError
      naming the file;
    - the tensors: only LoRA factors of the selected layers, the tensors of the modules the
      config lists in modules_to_save (a classification head trained in full: each module
      gets a copy for this adapter, as in PEFT) and the embedding matrices PEFT itself saves
      (`_embedding_parameters`); any other key is refused by name (PEFT would load it into
      the model, so a file could change any base weight). Every tensor must be floating
      point and finite;
    - keys, shapes or ranks that do not fit raise ValueError naming the first mismatches.

    The folder is read as one version (`lowrank._folders.reading_folder`), so a concurrent
    `save_adapter` cannot hand it the config of one adapter and the weights of another.

    Examples:
        >>> import copy
        >>> import tempfile
        >>> from collections import OrderedDict
        >>> from pathlib import Path
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.peft_format import save_adapter
        >>> from lowrank.torch.peft_load import load_adapter
        >>> _ = torch.manual_seed(0)
        >>> base = nn.Sequential(OrderedDict(q=nn.Linear(8, 4)))
        >>> trained = add_lora(copy.deepcopy(base), ["q"], r=2, alpha=4)
        >>> _ = nn.init.normal_(trained.q.B["default"])  # as if trained
        >>> x = torch.randn(3, 8)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_adapter(trained, Path(tmp) / "adapter")
        ...     loaded = load_adapter(copy.deepcopy(base), Path(tmp) / "adapter")
        >>> loaded.q.r, torch.equal(loaded(x), trained(x))
        ({'default': 2}, True)
    """
    with reading_folder(path) as folder:
        config, tensors = read_adapter_files(folder)
    apply_plan(model, plan_load(model, folder, config, tensors, adapter_name))
    return model


def _snapshot(model: nn.Module, weights: list[nn.Parameter]) -> dict:
    """Enough to put the model back: its modules, adapter factors, copies of modules trained
    in full, flags, requires_grad and the values of `weights` (base weights about to be
    overwritten)."""
    return {
        "weights": [(weight, weight.detach().clone()) for weight in weights],
        "modules": dict(model.named_modules()),
        "requires_grad": {p: p.requires_grad for p in model.parameters()},
        "layers": {
            name: (
                layer.active_adapter,
                {n: (layer.A[n].detach().clone(), layer.B[n].detach().clone()) for n in layer.A},
                dict(layer.alpha),
                dict(layer.use_rslora),
                {n: m.detach().clone() for n, m in getattr(layer, "magnitude", {}).items()},
            )
            for name, layer in lora_layers(model)
        },
        "wrappers": {
            name: (
                wrapper.active_adapter,
                {
                    adapter: {key: t.detach().clone() for key, t in copy.state_dict().items()}
                    for adapter, copy in wrapper.modules_to_save.items()
                },
            )
            for name, wrapper in saved_modules(model)
        },
    }


def _restore(model: nn.Module, snapshot: dict) -> None:
    for name, layer in list(lora_layers(model)):
        if name not in snapshot["layers"]:
            replace_module(model, name, snapshot["modules"][name])
            continue
        active, factors, alpha, use_rslora, magnitudes = snapshot["layers"][name]
        for adapter in [n for n in layer.A if n not in factors]:
            layer.delete_adapter(adapter)
        with torch.no_grad():
            for adapter, (A, B) in factors.items():
                layer.A[adapter].copy_(A)
                layer.B[adapter].copy_(B)
            for adapter, magnitude in magnitudes.items():
                layer.magnitude[adapter].copy_(magnitude)
        layer.active_adapter, layer.alpha, layer.use_rslora = active, alpha, use_rslora
    for name, wrapper in list(saved_modules(model)):
        if name not in snapshot["wrappers"]:
            replace_module(model, name, snapshot["modules"][name])
            continue
        active, copies = snapshot["wrappers"][name]
        for adapter in [a for a in wrapper.modules_to_save if a not in copies]:
            wrapper.delete_adapter(adapter)
        with torch.no_grad():
            for adapter, state in copies.items():
                wrapper.modules_to_save[adapter].load_state_dict(state)
        wrapper.active_adapter = active
    for parameter, flag in snapshot["requires_grad"].items():
        parameter.requires_grad_(flag)
    with torch.no_grad():
        for weight, value in snapshot["weights"]:
            weight.copy_(value)

"""The Hugging Face PEFT file format for LoRA adapters, both ways.

A LoRA adapter (Hu et al. 2021, arXiv:2106.09685) saved by PEFT is a folder of two files; this
module writes and reads exactly that, so adapters move between lowrank and PEFT in both
directions with identical outputs:

    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                  "target_modules": [...], "use_rslora": false, ...}
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight   [r, in]
                                 base_model.model.<module path>.lora_B.weight   [out, r]
                                 base_model.model.<embedding path>.lora_embedding_A  [r, num]
                                 base_model.model.<embedding path>.lora_embedding_B  [dim, r]

Which layers a config's `target_modules` selects follows `lowrank.torch.model.match_targets`,
the rule `add_lora` uses, which is PEFT's.
"""

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowrank._files import write_atomically, write_text_atomically
from lowrank.torch.adapters import check_known, check_unmerged
from lowrank.torch.lora import LoRAConv1D, LoRAEmbedding, LoRALayer
from lowrank.torch.model import (
    add_lora,
    features,
    lora_layers,
    match_targets,
    matches,
    pattern_value,
    replace_module,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _keys(name: str, embedding: bool) -> tuple[str, str]:
    """PEFT's keys for a layer's A and B."""
    if embedding:
        return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `adapter_name`'s factors under PEFT's keys (detached, on the CPU)."""
    check_known(model, adapter_name)
    state = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.A:
            key_A, key_B = _keys(name, isinstance(layer, LoRAEmbedding))
            state[key_A] = layer.A[adapter_name].detach().cpu().contiguous()  # (r, in)
            state[key_B] = layer.B[adapter_name].detach().cpu().contiguous()  # (out, r)
    return state


def _outside_names(model: nn.Module) -> list[str]:
    """Every module name a PEFT target could match (wrapper internals left out)."""
    names, inside = [], None
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        names.append(name)
        if isinstance(module, LoRALayer):
            inside = name + "."
    return names


def _target_modules(model: nn.Module, adapted: list[str]) -> list[str]:
    """The shortest PEFT target list that selects exactly `adapted`: the layers' last name
    parts ("q_proj") when those select nothing else, their full names otherwise."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    selected = [n for n in _outside_names(model) if any(matches(n, t) for t in leaves)]
    return leaves if sorted(selected) == sorted(adapted) else sorted(adapted)


def _plain_number(value: float) -> float | int:
    """16.0 -> 16 (PEFT configs hold ints where they can), 0.5 stays 0.5."""
    return int(value) if float(value).is_integer() else value


def _most_common(values: dict[str, float]) -> float:
    return Counter(values.values()).most_common(1)[0][0]


def adapter_config(
    model: nn.Module, adapter_name: str = "default", base_model_name_or_path: str | None = None
) -> dict:
    """The adapter_config.json PEFT would write for this adapter (LoraConfig's fields).

    r and lora_alpha are the most common values; layers that differ are listed in
    rank_pattern / alpha_pattern under their escaped full names (PEFT reads keys as regexes).
    """
    check_known(model, adapter_name)
    layers = [(n, layer) for n, layer in lora_layers(model) if adapter_name in layer.A]
    ranks = {n: layer.r[adapter_name] for n, layer in layers}
    alphas = {n: _plain_number(layer.alpha[adapter_name]) for n, layer in layers}
    rslora = {layer.use_rslora[adapter_name] for _, layer in layers}
    dropouts = {getattr(layer.dropout[adapter_name], "p", 0.0) for _, layer in layers}
    if len(rslora) > 1 or len(dropouts) > 1:
        raise ValueError(
            f"adapter {adapter_name!r} mixes use_rslora {rslora} or dropout {dropouts} across "
            "layers; the PEFT format has one value of each"
        )
    r, alpha = _most_common(ranks), _most_common(alphas)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropouts.pop(),
        "use_rslora": rslora.pop(),
        "target_modules": _target_modules(model, [n for n, _ in layers]),
        "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha},
        "fan_in_fan_out": any(isinstance(layer, LoRAConv1D) for _, layer in layers),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "revision": None,
    }


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write adapter `adapter_name` to folder `path` as PEFT does (see the module docstring).

    Both files are written to a temporary file and renamed, so a crash never leaves a
    half-written file behind. `PeftModel.from_pretrained(base_model, path)` loads it.
    """
    folder = Path(path)
    config = adapter_config(model, adapter_name, base_model_name_or_path)
    tensors = lora_state_dict(model, adapter_name)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_text_atomically(folder / CONFIG_NAME, text)
    write_atomically(
        folder / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"})
    )


def _read_config(folder: Path) -> dict:
    config = json.loads((folder / CONFIG_NAME).read_text())
    unsupported = {
        "peft_type": ("LORA",),
        "bias": ("none",),
        "use_dora": (False, None),
        "modules_to_save": (None, []),
        "layers_to_transform": (None, []),
        "target_parameters": (None, []),
        "trainable_token_indices": (None,),
        "lora_bias": (False, None),
    }
    for key, allowed in unsupported.items():
        if config.get(key, allowed[0]) not in allowed:
            raise ValueError(f"{folder / CONFIG_NAME}: {key}={config[key]!r} is not supported")
    return config


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default"
) -> nn.Module:
    """Load a PEFT-layout LoRA adapter from folder `path` as adapter `adapter_name`.

    If the model has no adapter of that name, the layers the config describes are wrapped
    first (target_modules, r, lora_alpha, rank_pattern, alpha_pattern, use_rslora), as
    `PeftModel.from_pretrained` does; if it has one on exactly those layers, its factors are
    overwritten. Everything is checked before the model changes: keys, shapes or ranks that
    do not fit raise ValueError naming the first mismatches, and the model stays as it was.
    """
    folder = Path(path)
    config = _read_config(folder)
    with safe_open(folder / WEIGHTS_NAME, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    modules = dict(model.named_modules())
    selected = match_targets(model, config["target_modules"], every_pattern_must_match=False)
    problems = []
    plans = []  # (name, r, alpha, A, B)
    expected = set()
    for name in selected:
        module = modules[name]
        key_A, key_B = _keys(name, isinstance(module, (nn.Embedding, LoRAEmbedding)))
        expected.update((key_A, key_B))
        if key_A not in tensors or key_B not in tensors:
            problems.append(f"missing {key_A if key_A not in tensors else key_B}")
            continue
        A, B = tensors[key_A], tensors[key_B]
        in_features, out_features = features(module)
        r = pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        if A.shape != (r, in_features) or B.shape != (out_features, r):
            problems.append(
                f"{name}: A {tuple(A.shape)}, B {tuple(B.shape)} but the layer and r={r} need "
                f"A {(r, in_features)}, B {(out_features, r)}"
            )
            continue
        plans.append((name, r, alpha, A, B))
    base_weights = []  # (parameter, value): full weights PEFT saves next to a targeted embedding
    for key in [key for key in tensors if key not in expected]:
        parameter = _base_parameter(modules, key)
        if parameter is None or parameter.shape != tensors[key].shape:
            problems.append(f"unexpected key {key}")
        else:
            base_weights.append((parameter, tensors[key]))
    existing = sorted(n for n, layer in lora_layers(model) if adapter_name in layer.A)
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

    snapshot = _snapshot(model, [parameter for parameter, _ in base_weights])
    try:
        with torch.no_grad():
            for parameter, value in base_weights:
                parameter.copy_(value)
        if existing:
            check_unmerged(model, "load into an existing adapter")
        else:
            pattern = "|".join(re.escape(n) for n, *_ in plans)
            add_lora(
                model,
                pattern,
                r=config["r"],
                alpha=config["lora_alpha"],
                dropout=config.get("lora_dropout", 0.0),
                adapter_name=adapter_name,
                use_rslora=config.get("use_rslora", False),
                rank_pattern={re.escape(n): r for n, r, *_ in plans},
                alpha_pattern={re.escape(n): alpha for n, _, alpha, *_ in plans},
            )
        for name, _, alpha, A, B in plans:
            layer = model.get_submodule(name)
            layer.alpha[adapter_name] = float(alpha)
            layer.use_rslora[adapter_name] = bool(config.get("use_rslora", False))
            with torch.no_grad():
                layer.A[adapter_name].copy_(A)
                layer.B[adapter_name].copy_(B)
    except BaseException:
        _restore(model, snapshot)
        raise
    return model


def _base_parameter(modules: dict[str, nn.Module], key: str) -> nn.Parameter | None:
    """The model's weight that a key like base_model.model.<path>[.base_layer].weight names
    (PEFT saves whole embedding matrices this way when they are targeted), or None."""
    if not (key.startswith(PREFIX) and key.endswith(".weight")):
        return None
    path = key[len(PREFIX) : -len(".weight")].removesuffix(".base_layer")
    module = modules.get(path)
    if isinstance(module, LoRALayer):
        module = module.base_layer
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, nn.Parameter) else None


def _snapshot(model: nn.Module, weights: list[nn.Parameter]) -> dict:
    """Enough to put the model back: its modules, adapter factors, flags, requires_grad and
    the values of `weights` (base weights about to be overwritten)."""
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
            )
            for name, layer in lora_layers(model)
        },
    }


def _restore(model: nn.Module, snapshot: dict) -> None:
    for name, layer in list(lora_layers(model)):
        if name not in snapshot["layers"]:
            replace_module(model, name, snapshot["modules"][name])
            continue
        active, factors, alpha, use_rslora = snapshot["layers"][name]
        for adapter in [n for n in layer.A if n not in factors]:
            layer.delete_adapter(adapter)
        with torch.no_grad():
            for adapter, (A, B) in factors.items():
                layer.A[adapter].copy_(A)
                layer.B[adapter].copy_(B)
        layer.active_adapter, layer.alpha, layer.use_rslora = active, alpha, use_rslora
    for parameter, flag in snapshot["requires_grad"].items():
        parameter.requires_grad_(flag)
    with torch.no_grad():
        for weight, value in snapshot["weights"]:
            weight.copy_(value)

"""Several named LoRA adapters on one model: switch, disable, delete, combine, save and load.

LoRA (Hu et al. 2021, arXiv:2106.09685) makes task switching cheap: one frozen base model,
one small (A, B) pair per task and layer. `lowrank.torch.lora.add_lora(..., adapter_name=...)`
adds adapters; this file manages them:

- `list_adapters`, `set_active_adapter`, `disable_adapters` (a context manager),
  `delete_adapter`;
- `combine_adapters`: a new adapter from a weighted mix of others ("linear", "cat", "svd");
- `save_adapter` / `load_adapter`: the Hugging Face PEFT file layout, so adapters move between
  lowrank and PEFT in both directions:

    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                  "target_modules": [...], "use_rslora": false, ...}
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight   [r, in]
                                 base_model.model.<module path>.lora_B.weight   [out, r]
                                 base_model.model.<embedding path>.lora_embedding_A  [r, num]
                                 base_model.model.<embedding path>.lora_embedding_B  [dim, r]
"""

import json
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowrank.torch.lora import (
    LoRAConv1D,
    LoRAEmbedding,
    LoRALayer,
    add_lora,
    candidate_names,
    lora_layers,
    mark_only_lora_trainable,
    pattern_value,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
COMBINATIONS = ("linear", "cat", "svd")


def list_adapters(model: nn.Module) -> list[str]:
    """Adapter names on `model`, in the order they first appear."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.A))
    return list(names)


def _check_known(model: nn.Module, name: str) -> None:
    if name not in list_adapters(model):
        raise ValueError(f"no adapter named {name!r}; the model has {list_adapters(model)}")


def _check_unmerged(model: nn.Module, action: str) -> None:
    if any(layer.merged for _, layer in lora_layers(model)):
        raise RuntimeError(f"the model is merged; unmerge_lora(model) before you {action}")


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make adapter `name` the one every LoRA layer adds (layers without it add nothing);
    only its A and B require grad afterwards."""
    _check_known(model, name)
    _check_unmerged(model, "switch adapters")
    for _, layer in lora_layers(model):
        layer.active_adapter = name
    mark_only_lora_trainable(model)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """`with disable_adapters(model):` runs the bare base model (e.g. a reference output)."""
    _check_unmerged(model, "disable adapters")
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere; a layer left without adapters becomes its plain base
    layer again. Deleting the active adapter leaves no adapter active."""
    _check_known(model, name)
    if any(name == layer.merged_adapter for _, layer in lora_layers(model)):
        raise RuntimeError(f"adapter {name!r} is merged; unmerge_lora(model) first")
    for layer_name, layer in list(lora_layers(model)):
        if name in layer.A:
            layer.delete_adapter(name)
        if layer.active_adapter == name:
            layer.active_adapter = None
        if not layer.A:
            _replace(model, layer_name, layer.base_layer)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def combine_adapters(
    model: nn.Module,
    names: list[str],
    weights: list[float],
    new_name: str,
    *,
    combination: str = "svd",
    r: int | None = None,
) -> None:
    """Add adapter `new_name` built from adapters `names` mixed with `weights`.

    Adapter i adds the update dW_i = s_i B_i A_i (s_i its scale). The new adapter has scale 1
    (alpha = its rank, no rsLoRA), so its update is B A; it is added inactive. Per layer:

    - "cat" (exact): concatenate the factors, ranks add up:
          A = [A_1; A_2; ...]  (rows),   B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]  (columns)
          B A = sum_i w_i s_i B_i A_i  = the weighted sum of the updates, exactly.
    - "svd" (best rank r): the weighted sum dW = sum_i w_i s_i B_i A_i, truncated to rank r
      with the SVD: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T. By Eckart-Young no rank-r matrix
      is closer to dW (Frobenius or spectral norm); the error is sqrt(sum of the dropped
      S^2). dW is never formed: with B_cat = Q_B R_B and A_cat^T = Q_A R_A (QR),
      dW = Q_B (R_B R_A^T) Q_A^T, so only the small core R_B R_A^T needs an SVD.
    - "linear" (same rank r for all, weights >= 0): mix the factors themselves,
          A = sum_i sqrt(w_i s_i) A_i,   B = sum_i sqrt(w_i s_i) B_i
          B A = sum_i w_i s_i B_i A_i + sum_{i != j} sqrt(w_i s_i w_j s_j) B_i A_j.
      This is NOT the weighted sum of the updates: the cross terms B_i A_j mix one adapter's
      B with another's A (PEFT's "linear" warns the same). It keeps the rank and is exact
      only when a single adapter has nonzero weight, or the cross terms vanish.

    A layer that lacks some of the adapters uses those it has. `r` is needed for "svd" only;
    a layer gets rank min(r, in, out), zero-padded where the sum has a lower rank.
    """
    if combination not in COMBINATIONS:
        raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}")
    if not names or len(names) != len(weights):
        raise ValueError(f"need one weight per adapter: {len(names)} names, {len(weights)} weights")
    for name in names:
        _check_known(model, name)
    if new_name in list_adapters(model):
        raise ValueError(f"the model already has an adapter named {new_name!r}")
    if combination == "linear" and any(w < 0 for w in weights):
        raise ValueError(f"'linear' takes square roots of the weights; got {weights}")
    if combination == "svd" and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ValueError(f"'svd' needs a positive int rank r, got {r!r}")
    plans = []  # compute every layer's factors before adding anything
    for layer_name, layer in lora_layers(model):
        present = [(w, n) for n, w in zip(names, weights, strict=True) if n in layer.A]
        if not present:
            continue
        with torch.no_grad():
            A, B = _combine(layer, present, combination, r, layer_name)
        plans.append((layer, A, B))
    for layer, A, B in plans:
        rank = A.shape[0]
        layer.add_adapter(new_name, r=rank, alpha=rank)
        with torch.no_grad():
            layer.A[new_name].copy_(A)
            layer.B[new_name].copy_(B)
    mark_only_lora_trainable(model)


def _combine(
    layer: LoRALayer, present: list[tuple[float, str]], combination: str, r: int | None, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, in], B [out, rank]) of the combined adapter on one layer."""
    if combination == "linear":
        ranks = {layer.r[n] for _, n in present}
        if len(ranks) > 1:
            raise ValueError(f"'linear' needs equal ranks; layer {where!r} has ranks {ranks}")
        roots = [math.sqrt(w * layer.scale(n)) for w, n in present]
        A = sum(c * layer.A[n] for c, (_, n) in zip(roots, present, strict=True))
        B = sum(c * layer.B[n] for c, (_, n) in zip(roots, present, strict=True))
        return A, B
    A_cat = torch.cat([layer.A[n] for _, n in present], dim=0)  # (sum r_i, in)
    B_cat = torch.cat([w * layer.scale(n) * layer.B[n] for w, n in present], dim=1)  # (out, sum)
    if combination == "cat":
        return A_cat, B_cat
    r = min(r, layer.in_features, layer.out_features)  # no layer holds a higher rank
    Q_B, R_B = torch.linalg.qr(B_cat)  # (out, k) (k, k)
    Q_A, R_A = torch.linalg.qr(A_cat.T)  # (in, k) (k, k)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T)  # dW = Q_B U diag(S) Vh Q_A^T
    U, S, Vh = U[:, :r], S[:r], Vh[:r]  # a core smaller than r gives fewer than r values
    root = S.sqrt()
    B = (Q_B @ U) * root  # (out, r)
    A = root[:, None] * (Vh @ Q_A.T)  # (r, in)
    if A.shape[0] < r:  # the sum has rank below r: pad with zero directions
        A = torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], dim=1)
    return A, B


def _keys(name: str, embedding: bool) -> tuple[str, str]:
    """PEFT's keys for a layer's A and B."""
    if embedding:
        return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `adapter_name`'s factors under PEFT's keys (detached, on the CPU)."""
    _check_known(model, adapter_name)
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
    selected = [n for n in _outside_names(model) if any(_suffix_match(n, t) for t in leaves)]
    return leaves if sorted(selected) == sorted(adapted) else sorted(adapted)


def _suffix_match(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


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
    _check_known(model, adapter_name)
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


def _write_atomically(path: Path, write) -> None:
    """Call write(temporary path) in path's folder, then rename it onto `path`."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


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
    _write_atomically(folder / CONFIG_NAME, lambda p: Path(p).write_text(text))
    _write_atomically(
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


def _config_selects(model: nn.Module, targets: str | list[str]) -> list[str]:
    candidates = candidate_names(model)
    if isinstance(targets, str):
        return [n for n in candidates if re.fullmatch(targets, n)]
    return [n for n in candidates if any(_suffix_match(n, t) for t in targets)]


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
    selected = _config_selects(model, config["target_modules"])
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
        in_features, out_features = _features(module)
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
            _check_unmerged(model, "load into an existing adapter")
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


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, LoRALayer):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Linear) or hasattr(module, "in_features"):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)  # Conv1D: (in, out)


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
            _replace(model, name, snapshot["modules"][name])
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

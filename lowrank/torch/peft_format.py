"""The Hugging Face PEFT file format for LoRA adapters, both ways.

A LoRA adapter (Hu et al. 2021, arXiv:2106.09685) saved by PEFT is a folder of two files; this
module writes and reads exactly that, so adapters move between lowrank and PEFT in both
directions with identical outputs. The two files (`CONFIG_NAME`, `WEIGHTS_NAME`; keys start
with `PREFIX`):

    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                  "target_modules": [...], "use_rslora": false, ...}
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight   [r, in]
                                 base_model.model.<module path>.lora_B.weight   [out, r]
                                 base_model.model.<embedding path>.lora_embedding_A  [r, num]
                                 base_model.model.<embedding path>.lora_embedding_B  [dim, r]
                                 base_model.model.<module path>.lora_magnitude_vector [out]
                                 (a conv: lora_A.weight [r, in_channels, *kernel],
                                  lora_B.weight [out, r, 1, ...]; `lowrank.torch.conv`)
                                 base_model.model.<module path>.<tensor>    modules_to_save

A DoRA adapter (Liu et al. 2024, arXiv:2402.09353; `lowrank.torch.dora`) has `"use_dora":
true` and one more tensor per layer, its magnitude `lora_magnitude_vector` [out] (PEFT keeps it
as `lora_magnitude_vector.<adapter>.weight` in the model and drops `.weight` when it saves).

A module trained in full with the adapter (a classification head: `modules_to_save.py`) is
listed in the config's "modules_to_save" and its tensors stored under its own path, as PEFT
stores them (base_model.model.classifier.weight, .bias).

Which layers a config's `target_modules` selects follows `lowrank.torch.model.match_targets`,
the rule `add_lora` uses, which is PEFT's. Next to the factors, PEFT may save full matrices of
a transformers model's input/output embeddings (`<path>.base_layer.weight` when the embedding
is targeted, `<path>.weight` with `save_embedding_layers`); those load too.

A save changes the folder as a unit (`lowrank._folders.write_folder_atomically`); the files
it owns there are `ADAPTER_FILES` (the two above, and PEFT's older pickle `PICKLE_NAME`, which
it drops). Reading a config and the weights, each checked, is here; `load_adapter`, which
checks them against the model before changing it and rolls back on failure, is in
`peft_load.py`.

Where lowrank deliberately differs from PEFT, and why:
- a file may hold only factors of the selected layers, the tensors of its modules_to_save and
  those embedding matrices: PEFT loads
  any key that names a parameter (`load_state_dict(strict=False)`), so a file could overwrite
  any base weight; lowrank refuses such a key by name. Factors must be finite floating tensors.
- config values are checked like `add_lora`'s arguments; lora_alpha must be > 0 (PEFT accepts
  0 or a negative alpha, which switch the adapter off or reverse it). Fields lowrank does not
  implement (exclude_modules, lora_bias, ...: `UNSUPPORTED`, each with the values that mean
  "not used") are refused by name rather than ignored. A module in modules_to_save must have every
  tensor of its state dict in the file (PEFT would keep the original for a missing one).
- a pattern read from the file that takes more than about a second to match is a ValueError
  (`lowrank._patterns`); PEFT's `re` would run for as long as the pattern takes.
- `adapter_model.bin` (a pickle) is never read: unpickling runs code.
- rank_pattern / alpha_pattern keys are written so that they select exactly their layer (an
  escaped name, anchored with ^ when it is also the end of another adapted layer's name).

(About 450 lines, many of them docstrings: both directions of one file format, with the checks
of what a file may hold.)
"""

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowrank import _patterns
from lowrank._folders import write_folder_atomically
from lowrank._validate import (
    check_bool,
    check_dropout,
    check_int,
    check_positive_number,
)
from lowrank.torch.adapters import check_known
from lowrank.torch.conv import LoRAConv
from lowrank.torch.dora import DoRALinear
from lowrank.torch.lora import LoRAConv1D, LoRAEmbedding
from lowrank.torch.model import (
    lora_layers,
    matches,
)
from lowrank.torch.modules_to_save import (
    module_names,
    modules_to_save_state_dict,
    peft_selects,
    saved_modules,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # PEFT's older weights file (a pickle: never read here)
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME)  # what a save owns in its folder
PREFIX = "base_model.model."

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PICKLE_NAME",
    "ADAPTER_FILES",
    "PREFIX",
    "UNSUPPORTED",
    "magnitude_key",
    "lora_state_dict",
    "adapter_config",
    "adapter_writer",
    "save_adapter",
    "read_adapter_files",
    "read_tensors",
]


def magnitude_key(name: str) -> str:
    """PEFT's key for a DoRA layer's magnitude [out].

    Examples:
        >>> from lowrank.torch.peft_format import magnitude_key
        >>> magnitude_key("model.layers.0.self_attn.q_proj")
        'base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector'
    """
    return f"{PREFIX}{name}.lora_magnitude_vector"


def _keys(name: str, embedding: bool) -> tuple[str, str]:
    """PEFT's keys for a layer's A and B."""
    if embedding:
        return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `adapter_name`'s factors under PEFT's keys (detached, on the CPU).

    A layer's A is [r, in] and its B [out, r] (an embedding's A is [r, num_embeddings]; a
    convolution's are PEFT's conv factors, A [r, in_channels, *kernel] and B [out, r, 1, ...]:
    `conv.peft_factor_shapes`); a DoRA layer adds its magnitude [out] (`magnitude_key`).

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.peft_format import lora_state_dict
        >>> model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 4))), ["q"], r=2)
        >>> {key: tuple(tensor.shape) for key, tensor in lora_state_dict(model).items()}
        {'base_model.model.q.lora_A.weight': (2, 8), 'base_model.model.q.lora_B.weight': (4, 2)}
    """
    check_known(model, adapter_name)
    state = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.A:
            key_A, key_B = _keys(name, isinstance(layer, LoRAEmbedding))
            A, B = layer.A[adapter_name], layer.B[adapter_name]  # (r, in), (out, r)
            if isinstance(layer, LoRAConv):  # (r, in_channels, *kernel), (out, r, 1, ...)
                A, B = layer.conv_factors(adapter_name)
            state[key_A] = A.detach().cpu().contiguous()
            state[key_B] = B.detach().cpu().contiguous()
            if isinstance(layer, DoRALinear):
                magnitude = layer.magnitude[adapter_name].detach().cpu().contiguous()  # (out,)
                state[magnitude_key(name)] = magnitude
    return state


def _target_modules(model: nn.Module, adapted: list[str]) -> list[str]:
    """The shortest PEFT target list that selects exactly `adapted`: the layers' last name
    parts ("q_proj") when those select nothing else, their full names otherwise."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    selected = [n for n in module_names(model) if any(matches(n, t) for t in leaves)]
    return leaves if sorted(selected) == sorted(adapted) else sorted(adapted)


def _plain_number(value: float) -> float | int:
    """16.0 -> 16 (PEFT configs hold ints where they can), 0.5 stays 0.5."""
    return int(value) if float(value).is_integer() else value


def _pattern_key(name: str, suffixes: set[str]) -> str:
    """A rank_pattern / alpha_pattern key for exactly layer `name`. PEFT reads a key as the
    end of a name (`(.*\\.)?(key)$`), so the escaped name also selects a layer whose name ends
    in "." + name ("1" would select "0.1"): then it is anchored with ^."""
    return ("^" if name in suffixes else "") + re.escape(name)


def _modules_to_save(model: nn.Module, adapter_name: str) -> list[str] | None:
    """The paths of the modules the adapter trains in full, for the config (None: none);
    ValueError where PEFT, which selects a module when its name ends with an entry, would
    read them as more modules ("0" would select "10" too)."""
    saved = [name for name, w in saved_modules(model) if adapter_name in w.modules_to_save]
    if not saved:
        return None
    for name in module_names(model):
        if name not in saved and any(peft_selects(name, entry) for entry in saved):
            raise ValueError(
                f"modules_to_save {saved} would also select {name!r} in PEFT (it takes a name "
                "that ends with an entry); rename the module or leave it out"
            )
    return saved


def _most_common(values: dict[str, float]) -> float:
    return Counter(values.values()).most_common(1)[0][0]


def adapter_config(
    model: nn.Module, adapter_name: str = "default", base_model_name_or_path: str | None = None
) -> dict:
    """The adapter_config.json PEFT would write for this adapter (LoraConfig's fields).

    r and lora_alpha are the most common values; layers that differ are listed in
    rank_pattern / alpha_pattern under their escaped full names (PEFT reads keys as regexes;
    `_pattern_key`).

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.peft_format import adapter_config
        >>> model = nn.Sequential(
        ...     OrderedDict(q=nn.Linear(8, 8), k=nn.Linear(8, 8), v=nn.Linear(8, 8))
        ... )
        >>> _ = add_lora(model, ["q", "k", "v"], r=2, alpha=4, rank_pattern={"v": 4})
        >>> config = adapter_config(model)
        >>> config["r"], config["lora_alpha"], config["target_modules"], config["rank_pattern"]
        (2, 4, ['k', 'q', 'v'], {'v': 4})
    """
    check_known(model, adapter_name)
    layers = [(n, layer) for n, layer in lora_layers(model) if adapter_name in layer.A]
    ranks = {n: layer.r[adapter_name] for n, layer in layers}
    alphas = {n: _plain_number(layer.alpha[adapter_name]) for n, layer in layers}
    rslora = {layer.use_rslora[adapter_name] for _, layer in layers}
    dropouts = {getattr(layer.dropout[adapter_name], "p", 0.0) for _, layer in layers}
    dora = {isinstance(layer, DoRALinear) for _, layer in layers}
    if len(rslora) > 1 or len(dropouts) > 1 or len(dora) > 1:
        raise ValueError(
            f"adapter {adapter_name!r} mixes use_rslora {rslora}, dropout {dropouts} or "
            f"use_dora {dora} across layers; the PEFT format has one value of each"
        )
    r, alpha = _most_common(ranks), _most_common(alphas)
    suffixes = {n[i + 1 :] for n in ranks for i, char in enumerate(n) if char == "."}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropouts.pop(),
        "use_rslora": rslora.pop(),
        "target_modules": _target_modules(model, [n for n, _ in layers]),
        "rank_pattern": {_pattern_key(n, suffixes): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {_pattern_key(n, suffixes): v for n, v in alphas.items() if v != alpha},
        "fan_in_fan_out": any(isinstance(layer, LoRAConv1D) for _, layer in layers),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": _modules_to_save(model, adapter_name),
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": dora.pop(),
        "revision": None,
    }


def adapter_writer(
    model: nn.Module, adapter_name: str, base_model_name_or_path: str | None
) -> Callable[[Path], None]:
    """Everything checked and gathered now; the returned function writes the two files into
    a folder (the temporary one of `write_folder_atomically`).

    Examples:
        >>> import tempfile
        >>> from collections import OrderedDict
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.peft_format import adapter_writer
        >>> model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 4))), ["q"], r=2)
        >>> write = adapter_writer(model, "default", None)  # a bad adapter raises here
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     write(Path(folder))
        ...     sorted(path.name for path in Path(folder).iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    config = adapter_config(model, adapter_name, base_model_name_or_path)
    tensors = lora_state_dict(model, adapter_name)
    for key, tensor in modules_to_save_state_dict(model, adapter_name).items():
        tensors[PREFIX + key] = tensor
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    def write(folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(text, encoding="utf-8")
        save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})

    return write


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write adapter `adapter_name` to folder `path` as PEFT does (see the module docstring).

    The folder changes as a unit (`lowrank._folders.write_folder_atomically`): the files are
    written into a temporary sibling folder that then takes the folder's place, so a process
    killed at any instant leaves the old adapter or the new one, complete, never the new
    config beside the old weights. Other files in the folder (a training log) are kept; an
    `adapter_model.bin` from an earlier save is dropped (it would contradict the new config).
    `PeftModel.from_pretrained(base_model, path)` loads it.

    Examples:
        >>> import tempfile
        >>> from collections import OrderedDict
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.peft_format import save_adapter
        >>> model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 4))), ["q"], r=2)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_adapter(model, Path(tmp) / "adapter")
        ...     sorted(path.name for path in (Path(tmp) / "adapter").iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    write_folder_atomically(
        path, adapter_writer(model, adapter_name, base_model_name_or_path), owns=ADAPTER_FILES
    )


# Config fields lowrank does not implement, with the values that mean "not used". Loading a
# file that uses one would silently compute something else than PEFT, so it is refused.
UNSUPPORTED = {
    "peft_type": ("LORA",),
    "bias": ("none",),
    "layers_to_transform": (None, []),
    "exclude_modules": (None, [], ""),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "lora_bias": (False, None),
    "layer_replication": (None, []),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "use_bdlora": (None, False),
    "megatron_config": (None,),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "velora_config": (None,),
    "monteclora_config": (None,),
}


def _check_config(raw: object, path: Path) -> dict:
    """The config's values lowrank uses, each checked (`lowrank._validate`), with PEFT's
    defaults for missing ones (r=8, lora_alpha=8). ValueError naming the file and the field.

    Deliberate difference from PEFT: lora_alpha must be > 0 (PEFT takes 0 or a negative
    number, which turn the adapter off or reverse it), as `add_lora` requires."""
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    for key, allowed in UNSUPPORTED.items():
        if raw.get(key, allowed[0]) not in allowed:
            raise ValueError(f"{path}: {key}={raw[key]!r} is not supported")
    try:
        config = {
            "r": check_int("r", raw.get("r", 8)),
            "lora_alpha": check_positive_number("lora_alpha", raw.get("lora_alpha", 8)),
            "lora_dropout": check_dropout(raw.get("lora_dropout", 0.0), "lora_dropout"),
            "use_rslora": check_bool("use_rslora", raw.get("use_rslora", False)),
            "use_dora": check_bool("use_dora", _false_if_none(raw.get("use_dora"))),
            "fan_in_fan_out": check_bool("fan_in_fan_out", raw.get("fan_in_fan_out", False)),
            "target_modules": _check_targets(raw.get("target_modules")),
            "modules_to_save": _check_modules_to_save(raw.get("modules_to_save")),
            "rank_pattern": _check_pattern(raw, "rank_pattern", lambda k, v: check_int(k, v)),
            "alpha_pattern": _check_pattern(raw, "alpha_pattern", check_positive_number),
        }
    except ValueError as error:
        raise type(error)(f"{path}: {error}") from None
    return config


def _false_if_none(value: object) -> object:
    return False if value is None else value  # PEFT writes null or false for "no DoRA"


def _check_targets(targets: object) -> str | list[str]:
    if targets == "all-linear":
        raise ValueError("target_modules='all-linear' (PEFT's shorthand) is not supported")
    if isinstance(targets, str):
        _patterns.compile_pattern(targets)  # a syntax error names the pattern
        return targets
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        return targets
    raise ValueError(f"target_modules must be a str (regex) or a list of str, got {targets!r}")


def _check_modules_to_save(entries: object) -> list[str]:
    if entries is None:
        return []
    if isinstance(entries, list) and all(isinstance(e, str) and e for e in entries):
        return entries
    raise ValueError(f"modules_to_save must be null or a list of module names, got {entries!r}")


def _check_pattern(raw: dict, field: str, check: Callable[[str, object], object]) -> dict:
    """rank_pattern / alpha_pattern: {regex key: value}, keys compiled, values checked."""
    patterns = raw.get(field) or {}
    if not isinstance(patterns, dict):
        raise ValueError(f"{field} must be an object {{pattern: value}}, got {patterns!r}")
    checked = {key: check(f"{field}[{key!r}]", value) for key, value in patterns.items()}
    _patterns.check_pattern_keys(checked)
    return checked


def read_adapter_files(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checked config and the tensors of an adapter folder; ValueError naming the file
    that is missing or unreadable. Call inside `reading_folder(folder)`.

    Examples:
        >>> import tempfile
        >>> from collections import OrderedDict
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from lowrank._folders import reading_folder
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.peft_format import read_adapter_files, save_adapter
        >>> model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 4))), ["q"], r=2)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_adapter(model, Path(tmp) / "adapter")
        ...     with reading_folder(Path(tmp) / "adapter") as folder:
        ...         config, tensors = read_adapter_files(folder)
        >>> config["r"], config["target_modules"], sorted(tensors)
        (2, ['q'], ['base_model.model.q.lora_A.weight', 'base_model.model.q.lora_B.weight'])
    """
    config_path = folder / CONFIG_NAME
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{config_path} is missing: {folder} is no PEFT adapter") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} cannot be read as JSON: {error}") from None
    config = _check_config(raw, config_path)
    return config, read_tensors(folder / WEIGHTS_NAME)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each checked to be a finite floating tensor.
    ValueError naming the file (and the key) otherwise.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from safetensors.torch import save_file
        >>> from lowrank.torch.peft_format import read_tensors
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_file({"A": torch.zeros(2, 8)}, Path(tmp) / "good.safetensors")
        ...     save_file({"ids": torch.arange(3)}, Path(tmp) / "bad.safetensors")
        ...     good = read_tensors(Path(tmp) / "good.safetensors")
        ...     read_tensors(Path(tmp) / "bad.safetensors")
        Traceback (most recent call last):
            ...
        ValueError: ...bad.safetensors: ids has dtype torch.int64; expected floating point
        >>> good["A"].shape
        torch.Size([2, 8])
    """
    if not path.is_file():
        pickle = path.with_name(PICKLE_NAME)
        hint = f" ({pickle.name}, a pickle, is not read: save it as safetensors)"
        raise ValueError(f"{path} is missing{hint if pickle.exists() else ''}")
    try:
        with safe_open(path, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: {key} has dtype {tensor.dtype}; expected floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: {key} holds NaN or infinite values")
    return tensors

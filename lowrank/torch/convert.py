"""Another tool's LoRA adapter written as a PEFT adapter, with a proof (`convert_adapter`).

The source is read by `adapter_files.read_adapter` (PEFT under another scale convention,
mlx-lm, loralib) into layers with A (r, in), B (out, r) and the scale s of the update
s * B @ A (LoRA: Hu et al. 2021, arXiv:2106.09685). PEFT's scale is lora_alpha / r, so each
layer is written with lora_alpha = s * r (r and lora_alpha the most common values,
rank_pattern / alpha_pattern for the other layers, as `peft_format.adapter_config` writes
them) and use_rslora false. The factors are written as the source stores them (mlx-lm's
transposed back to PEFT's layout), dtype kept: folding s into B would round a bfloat16 B a
second time and make a round trip change the bytes; the scale stays exact in the config.

Every conversion ends with a proof, before the folder is swapped in (it is written with
`lowrank._folders.write_folder_atomically`, so a refused conversion leaves `out` as it was):
the written folder is loaded with lowrank's own loader (`peft_load`) into a model with those
layers, and for each layer its update on random inputs x (float64, seed 0) is compared with
the source's own formula applied to the raw source tensors:

    mlx-lm   scale * (x @ lora_a) @ lora_b          lora_a (in, r), lora_b (r, out)
    loralib  (x @ lora_A.T @ lora_B.T) * alpha / r  lora_A (r, in), lora_B (out, r)
    peft     (x @ A.T @ B.T) * s                    s by the source's convention

With `base` (a model folder or config.json) the model is built from that config with random
float64 weights, and the whole model's outputs on random token ids are compared too: the
converted adapter loaded, against the base with the source formula added by forward hooks.
Without a base, each layer gets a stand-in nn.Linear of its shape (every layer is then read
as a linear layer; embeddings are recognised only with a base). The largest difference must
be at most `TOLERANCE` times the largest output (at least 1): float64 rounding of the two
orders of multiplication is ~1e-15 relative, a transposed or mis-scaled factor is O(1).
"""

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from lowrank._folders import reading_folder, write_folder_atomically
from lowrank.torch.adapter_files import AdapterFiles, base_model, read_adapter
from lowrank.torch.model import add_lora
from lowrank.torch.peft_format import (
    ADAPTER_FILES,
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    _keys,
    adapter_config,
    read_adapter_files,
)
from lowrank.torch.peft_load import apply_plan, plan_load

TOLERANCE = 1e-9  # relative to the largest output (at least 1), float64
SEED = 0

__all__ = ["TOLERANCE", "ConversionResult", "convert_adapter"]


@dataclass(frozen=True)
class ConversionResult:
    """A conversion and its proof: the largest |converted - source| per layer (and for the
    whole model with a base), and the bound they had to meet.

    Examples:
        >>> from lowrank.torch.convert import ConversionResult
        >>> result = ConversionResult("lora.pt", "peft", "loralib", "s = alpha / r", [("q", 0.0)],
        ...                           None, 1e-9)
        >>> print(result.to_text().splitlines()[-1])
        largest 0 <= bound 1e-09: the outputs agree
    """

    source: str
    out: str
    format: str
    convention: str
    layers: list[tuple[str, float]]  # (layer, max abs difference)
    model_difference: float | None
    bound: float

    def to_text(self) -> str:
        """The proof as printed by `lowrank convert` (lines under 100 columns)."""
        width = min(60, max(len(name) for name, _ in self.layers))
        lines = [
            f"converted {self.source} ({self.format}; {self.convention})",
            f"       -> {self.out} (PEFT)",
            f"proof: each layer's update on random float64 inputs (seed {SEED}), the converted",
            "adapter through lowrank's loader against the source's own formula",
            "",
            f"{'layer':<{width}}  max |difference|",
        ]
        lines += [f"{name[-width:]:<{width}}  {diff:.3g}" for name, diff in self.layers]
        if self.model_difference is not None:
            lines.append(f"{'whole model (outputs)':<{width}}  {self.model_difference:.3g}")
        worst = max([d for _, d in self.layers] + [self.model_difference or 0.0])
        lines.append(f"largest {worst:.3g} <= bound {self.bound:.3g}: the outputs agree")
        return "\n".join(lines)


def _stand_in(adapter: AdapterFiles) -> nn.Module:
    """A module tree with an nn.Linear (float64, random, no bias) at each layer's path."""
    root = nn.Module()
    generator = torch.Generator().manual_seed(SEED)
    for name, layer in adapter.layers.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        linear = nn.Linear(layer.A.shape[1], layer.B.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator))
        parent.add_module(leaf, linear)
    return root


def _embeddings(adapter: AdapterFiles, model: nn.Module) -> dict[str, bool]:
    """Which layers are embeddings: PEFT's keys say so; otherwise the base's module type."""
    modules = dict(model.named_modules())
    missing = [name for name in adapter.layers if name not in modules]
    if missing:
        raise ValueError(
            f"{adapter.path}: {len(missing)} layers name no module of the base: {missing[:3]}"
        )
    return {
        name: layer.embedding or isinstance(modules[name], nn.Embedding)
        for name, layer in adapter.layers.items()
    }


def _dropout(adapter: AdapterFiles) -> float:
    if adapter.format == "peft":
        return float(adapter.config.get("lora_dropout") or 0.0)
    if adapter.format == "mlx-lm":
        return float(adapter.config["lora_parameters"].get("dropout") or 0.0)
    return 0.0


def _peft_config(adapter: AdapterFiles, model: nn.Module, embedding: dict, exact: bool) -> dict:
    """adapter_config.json for the layers with lora_alpha = s * r, from a copy of `model`
    with the layers wrapped (so `adapter_config` picks r, lora_alpha and the patterns)."""
    model = copy.deepcopy(model)
    groups: dict[tuple[int, float], list[str]] = {}
    for name, layer in adapter.layers.items():
        groups.setdefault((layer.r, layer.scale * layer.r), []).append(name)
    for (r, alpha), names in groups.items():
        pattern = "|".join(re.escape(n) for n in names)
        add_lora(model, pattern, r=r, alpha=alpha, dropout=_dropout(adapter))
    config = adapter_config(model)
    if exact:  # stand-ins hold only the adapted layers: a leaf name would select more
        config["target_modules"] = sorted(adapter.layers)
    if adapter.format == "peft":
        for key in ("task_type", "base_model_name_or_path", "modules_to_save"):
            config[key] = adapter.config.get(key)
    return config


def _source_update(adapter: AdapterFiles, name: str, x: torch.Tensor, embedding: bool):
    """The update of layer `name` on x (batch, in) or token ids, by the source format's own
    formula on its raw tensors, in float64."""
    raw = adapter.raw
    if adapter.format == "mlx-lm":
        lora_a, lora_b = raw[f"{name}.lora_a"].double(), raw[f"{name}.lora_b"].double()
        scale = float(adapter.config["lora_parameters"]["scale"])
        # lora_a (in, r), lora_b (r, out); an embedding's lora_a is (num, r): rows by id
        hidden = lora_a[x] if embedding else x @ lora_a  # (batch, in) @ (in, r) -> (batch, r)
        return scale * hidden @ lora_b  # (batch, r) @ (r, out) -> (batch, out)
    if adapter.format == "loralib":
        A, B = raw[f"{name}.lora_A"].double(), raw[f"{name}.lora_B"].double()
        scale = adapter.layers[name].alpha / A.shape[0]
    else:
        key_A, key_B = _keys(name, adapter.layers[name].embedding)
        A, B, scale = raw[key_A].double(), raw[key_B].double(), adapter.layers[name].scale
    # A (r, in), B (out, r); an embedding's A is (r, num): columns by id
    hidden = F.embedding(x, A.T) if embedding else x @ A.T  # (batch, in) @ (in, r) -> (batch, r)
    return hidden @ B.T * scale  # (batch, r) @ (r, out) -> (batch, out)


def _load(folder: Path, model: nn.Module, names: list[str], keep_extra: bool) -> nn.Module:
    """The written folder loaded by lowrank's loader into a copy of `model`; without a base
    (keep_extra False) only the factors: stand-ins have no modules_to_save to load into."""
    model = copy.deepcopy(model)
    with reading_folder(folder) as readable:
        config, tensors = read_adapter_files(readable)
    if not keep_extra:
        factors = {key for name in names for key in _keys(name, False) + _keys(name, True)}
        tensors = {k: t for k, t in tensors.items() if k in factors}
        config = dict(config, modules_to_save=[])
    apply_plan(model, plan_load(model, folder, config, tensors))
    return model.eval()


def _prove(
    folder: Path, adapter: AdapterFiles, model: nn.Module, embedding: dict, with_base: bool
) -> tuple[list[tuple[str, float]], float | None, float]:
    """Per-layer largest differences, the whole model's (with a base) and the bound."""
    generator = torch.Generator().manual_seed(SEED)
    loaded = _load(folder, model, list(adapter.layers), keep_extra=with_base)
    differences, largest, model_difference = [], 1.0, None
    with torch.no_grad():
        for name, layer in adapter.layers.items():
            size_in = layer.A.shape[1]
            if embedding[name]:
                x = torch.randint(0, size_in, (4, 3), generator=generator)
            else:
                x = torch.randn(4, size_in, generator=generator, dtype=torch.float64)
            module = loaded.get_submodule(name)
            converted = module(x) - module.base_layer(x)
            source = _source_update(adapter, name, x, embedding[name])
            differences.append((name, float((converted - source).abs().max())))
            largest = max(largest, float(module(x).abs().max()))
        if with_base:
            vocab = model.get_input_embeddings().num_embeddings
            ids = torch.randint(0, vocab, (2, 8), generator=generator)
            reference = copy.deepcopy(model)
            for name in adapter.layers:
                reference.get_submodule(name).register_forward_hook(
                    lambda module, args, out, name=name: (
                        out + _source_update(adapter, name, args[0], embedding[name])
                    )
                )
            expected, got = reference(input_ids=ids)[0], loaded(input_ids=ids)[0]
            model_difference = float((got - expected).abs().max())
            largest = max(largest, float(expected.abs().max()))
    return differences, model_difference, TOLERANCE * largest


def convert_adapter(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str | None = None,
    convention: str | None = None,
    alpha: float | None = None,
    base: str | os.PathLike | None = None,
) -> ConversionResult:
    """Write the adapter at `source` as a PEFT adapter folder `out`, proven equal (module
    docstring); ValueError, and `out` unchanged, if the proof fails or the input is bad.

    format: "peft", "mlx-lm", "loralib" or None (detected); convention: PEFT-layout files'
    scale ("alpha/r", "alpha", "none"); alpha: loralib's (required there); base: a model
    folder or config.json the adapter belongs to.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from lowrank.torch.convert import convert_adapter
        >>> state = {"q.lora_A": torch.randn(2, 8), "q.lora_B": torch.randn(4, 2)}
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     torch.save(state, Path(tmp) / "lora.pt")  # loralib's layout
        ...     result = convert_adapter(Path(tmp) / "lora.pt", Path(tmp) / "peft", alpha=8)
        ...     config = json.loads((Path(tmp) / "peft" / "adapter_config.json").read_text())
        >>> config["r"], config["lora_alpha"], result.layers[0][1] <= result.bound
        (2, 8, True)
    """
    adapter = read_adapter(source, format=format, convention=convention, alpha=alpha)
    model = _stand_in(adapter) if base is None else base_model(base, meta=False)
    embedding = _embeddings(adapter, model)
    config = _peft_config(adapter, model, embedding, exact=base is None)
    tensors = {}
    for name, layer in adapter.layers.items():
        key_A, key_B = _keys(name, embedding[name])
        tensors[key_A], tensors[key_B] = layer.A.contiguous(), layer.B.contiguous()
    tensors.update({PREFIX + key: t.contiguous() for key, t in adapter.extra.items()})
    proof = []

    def write_and_prove(folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        differences, model_difference, bound = _prove(
            folder, adapter, model, embedding, base is not None
        )
        worst = max([d for _, d in differences] + [model_difference or 0.0])
        if not worst <= bound:
            raise ValueError(
                f"conversion of {source} refused: the converted adapter's outputs differ from "
                f"the source's by {worst:.3g} (bound {bound:.3g}); nothing was written"
            )
        proof.append((differences, model_difference, bound))

    write_folder_atomically(out, write_and_prove, owns=ADAPTER_FILES)
    differences, model_difference, bound = proof[0]
    return ConversionResult(
        str(source),
        str(out),
        adapter.format,
        adapter.convention,
        differences,
        model_difference,
        bound,
    )

"""What is in a LoRA adapter (`inspect_adapter`): per layer its update's spectrum from the
factors alone, and, against a base model, what fits, what is missing and what PEFT would skip.

The update of a layer is s * B @ A (LoRA: Hu et al. 2021, arXiv:2106.09685), read from any
format by `adapter_files.read_adapter`. Its singular values come from the r x r core of
`factored.factored_core` (QR of B and of A.T: the (out, in) matrix is never built), and
`analysis.energy_rank` / `analysis.effective_rank` (Roy & Vetterli 2007) are applied to that
core times s: it has the same singular values as the update, so the same ranks.

With a base (a model folder or a bare config.json, built on the meta device by
`adapter_files.base_model`: only names and shapes are read):

- coverage: the layers the adapter's targets select that get no factors, and the factors that
  name no module of the model (mlx-lm's `keys` over its last `num_layers` blocks; loralib
  files name no targets);
- shapes: each A (r, in) and B (out, r) against the module's in_features / out_features (a
  conv's factors flattened: in = in_channels * prod(kernel), `lowrank.torch.conv`);
- for a PEFT file, the keys PEFT's loader would skip without an error (`peft_skips`): PEFT
  wraps the modules target_modules selects, renames the file's keys to its own and calls
  `load_state_dict(strict=False)`, so a key that names nothing in the wrapped model is
  dropped (PEFT warns at most). The rule is written out here, without PEFT; the tests check
  it equals PEFT's own `unexpected_keys`.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowrank import _patterns
from lowrank._files import write_atomically
from lowrank.accounting import format_bytes
from lowrank.torch.adapter_files import AdapterFiles, base_model, read_adapter
from lowrank.torch.analysis import effective_rank, energy_rank, singular_values
from lowrank.torch.factored import factored_core
from lowrank.torch.model import features, match_targets, wrapper_for
from lowrank.torch.modules_to_save import peft_selects, select_modules
from lowrank.torch.peft_format import PREFIX, _check_config

__all__ = ["LayerReport", "BaseCheck", "AdapterReport", "inspect_adapter", "peft_skips"]


@dataclass(frozen=True)
class LayerReport:
    """One layer: A (r, in), B (out, r), s; the update s * B @ A's Frobenius norm, singular
    values (descending), energy rank at the report's `energy` and effective rank.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from lowrank.torch.adapter_report import inspect_adapter
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     torch.save({"q.lora_A": torch.eye(2, 8), "q.lora_B": torch.eye(4, 2)},
        ...                Path(tmp) / "lora.pt")
        ...     report = inspect_adapter(Path(tmp) / "lora.pt", alpha=2)
        >>> layer = report.layers[0]; layer.singular_values, layer.energy_rank, layer.effective_rank
        ([1.0, 1.0], 2, 2.0)
    """

    name: str
    shape: tuple[int, int]  # (out, in) of the update
    r: int
    alpha: float | None
    scale: float
    dtype: str
    norm: float
    singular_values: list[float]
    energy_rank: int
    effective_rank: float


@dataclass(frozen=True)
class BaseCheck:
    """The adapter against a base model: target layers without factors (None where the
    format names no targets), factors that name no module, shape mismatches, and the keys
    PEFT would skip (None for files PEFT cannot read).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from lowrank.torch.adapter_report import inspect_adapter
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     torch.save({"q.lora_A": torch.eye(2, 8), "q.lora_B": torch.eye(4, 2)},
        ...                Path(tmp) / "lora.pt")
        ...     report = inspect_adapter(Path(tmp) / "lora.pt", alpha=2)
        >>> report.base is None  # no base given: no BaseCheck
        True
    """

    base: str
    missing: list[str] | None
    unmatched: list[str]
    shape_problems: list[str]
    peft_skips: list[str] | None


@dataclass(frozen=True)
class AdapterReport:
    """What `inspect_adapter` found; `to_text()` for a terminal, `to_dict()` for JSON.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from lowrank.torch.adapter_report import inspect_adapter
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     torch.save({"q.lora_A": torch.eye(2, 8), "q.lora_B": torch.eye(4, 2)},
        ...                Path(tmp) / "lora.pt")
        ...     report = inspect_adapter(Path(tmp) / "lora.pt", alpha=2)
        >>> report.format, round(report.to_dict()["layers"][0]["norm"], 4)
        ('loralib', 1.4142)
        >>> print(report.to_text().splitlines()[1])
        format      loralib; scale s = alpha / r (loralib; alpha = 2 given)
    """

    path: str
    format: str
    convention: str
    targets: object
    size_on_disk: int
    dtypes: list[str]
    energy: float
    layers: list[LayerReport]
    extra: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    base: BaseCheck | None = None

    def to_dict(self) -> dict:
        """Everything as JSON-ready values."""
        return asdict(self)

    def to_text(self) -> str:
        """A readable report, lines under 100 columns: a header, a table of the layers."""
        lines = [
            f"adapter     {self.path}",
            f"format      {self.format}; scale {self.convention}",
            f"targets     {_short(json.dumps(self.targets), 86)}",
            f"layers      {len(self.layers)}; dtype {', '.join(self.dtypes)}; "
            f"{format_bytes(self.size_on_disk)} on disk",
        ]
        if self.extra:
            lines.append(
                f"carried     {len(self.extra)} tensors that are not factors: "
                f"{_short(', '.join(self.extra), 50)}"
            )
        if self.ignored:
            lines.append(
                f"ignored     {len(self.ignored)} keys (not factors): "
                f"{_short(', '.join(self.ignored), 60)}"
            )
        lines += [
            "",
            f"{'layer':<32} {'out x in':>10} {'r':>3} {'s':>7} {'||sBA||_F':>9} "
            f"{'E' + format(self.energy, 'g'):>5} {'eff':>5}  top sing. values",
        ]
        for layer in self.layers:
            top = " ".join(f"{v:.3g}" for v in layer.singular_values[:3])
            lines.append(
                f"{_short(layer.name, 32):<32} {'x'.join(map(str, layer.shape)):>10} "
                f"{layer.r:>3} {layer.scale:>7.4g} {layer.norm:>9.4g} {layer.energy_rank:>5} "
                f"{layer.effective_rank:>5.2f}  {_short(top, 18)}"
            )
        lines.append(
            f"(E{self.energy:g}: energy rank, directions holding that share of "
            "||sBA||_F^2; eff: effective rank)"
        )
        if self.base is not None:
            lines += ["", f"against the base {self.base.base}:"]
            for label, items in (
                ("target layers without factors", self.base.missing),
                ("factors that match no module", self.base.unmatched),
                ("shapes that do not fit", self.base.shape_problems),
                ("keys PEFT would skip silently", self.base.peft_skips),
            ):
                if items is None:
                    continue
                lines.append(f"  {label}: {len(items)}")
                lines += [f"    {_short(item, 94)}" for item in items[:10]]
                if len(items) > 10:
                    lines.append(f"    ... and {len(items) - 10} more (--json lists all)")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path:
        """Write the per-layer spectra (singular values of s * B @ A) to one PNG, atomically."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        figure, axes = plt.subplots(figsize=(7, 4))
        for layer in self.layers:
            axes.semilogy(
                range(1, len(layer.singular_values) + 1),
                layer.singular_values,
                marker=".",
                linewidth=1,
                alpha=0.7,
            )
        axes.set(
            xlabel="index i",
            ylabel="singular value of s·B·A",
            title=f"{Path(self.path).name}: {len(self.layers)} layers",
        )
        figure.tight_layout()
        try:
            return write_atomically(path, lambda tmp: figure.savefig(tmp, format="png"))
        finally:
            plt.close(figure)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[len(text) - width + 3 :]


def _layer_report(layer, energy: float) -> LayerReport:
    _, core, _ = factored_core(layer.B, layer.A)  # (k_B, k_A), the singular values of B @ A
    core = core * layer.scale  # those of s * B @ A
    values = singular_values(core)
    return LayerReport(
        name=layer.name,
        shape=(layer.B.shape[0], layer.A.shape[1]),
        r=layer.r,
        alpha=layer.alpha,
        scale=layer.scale,
        dtype=str(layer.A.dtype).removeprefix("torch."),
        norm=float(torch.linalg.norm(values)),
        singular_values=[float(v) for v in values],
        energy_rank=energy_rank(core, energy),
        effective_rank=effective_rank(core),
    )


def peft_skips(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    """The keys of a PEFT file that PEFT's loader would drop on `model` without an error.

    PEFT wraps each module target_modules selects (modules_to_save and what is inside them
    left out); its LoRA state holds `<path>.lora_A/B.weight` (a Linear or Conv1D) or
    `<path>.lora_embedding_A/B` (an Embedding), the wrapped module's own weights move to
    `<path>.base_layer.<name>`, a modules_to_save module's file keys are its own, and every
    other module keeps its state dict keys. A key of the file (`config` and `tensors` as
    `peft_format.read_adapter_files` reads them) that is none of these is skipped.

    Examples:
        >>> from collections import OrderedDict
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.adapter_report import peft_skips
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 4), k=nn.Linear(8, 4)))
        >>> config = {"target_modules": ["q"], "modules_to_save": []}
        >>> keys = ["q.lora_A.weight", "q.lora_B.weight", "k.lora_A.weight"]
        >>> peft_skips(model, config, {"base_model.model." + k: torch.zeros(1) for k in keys})
        ['base_model.model.k.lora_A.weight']
    """
    with _patterns.time_limit():
        targets = match_targets(model, config["target_modules"], every_pattern_must_match=False)
        saved = select_modules(
            model, config.get("modules_to_save") or [], peft_selects, every_entry_must_match=False
        )
    targets = [t for t in targets if not any(t == s or t.startswith(s + ".") for s in saved)]
    modules = dict(model.named_modules())
    loadable = set()
    for name in targets:
        parts = ("lora_embedding_A", "lora_embedding_B")
        if not isinstance(modules[name], nn.Embedding):
            parts = ("lora_A.weight", "lora_B.weight")
        loadable.update(f"{PREFIX}{name}.{part}" for part in parts)
    for key in model.state_dict():
        module, _, tensor = key.rpartition(".")
        loadable.add(f"{PREFIX}{module}.base_layer.{tensor}" if module in targets else PREFIX + key)
    return [key for key in tensors if key not in loadable]


def _mlx_expected(adapter: AdapterFiles, names: list[str]) -> list[str] | None:
    """The modules mlx-lm adapts: `keys` (relative to a block) in the last num_layers blocks
    (all blocks for num_layers <= 0); None without keys (mlx-lm's per-model default)."""
    keys = adapter.config["lora_parameters"].get("keys")
    if not keys:
        return None
    blocks = sorted(
        {
            int(n.split(".layers.")[1].split(".")[0])
            for n in names
            if ".layers." in n and n.split(".layers.")[1].split(".")[0].isdigit()
        }
    )
    count = adapter.config.get("num_layers", len(blocks))
    kept = set(blocks if count <= 0 else blocks[-count:])
    expected = []
    for name in names:
        head, sep, rest = name.partition(".layers.")
        index, _, inner = rest.partition(".")
        if sep and index.isdigit() and inner in keys and int(index) in kept:
            expected.append(name)
    return expected


def _check_base(adapter: AdapterFiles, base: str | os.PathLike) -> BaseCheck:
    model = base_model(base, meta=True)
    modules = dict(model.named_modules())
    if adapter.format == "peft":
        config = _check_config(adapter.config, adapter.path)
        with _patterns.time_limit():
            expected = match_targets(
                model, config["target_modules"], every_pattern_must_match=False
            )
        skips = peft_skips(model, config, adapter.raw)
    elif adapter.format == "mlx-lm":
        expected, skips = _mlx_expected(adapter, list(modules)), None
    else:
        expected, skips = None, None
    problems = []
    for name, layer in adapter.layers.items():
        module = modules.get(name)
        if module is None:
            continue
        if wrapper_for(module) is None:
            problems.append(f"{name}: a {type(module).__name__}, no layer LoRA applies to")
            continue
        size_in, size_out = features(module)
        if layer.A.shape[1] != size_in or layer.B.shape[0] != size_out:
            problems.append(
                f"{name}: A {tuple(layer.A.shape)}, B {tuple(layer.B.shape)} but the module "
                f"needs A (r, {size_in}), B ({size_out}, r)"
            )
    return BaseCheck(
        base=str(base),
        missing=None if expected is None else [n for n in expected if n not in adapter.layers],
        unmatched=[n for n in adapter.layers if n not in modules],
        shape_problems=problems,
        peft_skips=skips,
    )


def inspect_adapter(
    path: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    energy: float = 0.9,
    format: str | None = None,
    convention: str | None = None,
    alpha: float | None = None,
) -> AdapterReport:
    """Report on the adapter at `path` (any format `adapter_files.read_adapter` reads; format,
    convention and alpha as there), against `base` (a model folder or config.json) if given.

    Examples:
        >>> import tempfile
        >>> from collections import OrderedDict
        >>> from pathlib import Path
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch import add_lora, save_adapter
        >>> from lowrank.torch.adapter_report import inspect_adapter
        >>> model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 6))), ["q"], r=2, alpha=4)
        >>> _ = torch.nn.init.ones_(model.q.B["default"])  # as if trained
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_adapter(model, Path(tmp) / "adapter")
        ...     report = inspect_adapter(Path(tmp) / "adapter")
        >>> report.format, report.layers[0].shape, report.layers[0].scale
        ('peft', (6, 8), 2.0)
        >>> report.layers[0].energy_rank, len(report.layers[0].singular_values)  # B: rank 1
        (1, 2)
    """
    adapter = read_adapter(
        path, format=format, convention=convention, alpha=alpha, flatten_convs=True
    )
    layers = [_layer_report(layer, energy) for layer in adapter.layers.values()]
    if adapter.format == "peft":
        targets = adapter.config.get("target_modules")
    elif adapter.format == "mlx-lm":
        params = adapter.config["lora_parameters"]
        targets = {"keys": params.get("keys"), "num_layers": adapter.config.get("num_layers")}
    else:
        targets = None
    return AdapterReport(
        path=str(path),
        format=adapter.format,
        convention=adapter.convention,
        targets=targets,
        size_on_disk=adapter.size_on_disk,
        dtypes=sorted({layer.dtype for layer in layers}),
        energy=energy,
        layers=layers,
        extra=list(adapter.extra),
        ignored=adapter.ignored,
        base=None if base is None else _check_base(adapter, base),
    )

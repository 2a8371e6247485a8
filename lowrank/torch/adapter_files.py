"""The LoRA adapter files people have, read into one canonical form (`AdapterFiles`).

Every format stores, per adapted layer, two factors whose product is the update; they differ
in layout, key names and the scale (LoRA: Hu et al. 2021, arXiv:2106.09685). Here each layer
becomes A (r, in) and B (out, r) as stored (dtype kept) with the scale s such that the update
is Delta W = s * B @ A, under the model's own module path:

    format   file(s)                                  keys (per layer)          s
    peft     adapter_config.json +                    base_model.model.<path>   alpha / r, or
             adapter_model.safetensors (or .bin)       .lora_A.weight (r, in)    alpha / sqrt(r)
                                                       .lora_B.weight (out, r)   with use_rslora
    mlx-lm   adapter_config.json ("fine_tune_type":   <path>.lora_a (in, r)     lora_parameters
             "lora", "lora_parameters": {rank, scale,  <path>.lora_b (r, out)    .scale
             dropout, keys?}, num_layers) +
             adapters.safetensors
    loralib  one state dict (.pt / .bin / .pth:       <path>.lora_A (r, in)     alpha / r, alpha
             torch.load(weights_only=True); or         <path>.lora_B (out, r)    from the caller
             .safetensors)

- PEFT: read with `peft_format.read_adapter_files` (which checks the config and refuses what
  lowrank does not implement); r and alpha per layer resolve rank_pattern / alpha_pattern by
  PEFT's rule (`lowrank._patterns`). Tensors that are not factors (modules_to_save, saved
  embedding matrices) are carried in `extra`. `convention` overrides the scale for files in
  PEFT's layout whose producer scaled differently: "alpha" (older tutorials: s = alpha) or
  "none" (s = 1); "alpha/r" is PEFT's own rule.
- mlx-lm: followed from ml-explore/mlx-lm `mlx_lm/tuner/lora.py` and `tuner/utils.py` (2025,
  the version with `QuantizedLoRALinear`): `LoRALinear.__call__` is
  y = linear(x) + scale * (x @ lora_a) @ lora_b with lora_a (in, r), lora_b (r, out), so
  A = lora_a.T, B = lora_b.T, s = scale (mlx-lm's default scale is 20.0); `load_adapters`
  takes a missing fine_tune_type as "lora". DoRA ("dora"), full fine-tunes ("full") and the
  mixture-of-experts `LoRASwitchLinear` (3-D factors) are refused by name.
- loralib (Microsoft's `lora_state_dict`): s = alpha / r with alpha given by the caller (the
  file does not hold it). Other keys (the frozen base weights people save along) are listed
  in `ignored`, never turned into factors. A and B that disagree in r are what loralib's
  MergedLinear (grouped q, k, v with enable_lora) saves: refused by name.

Without a model, every layer is read as a linear layer (PEFT's `lora_embedding_A/B` keys are
the exception, marked `embedding`). A PEFT convolution's factors, A (r, in_channels, *kernel)
and B (out, r, 1, ...), are read flattened to A (r, in_channels * prod(kernel)) and B (out, r)
with `flatten_convs` (the conv as a linear map on patches, `lowrank.torch.conv`; `raw` keeps
them as stored), and refused without it. Every reader checks: A and B agree in r, finite floating
tensors, every A has its B, no other key that looks like a factor; errors name file and key.

(About 430 lines: three readers, each with the checks of what its files may hold.)
"""

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lowrank import _patterns
from lowrank._folders import reading_folder
from lowrank._validate import check_positive_number
from lowrank.torch.peft_format import (
    CONFIG_NAME,
    PICKLE_NAME,
    PREFIX,
    WEIGHTS_NAME,
    _check_config,
    read_adapter_files,
)

FORMATS = ("peft", "mlx-lm", "loralib")
CONVENTIONS = ("alpha/r", "alpha", "none")  # scale overrides for PEFT-layout files
MLX_WEIGHTS = "adapters.safetensors"
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

__all__ = [
    "FORMATS",
    "CONVENTIONS",
    "MLX_WEIGHTS",
    "LayerFactors",
    "AdapterFiles",
    "detect_format",
    "read_adapter",
    "base_model",
]

_PEFT_FACTOR = re.compile(
    r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)"
)


@dataclass(frozen=True)
class LayerFactors:
    """One adapted layer: the update is Delta W = scale * B @ A (an embedding's is its
    transpose, as in PEFT). A (r, in) and B (out, r) are the file's tensors, dtype kept;
    `alpha` is the source's alpha where it has one (None for mlx-lm).

    Examples:
        >>> import torch
        >>> from lowrank.torch.adapter_files import LayerFactors
        >>> layer = LayerFactors("q", torch.ones(2, 8), torch.ones(4, 2), scale=2.0, alpha=4.0)
        >>> layer.r, tuple((layer.scale * layer.B @ layer.A).shape)  # Delta W (out, in)
        (2, (4, 8))
    """

    name: str
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float
    alpha: float | None = None
    embedding: bool = False

    @property
    def r(self) -> int:
        """The rank: A's rows."""
        return self.A.shape[0]


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter read from disk in the canonical form (see the module docstring).

    `layers` maps module path -> LayerFactors (file order); `extra` holds tensors carried
    through that are not factors (PEFT modules_to_save, embedding matrices), by module path
    key without PEFT's prefix; `ignored` the keys read and left out (loralib's base weights);
    `raw` every tensor as the file holds it, under its own key; `convention` says in words
    how s was found; `config` is the source's config (JSON object, {} for loralib).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from lowrank.torch.adapter_files import read_adapter
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     torch.save({"q.lora_A": torch.ones(2, 8), "q.lora_B": torch.ones(4, 2)},
        ...                Path(tmp) / "lora.pt")
        ...     adapter = read_adapter(Path(tmp) / "lora.pt", alpha=4)
        ...     size = adapter.size_on_disk
        >>> list(adapter.layers), adapter.convention, size > 0
        (['q'], 's = alpha / r (loralib; alpha = 4 given)', True)
    """

    path: Path
    format: str
    convention: str
    layers: dict[str, LayerFactors]
    config: dict
    files: list[Path]
    raw: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    @property
    def size_on_disk(self) -> int:
        """Bytes of the files read."""
        return sum(path.stat().st_size for path in self.files)


def detect_format(path: str | os.PathLike) -> str:
    """ "peft", "mlx-lm" or "loralib" from what is at `path`; ValueError naming what is missing.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from lowrank.torch.adapter_files import detect_format
        >>> detect_format("lora.pt")  # a state dict file
        'loralib'
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     detect_format(tmp)
        Traceback (most recent call last):
            ...
        ValueError: ... is none of the adapter formats (peft, mlx-lm, loralib): ...
    """
    path = Path(path)
    if path.suffix in STATE_DICT_SUFFIXES and not path.is_dir():
        if path.name in (WEIGHTS_NAME, PICKLE_NAME, MLX_WEIGHTS):
            return detect_format(path.parent)
        return "loralib"
    config_path = path / CONFIG_NAME
    if config_path.is_file():
        raw = _read_json(config_path)
        if "lora_parameters" in raw or "fine_tune_type" in raw:
            return "mlx-lm"
        if "peft_type" in raw:
            return "peft"
    raise ValueError(
        f"{path} is none of the adapter formats ({', '.join(FORMATS)}): expected a folder "
        f"with {CONFIG_NAME} holding peft_type (PEFT) or lora_parameters (mlx-lm), or a "
        f"state dict file ({' '.join(STATE_DICT_SUFFIXES)}) for loralib"
    )


def read_adapter(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    convention: str | None = None,
    alpha: float | None = None,
    flatten_convs: bool = False,
) -> AdapterFiles:
    """Read an adapter folder or file into `AdapterFiles` (format auto-detected if None).

    `convention` ("alpha/r", "alpha", "none") applies to PEFT-layout files only; `alpha` is
    loralib's (required there, refused elsewhere: the other formats store their scale).
    `flatten_convs`: read a PEFT convolution's factors, A (r, in_channels, *kernel) and
    B (out, r, 1, ...), as the matrices (r, in_channels * prod(kernel)) and (out, r), the conv
    as a linear map on patches (`lowrank.torch.conv`; what `inspect` reports). Without it they
    are refused by name: a tool that writes the factors back as matrices would lose the layout.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from lowrank.torch.adapter_files import read_adapter
        >>> state = {"q.lora_A": torch.ones(2, 8), "q.lora_B": torch.ones(4, 2),
        ...          "q.weight": torch.zeros(4, 8)}  # loralib-style; q.weight: the base
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     torch.save(state, Path(tmp) / "lora.pt")
        ...     adapter = read_adapter(Path(tmp) / "lora.pt", alpha=4)
        >>> adapter.format, adapter.layers["q"].scale, adapter.ignored
        ('loralib', 2.0, ['q.weight'])
    """
    path = Path(path)
    format = detect_format(path) if format is None else format
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if convention is not None and (format != "peft" or convention not in CONVENTIONS):
        raise ValueError(
            f"convention {convention!r} applies to PEFT-layout files only and must be one of "
            f"{CONVENTIONS}; {path} is read as {format}"
        )
    if alpha is not None:
        alpha = check_positive_number("alpha", alpha)
        if format != "loralib":
            raise ValueError(
                f"--alpha is for loralib state dicts only; {format} files hold their scale"
            )
    if format == "peft":
        return _read_peft(path.parent if path.is_file() else path, convention, flatten_convs)
    if format == "mlx-lm":
        return _read_mlx(path.parent if path.is_file() else path)
    return _read_loralib(path, alpha)


def base_model(path: str | os.PathLike, *, meta: bool) -> nn.Module:
    """The transformers model a config describes: `path` is a model folder or a bare
    config.json; only the config is read. The class is the one the config's `architectures`
    names (AutoModel if it names none transformers has). meta=True builds it on the meta
    device (names and shapes, no memory); meta=False with random weights, in float64.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from transformers import LlamaConfig
        >>> from lowrank.torch.adapter_files import base_model
        >>> config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, vocab_size=40, architectures=["LlamaForCausalLM"])
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     config.save_pretrained(tmp)
        ...     model = base_model(Path(tmp) / "config.json", meta=True)
        >>> type(model).__name__, model.model.layers[0].self_attn.q_proj.weight.shape
        ('LlamaForCausalLM', torch.Size([16, 16]))
    """
    import transformers

    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise ValueError(f"{path}: no config.json (expected a model folder or a config.json)")
    _read_json(config_path)  # a readable JSON object, or a ValueError naming the file
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_path))
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{config_path} is not a transformers config: {error}") from None
    named = [getattr(transformers, a, None) for a in config.architectures or []]
    model_class = next((c for c in named if isinstance(c, type)), None)
    with torch.device("meta" if meta else "cpu"):
        model = model_class(config) if model_class else transformers.AutoModel.from_config(config)
    return model.eval() if meta else model.double().eval()


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read as JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _some_layers(path: Path, layers: dict) -> dict:
    if not layers:
        raise ValueError(f"{path} holds no LoRA factors")
    return layers


def _check_tensors(path: Path, tensors: dict) -> dict[str, torch.Tensor]:
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: {key} is a {type(tensor).__name__}, not a tensor")
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: {key} has dtype {tensor.dtype}; expected floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: {key} holds NaN or infinite values")
    return tensors


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a torch.save file read with weights_only=True (no code runs)."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder; a loralib state dict is one file (.pt, .bin)")
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors and torch.load raise their own error types
        raise ValueError(f"{path} is not a readable state dict: {error}") from None
    if not isinstance(tensors, dict):
        raise ValueError(
            f"{path}: expected a state dict (a dict of tensors), got {type(tensors).__name__}"
        )
    return _check_tensors(path, tensors)


def _pair(path: Path, name: str, A: torch.Tensor, B: torch.Tensor, keys: tuple[str, str]) -> None:
    """A (r, in) and B (out, r): 2-D, the same r. ValueError naming the file and keys."""
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(
            f"{path}: {keys[0]} is {tuple(A.shape)} and {keys[1]} is {tuple(B.shape)}; LoRA "
            "factors are matrices (3-D factors are mixture-of-experts layers, not supported; "
            "a convolution's are read by inspect only)"
        )
    if A.shape[0] != B.shape[1]:
        raise ValueError(
            f"{path}: layer {name}: A {keys[0]} {tuple(A.shape)} (r, in) and B {keys[1]} "
            f"{tuple(B.shape)} (out, r) disagree in r"
        )


def _flat_conv_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's factors of a Conv1d / Conv2d, A (r, in_channels, *kernel) and B (out, r, 1, ...),
    as the matrices (r, in_channels * prod(kernel)) and (out, r) (`lowrank.torch.conv`); other
    factors as they are."""
    if A.dim() in (3, 4) and B.dim() == A.dim() and all(size == 1 for size in B.shape[2:]):
        return A.flatten(1), B.flatten(1)
    return A, B


def _read_peft(folder: Path, convention: str | None, flatten_convs: bool) -> AdapterFiles:
    with reading_folder(folder) as readable:
        weights = readable / WEIGHTS_NAME
        if weights.is_file():
            config, tensors = read_adapter_files(readable)
        else:  # PEFT's older pickle, read without running code
            config = _check_config(_read_json(readable / CONFIG_NAME), readable / CONFIG_NAME)
            weights = readable / PICKLE_NAME
            tensors = _load_state_dict(weights)
        raw_config = _read_json(readable / CONFIG_NAME)
    if config.get("use_dora"):  # DoRA's magnitude rescales W + sBA: not a factor pair alone
        raise ValueError(f"{folder}: a DoRA adapter (use_dora); inspect and convert read LoRA only")
    pairs, extra = {}, {}
    for key in tensors:
        match = _PEFT_FACTOR.fullmatch(key.removeprefix(PREFIX)) if key.startswith(PREFIX) else None
        if match is None:
            if "lora_" in key:
                raise ValueError(
                    f"{weights}: {key} looks like a LoRA factor but is not one of PEFT's keys"
                )
            extra[key.removeprefix(PREFIX)] = tensors[key]
            continue
        name, kind = (match[1], match[2]) if match[1] else (match[3], match[4])
        pairs.setdefault(name, {})[kind[-1]] = key
    names = list(pairs)
    ranks = _patterns.pattern_values(config["rank_pattern"], names, config["r"])
    alphas = _patterns.pattern_values(config["alpha_pattern"], names, config["lora_alpha"])
    if convention is not None and config["use_rslora"]:
        raise ValueError(f"{folder}: use_rslora is set; a convention override would contradict it")
    rule = "alpha/sqrt(r) (rsLoRA)" if config["use_rslora"] else convention or "alpha/r"
    layers = {}
    for name, keys in pairs.items():
        if set(keys) != {"A", "B"}:
            have = next(iter(keys.values()))
            raise ValueError(
                f"{weights}: {have} has no matching {'B' if 'A' in keys else 'A'} factor"
            )
        A, B = tensors[keys["A"]], tensors[keys["B"]]
        if flatten_convs:
            A, B = _flat_conv_factors(A, B)
        _pair(weights, name, A, B, (keys["A"], keys["B"]))
        r, alpha = ranks[name], float(alphas[name])
        if A.shape[0] != r:
            raise ValueError(f"{weights}: {keys['A']} has rank {A.shape[0]}, the config says r={r}")
        scale = {
            "alpha/sqrt(r) (rsLoRA)": alpha / math.sqrt(r),
            "alpha/r": alpha / r,
            "alpha": alpha,
            "none": 1.0,
        }[rule]
        layers[name] = LayerFactors(
            name, A, B, scale, alpha, keys["A"].endswith("lora_embedding_A")
        )
    words = {
        "alpha/r": "s = alpha / r (PEFT)",
        "alpha/sqrt(r) (rsLoRA)": "s = alpha / sqrt(r) (PEFT, use_rslora)",
        "alpha": "s = alpha (convention override)",
        "none": "s = 1 (convention override)",
    }[rule]
    return AdapterFiles(
        folder,
        "peft",
        words,
        _some_layers(weights, layers),
        raw_config,
        [folder / CONFIG_NAME, weights],
        tensors,
        extra,
    )


def _read_mlx(folder: Path) -> AdapterFiles:
    with reading_folder(folder) as readable:
        config_path, weights = readable / CONFIG_NAME, readable / MLX_WEIGHTS
        config = _read_json(config_path)
        tensors = _load_state_dict(weights)
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ValueError(
            f"{config_path}: fine_tune_type={kind!r} is not supported (only mlx-lm's plain "
            "LoRA; DoRA and full fine-tunes are not LoRA factors)"
        )
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or "scale" not in params:
        raise ValueError(f"{config_path}: lora_parameters with a scale is missing")
    scale = params["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(
            f"{config_path}: lora_parameters.scale must be a finite number, got {scale!r}"
        )
    pairs = {}
    for key in tensors:
        name, dot, kind = key.rpartition(".")
        if not dot or kind not in ("lora_a", "lora_b"):
            raise ValueError(f"{weights}: {key} is no mlx-lm LoRA factor (<path>.lora_a / .lora_b)")
        pairs.setdefault(name, {})[kind] = key
    layers = {}
    for name, keys in pairs.items():
        if set(keys) != {"lora_a", "lora_b"}:
            have = next(iter(keys.values()))
            raise ValueError(
                f"{weights}: {have} has no matching {'lora_b' if 'lora_a' in keys else 'lora_a'}"
            )
        lora_a, lora_b = tensors[keys["lora_a"]], tensors[keys["lora_b"]]  # (in, r), (r, out)
        if lora_a.dim() != 2 or lora_b.dim() != 2:  # mlx-lm's LoRASwitchLinear: (experts, ...)
            _pair(weights, name, lora_a, lora_b, (keys["lora_a"], keys["lora_b"]))
        _pair(weights, name, lora_a.T, lora_b.T, (keys["lora_a"], keys["lora_b"]))
        if "rank" in params and lora_a.shape[1] != params["rank"]:
            raise ValueError(
                f"{weights}: {keys['lora_a']} has rank {lora_a.shape[1]}, "
                f"lora_parameters.rank is {params['rank']}"
            )
        layers[name] = LayerFactors(name, lora_a.T, lora_b.T, float(scale))
    return AdapterFiles(
        folder,
        "mlx-lm",
        "s = lora_parameters.scale (mlx-lm)",
        _some_layers(weights, layers),
        config,
        [config_path, weights],
        tensors,
    )


def _read_loralib(path: Path, alpha: float | None) -> AdapterFiles:
    tensors = _load_state_dict(path)
    if alpha is None:
        raise ValueError(
            f"{path}: a loralib state dict does not hold lora_alpha (the scale is alpha / r); "
            "give the alpha it was trained with (--alpha)"
        )
    pairs, ignored = {}, []
    for key in tensors:
        name, dot, kind = key.rpartition(".")
        if dot and kind in ("lora_A", "lora_B"):
            pairs.setdefault(name, {})[kind] = key
        elif "lora_" in key:
            raise ValueError(
                f"{path}: {key} looks like a LoRA factor but is not <path>.lora_A / .lora_B"
            )
        else:
            ignored.append(key)
    layers = {}
    for name, keys in pairs.items():
        if set(keys) != {"lora_A", "lora_B"}:
            have = next(iter(keys.values()))
            raise ValueError(
                f"{path}: {have} has no matching {'lora_B' if 'lora_A' in keys else 'lora_A'}"
            )
        A, B = tensors[keys["lora_A"]], tensors[keys["lora_B"]]
        if A.dim() == 2 and B.dim() == 2 and A.shape[0] != B.shape[1]:
            raise ValueError(
                f"{path}: layer {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                "disagree in r, as loralib's MergedLinear (grouped q,k,v with enable_lora) "
                "saves them; MergedLinear is not supported"
            )
        _pair(path, name, A, B, (keys["lora_A"], keys["lora_B"]))
        layers[name] = LayerFactors(name, A, B, alpha / A.shape[0], alpha)
    return AdapterFiles(
        path,
        "loralib",
        f"s = alpha / r (loralib; alpha = {alpha:g} given)",
        _some_layers(path, layers),
        {},
        [path],
        tensors,
        {},
        ignored,
    )

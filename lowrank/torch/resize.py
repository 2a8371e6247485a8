"""The best lower-rank version of a saved LoRA adapter, from its factors alone (`lowrank resize`).

A LoRA layer (Hu et al. 2021, arXiv:2106.09685) adds the update s B A, B (out, r), A (r, in),
s = alpha / r (alpha / sqrt(r) with rsLoRA). Its best rank-r' approximation in Frobenius norm
is the truncated SVD (Eckart & Young 1936), whose error is exactly sqrt(sum_{i > r'} s_i^2) over
the update's singular values s_i. `lowrank.torch.factored` finds those from two QRs and an
r x r core, never the (out, in) matrix, so a resize costs O((out + in) r^2) per layer.

    resize_adapter("my-adapter", "my-adapter-r4", rank=4)       # r' = min(4, r) everywhere
    resize_adapter("my-adapter", "my-adapter-90", energy=0.9)   # r' per layer: 90% of ||s B A||^2

What is written, and the scale convention: a PEFT folder whose layers hold the factors
B' = U_r' sqrt(S_r'), A' = sqrt(S_r') Vh_r' of the truncated update itself (the singular values
split evenly, as mergekit's extract-lora does), with lora_alpha = r' per layer and use_rslora
off, so that PEFT's scale alpha / r' is 1 and B' A' is the update. What is preserved is the
update s B A (up to the dropped tail), not the factor split nor the source's alpha / r ratio:
a layer's A and B change even at r' = r. Layers whose r' differs from the most common one get
rank_pattern and alpha_pattern entries (escaped exact names). Every other tensor (modules_to_save,
saved embedding matrices) and every other config field passes through unchanged. Resizing never
adds rank: a `rank` above a layer's r keeps that layer's r (reported as capped), because the
extra directions would be zeros. A conv layer's factors (PEFT's A (r, in_channels, *kernel),
B (out, r, 1, ...)) are resized as the matrices they flatten to and written back in that layout.

The report gives per layer r, r', ||s B A||_F, the error ||s B A - B' A'||_F of the written
factors (computed from the stacked factors `[s B, -B'] @ [A; A']`, again by QR) and the
Eckart-Young bound from the spectrum; the two agree up to the rounding of the stored dtype.
The rank choice (`choose_rank`) is shared with `lowrank.torch.extract`.
"""

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowrank import _patterns
from lowrank._folders import reading_folder, write_folder_atomically
from lowrank._validate import check_int
from lowrank.torch.adapter_files import _flat_conv_factors
from lowrank.torch.factored import factored_core, factored_svd
from lowrank.torch.peft_format import (
    ADAPTER_FILES,
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    _pattern_key,
    read_adapter_files,
)

__all__ = ["LayerResize", "ResizeReport", "check_rank_or_energy", "choose_rank", "resize_adapter"]

_FACTOR_SUFFIXES = {  # PEFT's key endings: (A's, B's)
    "linear": (".lora_A.weight", ".lora_B.weight"),
    "embedding": (".lora_embedding_A", ".lora_embedding_B"),
}


def check_rank_or_energy(rank: int | None, energy: float | None) -> None:
    """Exactly one of `rank` (an int >= 1) and `energy` (a share in (0, 1]); ValueError else.

    Examples:
        >>> from lowrank.torch.resize import check_rank_or_energy
        >>> check_rank_or_energy(4, None)
        >>> check_rank_or_energy(4, 0.9)
        Traceback (most recent call last):
            ...
        ValueError: give rank or energy, not both (got rank=4, energy=0.9)
    """
    if (rank is None) == (energy is None):
        what = "not both" if rank is not None else "one of them"
        raise ValueError(f"give rank or energy, {what} (got rank={rank}, energy={energy})")
    if rank is not None:
        check_int("rank", rank)
    elif isinstance(energy, bool) or not isinstance(energy, int | float):
        raise ValueError(f"energy must be a number in (0, 1], got {energy!r}")
    elif not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be a share in (0, 1], got {energy}")


def choose_rank(s: torch.Tensor, limit: int, rank: int | None, energy: float | None) -> int:
    """r' for a layer with singular values `s` (descending) that may keep at most `limit`:
    min(rank, limit), or the smallest r' whose top singular values hold `energy` of sum s_i^2
    (1 for a zero update: PEFT has no rank 0), at most `limit`.

    Examples:
        >>> import torch
        >>> from lowrank.torch.resize import choose_rank
        >>> s = torch.tensor([3.0, 2.0, 1.0])  # energy shares 9/14, 13/14, 1
        >>> choose_rank(s, 3, 8, None), choose_rank(s, 3, None, 0.9), choose_rank(s, 2, None, 1.0)
        (3, 2, 2)
    """
    if rank is not None:
        return min(rank, limit)
    cumulative = torch.cumsum(s.double() ** 2, dim=0)
    if cumulative[-1] == 0.0:
        return 1
    shares = cumulative / cumulative[-1]
    # the 1e-12 slack against round-off of analysis.energy_rank
    return min(int((shares < energy - 1e-12).sum()) + 1, limit)


@dataclass(frozen=True)
class LayerResize:
    """One layer of a resize: its ranks, the update's norm, the error and its bound.

    error is ||s B A - B' A'||_F with the factors as written (in their stored dtype); bound is
    the Eckart-Young error sqrt(sum_{i > r'} s_i^2) from the factor-only spectrum.

    Examples:
        >>> from lowrank.torch.resize import LayerResize
        >>> row = LayerResize("q", 8, 4, norm=2.0, error=0.5, bound=0.5, capped=False)
        >>> row.relative_error
        0.25
    """

    name: str
    old_rank: int
    new_rank: int
    norm: float  # ||s B A||_F
    error: float  # ||s B A - B' A'||_F of the written factors
    bound: float  # sqrt(sum_{i > r'} s_i^2)
    capped: bool  # the rank asked for was above the layer's r (or its shape's limit)

    @property
    def relative_error(self) -> float:
        """error / ||s B A||_F (0.0 for a zero update)."""
        return self.error / self.norm if self.norm > 0 else 0.0


@dataclass(frozen=True)
class ResizeReport:
    """What `resize_adapter` wrote: the folders, the rule, one `LayerResize` per layer.

    Examples:
        >>> from lowrank.torch.resize import LayerResize, ResizeReport
        >>> rows = [LayerResize("q", 8, 4, 2.0, 0.5, 0.5, False)]
        >>> print(ResizeReport("a", "b", 4, None, rows).table())
        layer  r -> r'  ||s B A||_F   ||error||_F  Eckart-Young  relative
        q      8 ->  4    2.000e+00     5.000e-01     5.000e-01    0.2500
    """

    source: str
    out: str
    rank: int | None
    energy: float | None
    layers: list[LayerResize]

    def as_dict(self) -> dict:
        """The report as plain JSON values (each layer with its relative error)."""
        layers = [{**asdict(row), "relative_error": row.relative_error} for row in self.layers]
        return {**asdict(self), "layers": layers}

    def table(self) -> str:
        """One line per layer: r -> r', the update's norm, the error, its bound, relative."""
        width = max(len("layer"), *(len(row.name) for row in self.layers))
        lines = [f"{'layer':<{width}}  r -> r'  ||s B A||_F   ||error||_F  Eckart-Young  relative"]
        for row in self.layers:
            mark = "*" if row.capped else " "
            lines.append(
                f"{row.name:<{width}} {row.old_rank:>2} -> {row.new_rank:>2}{mark}"
                f"{row.norm:>12.3e}  {row.error:>12.3e}  {row.bound:>12.3e}  "
                f"{row.relative_error:>8.4f}"
            )
        return "\n".join(lines)


def _layers(folder: Path, config: dict, tensors: dict) -> dict[str, tuple[str, str, float]]:
    """{layer name: (A's key, B's key, the update's scale s)}, each pair checked against the
    config's rank for that layer. ValueError naming the folder and the layer otherwise."""
    keys = {}
    for key in tensors:
        for kind, suffixes in _FACTOR_SUFFIXES.items():
            for index, suffix in enumerate(suffixes):
                if key.startswith(PREFIX) and key.endswith(suffix):
                    name = key[len(PREFIX) : -len(suffix)]
                    keys.setdefault(name, [None, None, kind])[index] = key
    if not keys:
        raise ValueError(f"{folder / WEIGHTS_NAME} holds no LoRA factors (lora_A / lora_B)")
    names = sorted(keys)
    with _patterns.time_limit():
        ranks = _patterns.pattern_values(config["rank_pattern"], names, config["r"])
        alphas = _patterns.pattern_values(config["alpha_pattern"], names, config["lora_alpha"])
    layers = {}
    for name in names:
        key_A, key_B, _ = keys[name]
        if key_A is None or key_B is None:
            raise ValueError(f"{folder / WEIGHTS_NAME}: layer {name!r} has only one factor")
        A, B = _flat_conv_factors(tensors[key_A], tensors[key_B])
        r = ranks[name]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise ValueError(
                f"{folder}: layer {name!r} has A {tuple(tensors[key_A].shape)} and B "
                f"{tuple(tensors[key_B].shape)}, but the config gives it r={r} (A must be "
                "(r, in), B (out, r); a conv's (r, in_channels, *kernel), (out, r, 1, ...))"
            )
        root = math.sqrt(r) if config["use_rslora"] else r
        layers[name] = (key_A, key_B, alphas[name] / root)
    return layers


def _difference_norm(B: torch.Tensor, A: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """||B @ A - B2 @ A2||_F from the factors: [B, -B2] @ [A; A2] through `factored_core`."""
    stacked_B = torch.cat([B.double(), -B2.double()], dim=1)  # (out, r + r')
    stacked_A = torch.cat([A.double(), A2.double()], dim=0)  # (r + r', in)
    return float(torch.linalg.norm(factored_core(stacked_B, stacked_A)[1]))


def resize_adapter(
    adapter_folder: str | os.PathLike,
    out_folder: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
) -> ResizeReport:
    """Write the best rank-r' version of a PEFT adapter folder to `out_folder`.

    Exactly one of `rank` (r' = min(rank, the layer's r): never more) and `energy` (r' per
    layer: the smallest rank holding that share of ||s B A||_F^2). Each layer's update s B A
    (B (out, r), A (r, in); a conv's factors flattened, and written back in PEFT's conv layout)
    is replaced by its truncated SVD B' (out, r'), A' (r', in) with
    lora_alpha = r' (scale 1; see the module docstring), computed in float64 from the factors
    (`factored_svd`) and stored in the source's dtype. The folder is written as a unit
    (`write_folder_atomically`); `out_folder` may be `adapter_folder` itself.

    Raises:
        ValueError: both or neither of rank/energy, rank < 1, energy outside (0, 1], a folder
            that is not a PEFT adapter (or whose factors do not fit its config).

    Examples:
        >>> import tempfile
        >>> from collections import OrderedDict
        >>> from pathlib import Path
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch import add_lora, lora_layers, save_adapter
        >>> from lowrank.torch.resize import resize_adapter
        >>> _ = torch.manual_seed(0)
        >>> model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(16, 16))), ["q"], r=8)
        >>> _ = model.q.B["default"].data.normal_()  # as if trained
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_adapter(model, Path(tmp) / "r8")
        ...     report = resize_adapter(Path(tmp) / "r8", Path(tmp) / "r2", rank=2)
        >>> row = report.layers[0]
        >>> row.old_rank, row.new_rank, abs(row.error - row.bound) < 1e-5 * row.norm
        (8, 2, True)
    """
    check_rank_or_energy(rank, energy)
    with reading_folder(Path(adapter_folder)) as folder:
        config, tensors = read_adapter_files(folder)
        if config.get("use_dora"):  # W' = m (W + sBA) / ||W + sBA||: no longer rank-r in sBA
            raise ValueError(f"{folder}: a DoRA adapter (use_dora); resize reads LoRA only")
        raw_config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        layers = _layers(folder, config, tensors)
    written, rows = dict(tensors), []
    for name, (key_A, key_B, scale) in layers.items():
        A, B = _flat_conv_factors(tensors[key_A], tensors[key_B])  # (r, in), (out, r)
        U, s, Vh = factored_svd(scale * B.double(), A)  # (out, k), (k,), (k, in)
        r_new = choose_rank(s, len(s), rank, energy)
        root = s[:r_new].sqrt()  # the even split
        new_B = (U[:, :r_new] * root).to(B.dtype).contiguous()  # (out, r')
        new_A = (root[:, None] * Vh[:r_new]).to(A.dtype).contiguous()  # (r', in)
        kernel, ones = tensors[key_A].shape[2:], tensors[key_B].shape[2:]  # () unless a conv
        written[key_A] = new_A.reshape(r_new, -1, *kernel) if kernel else new_A
        written[key_B] = new_B.reshape(len(new_B), r_new, *ones) if ones else new_B
        rows.append(
            LayerResize(
                name=name,
                old_rank=A.shape[0],
                new_rank=r_new,
                norm=float(torch.linalg.norm(s)),
                error=_difference_norm(scale * B.double(), A, new_B, new_A),
                bound=float(torch.linalg.norm(s[r_new:])),
                capped=rank is not None and rank > r_new,
            )
        )
    new_ranks = {row.name: row.new_rank for row in rows}
    common = Counter(new_ranks.values()).most_common(1)[0][0]
    suffixes = {n[i + 1 :] for n in new_ranks for i, char in enumerate(n) if char == "."}
    pattern = {_pattern_key(n, suffixes): v for n, v in new_ranks.items() if v != common}
    raw_config.update(
        r=common, lora_alpha=common, use_rslora=False, rank_pattern=pattern, alpha_pattern=pattern
    )
    text = json.dumps(raw_config, indent=2, sort_keys=True) + "\n"

    def write(new: Path) -> None:
        (new / CONFIG_NAME).write_text(text, encoding="utf-8")
        save_file(written, new / WEIGHTS_NAME, metadata={"format": "pt"})

    write_folder_atomically(out_folder, write, owns=ADAPTER_FILES)
    return ResizeReport(str(adapter_folder), str(out_folder), rank, energy, rows)

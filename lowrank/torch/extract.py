"""A LoRA adapter extracted from a full fine-tune: truncated SVD of W_tuned - W_base per layer.

A full fine-tune changes every weight; where the change Delta W (out, in) of a linear layer is
close to low rank, LoRA (Hu et al. 2021, arXiv:2106.09685) can carry it: the best rank-r'
factors are the truncated SVD B' = U_r' sqrt(S_r'), A' = sqrt(S_r') Vh_r', with the error
||Delta W - B' A'||_F = sqrt(sum_{i > r'} s_i^2) (Eckart & Young 1936).

    model, report = extract_adapter(base, tuned, rank=8)   # or energy=0.9: r' per layer
    save_adapter(model, "extracted")                      # PeftModel.from_pretrained loads it

This follows mergekit's extract-lora (mergekit/scripts/extract_lora.py): SVD of the dense
delta, the singular values split evenly (sqrt(S) on each side), r' capped at min(out, in),
lora_alpha = r' so that PEFT's scale is 1, rank_pattern / alpha_pattern for layers that
differ. What lowrank changes: the SVD runs in float64 (mergekit: float32); a GPT-2 Conv1D's
weight, stored (in, out), is transposed first so its factors have PEFT's layout (mergekit
factors the stored matrix); only layers whose weight changed are extracted (mergekit
factors every linear layer, unchanged ones into zeros); `energy` picks r' per layer; a
module that was new in the tuned model (a classifier head, randomly initialised in the base)
is saved whole as PEFT's modules_to_save with its bias; and every other changed tensor
(biases, LayerNorm, embeddings, untargeted layers) is listed in the report as not captured
with its relative change ||Delta|| / ||W_base||, never dropped silently (mergekit saves a
changed norm's weight but not its bias, or skips it with --skip-undecomposable). A weight
shared by two modules (GPT-2's lm_head is its token embedding) is reported once, under the
first name, as the embedding it is. The report's error and bound agree up to the rounding of
the adapter's dtype (float32).

`load_base_and_tuned` loads two Hugging Face folders so that their names line up (the base
with the tuned model's class and label count) and names the modules the base lacked.

(About 360 lines, a third of them docstrings: the extraction, its report and the loading that
decides which modules are new read best together.)
"""

import copy
import math
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowrank.torch.model import add_lora, candidate_names, is_conv1d, match_targets
from lowrank.torch.modules_to_save import saved_modules, select_modules
from lowrank.torch.resize import check_rank_or_energy, choose_rank

__all__ = [
    "LayerExtract",
    "NotCaptured",
    "ExtractReport",
    "extract_adapter",
    "load_base_and_tuned",
]


@dataclass(frozen=True)
class LayerExtract:
    """One extracted layer: r', ||Delta W||_F, the error, its Eckart-Young bound, the energy.

    Examples:
        >>> from lowrank.torch.extract import LayerExtract
        >>> LayerExtract("q", (4, 4), 1, norm=5.0, error=3.0, bound=3.0, energy=0.64).relative_error
        0.6
    """

    name: str
    shape: tuple[int, int]  # (out, in)
    rank: int  # r'
    norm: float  # ||Delta W||_F
    error: float  # ||Delta W - B' A'||_F with the factors as stored
    bound: float  # sqrt(sum_{i > r'} s_i^2)
    energy: float  # sum_{i <= r'} s_i^2 / sum_i s_i^2 (1.0 for a zero delta)

    @property
    def relative_error(self) -> float:
        """error / ||Delta W||_F (0.0 for a zero delta)."""
        return self.error / self.norm if self.norm > 0 else 0.0


@dataclass(frozen=True)
class NotCaptured:
    """A changed tensor the adapter does not carry: ||Delta||_F and ||Delta||_F / ||W_base||_F
    (None when the base tensor is zero, as a bias often starts).

    Examples:
        >>> from lowrank.torch.extract import NotCaptured
        >>> NotCaptured("ln.weight", (8,), 0.02, 0.01).relative_change
        0.01
    """

    name: str
    shape: tuple[int, ...]
    change: float  # ||Delta||_F
    relative_change: float | None  # ||Delta||_F / ||W_base||_F


@dataclass(frozen=True)
class ExtractReport:
    """What `extract_adapter` extracted: one `LayerExtract` per layer, the modules saved whole
    (modules_to_save) and the changed tensors it could not carry.

    Examples:
        >>> from lowrank.torch.extract import ExtractReport, LayerExtract, NotCaptured
        >>> report = ExtractReport(2, None, [LayerExtract("q", (4, 4), 2, 5.0, 3.0, 3.0, 0.64)],
        ...                        ["classifier"], [NotCaptured("ln.weight", (4,), 0.02, 0.01)])
        >>> print(report.table())
        layer  (out, in)  r'  ||Delta W||_F  ||error||_F  Eckart-Young  energy
        q      (4, 4)      2      5.000e+00    3.000e+00     3.000e+00  0.6400
        saved whole (modules_to_save): classifier
        not captured (changed, not a LoRA factor): 1 tensor
          ln.weight (4,): ||Delta||_F = 2.000e-02, relative to ||W||_F 1.000e-02
    """

    rank: int | None
    energy: float | None
    layers: list[LayerExtract]
    modules_to_save: list[str]
    not_captured: list[NotCaptured]

    def as_dict(self) -> dict:
        """The report as plain JSON values (each layer with its relative error)."""
        layers = [{**asdict(row), "relative_error": row.relative_error} for row in self.layers]
        return {**asdict(self), "layers": layers}

    def table(self) -> str:
        """One line per layer, then the modules saved whole and the tensors not captured."""
        width = max(len("layer"), *(len(row.name) for row in self.layers))
        head = "  (out, in)  r'  ||Delta W||_F  ||error||_F  Eckart-Young  energy"
        lines = [f"{'layer':<{width}}{head}"]
        for row in self.layers:
            lines.append(
                f"{row.name:<{width}}  {str(row.shape):<10} {row.rank:>2}  {row.norm:>13.3e}"
                f"  {row.error:>11.3e}  {row.bound:>12.3e}  {row.energy:.4f}"
            )
        if self.modules_to_save:
            lines.append(f"saved whole (modules_to_save): {', '.join(self.modules_to_save)}")
        plural = "" if len(self.not_captured) == 1 else "s"
        lines.append(
            f"not captured (changed, not a LoRA factor): {len(self.not_captured)} tensor{plural}"
        )
        for item in self.not_captured:
            relative = (
                "(W was 0)" if item.relative_change is None else f"{item.relative_change:.3e}"
            )
            lines.append(
                f"  {item.name} {item.shape}: ||Delta||_F = {item.change:.3e}, relative to "
                f"||W||_F {relative}"
            )
        return "\n".join(lines)


def _check_same_architecture(base: nn.Module, tuned: nn.Module) -> None:
    """ValueError naming the first tensor that one model lacks or holds at another shape."""
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    for key, tensor in tuned_state.items():
        if key not in base_state:
            raise ValueError(f"base and tuned differ: tensor {key!r} is in tuned, not in base")
        if base_state[key].shape != tensor.shape:
            raise ValueError(
                f"base and tuned differ: tensor {key!r} is {tuple(base_state[key].shape)} in "
                f"base and {tuple(tensor.shape)} in tuned"
            )
    extra = next((key for key in base_state if key not in tuned_state), None)
    if extra is not None:
        raise ValueError(f"base and tuned differ: tensor {extra!r} is in base, not in tuned")


def _weight(module: nn.Module) -> torch.Tensor:
    """A Linear's or Conv1D's weight as (out, in), float64."""
    weight = module.weight.detach().double()
    return weight.T if is_conv1d(module) else weight


def _linear_layers(tuned: nn.Module, targets, inside: list[str]) -> list[str]:
    """Linear and Conv1D layers (not embeddings, not in modules_to_save, not sharing their
    weight with an earlier module) that `targets` selects (None: all of them)."""
    names = candidate_names(tuned) if targets is None else match_targets(tuned, targets)
    first_owner = {}
    for name, module in tuned.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            first_owner.setdefault(id(weight), name)
    chosen = []
    for name in names:
        module = tuned.get_submodule(name)
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            if targets is not None:
                kind = type(module).__name__
                raise ValueError(f"target {name!r} is a {kind}, not a Linear or Conv1D layer")
            continue
        if any(name == m or name.startswith(m + ".") for m in inside):
            continue
        if first_owner[id(module.weight)] == name:
            chosen.append(name)
    return chosen


def extract_adapter(
    base_model: nn.Module,
    tuned_model: nn.Module,
    *,
    rank: int | None = None,
    energy: float | None = None,
    targets: str | list[str] | None = None,
    modules_to_save: list[str] | None = None,
) -> tuple[nn.Module, ExtractReport]:
    """A copy of `base_model` with LoRA adapter "default" carrying tuned - base, and its report.

    Exactly one of `rank` (r' = min(rank, out, in)) and `energy` (r' per layer: the smallest
    rank holding that share of ||Delta W||_F^2). Layers: every Linear / GPT-2 Conv1D whose
    weight differs (Delta W = W_tuned - W_base (out, in) in float64, `torch.linalg.svd`), or
    those `targets` selects (as `add_lora`'s targets). `modules_to_save`: modules copied whole
    from the tuned model (a new classification head); `load_base_and_tuned` names them for
    Hugging Face folders. The two models must have the same tensors at the same shapes
    (ValueError naming the first that differs); neither is changed. Save the result with
    `save_adapter(model, folder)`.

    Examples:
        >>> import copy
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.extract import extract_adapter
        >>> _ = torch.manual_seed(0)
        >>> base = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> tuned = copy.deepcopy(base)
        >>> with torch.no_grad():  # a rank-1 update of layer 0 and a changed bias
        ...     tuned[0].weight += torch.outer(torch.randn(8), torch.randn(8))
        ...     tuned[2].bias += 0.1
        >>> model, report = extract_adapter(base, tuned, rank=1)
        >>> [(row.name, row.rank, row.error < 1e-5 * row.norm) for row in report.layers]
        [('0', 1, True)]
        >>> [item.name for item in report.not_captured]
        ['2.bias']
    """
    check_rank_or_energy(rank, energy)
    _check_same_architecture(base_model, tuned_model)
    kept = []
    if modules_to_save:
        kept = select_modules(
            tuned_model, list(modules_to_save), lambda n, e: n == e, every_entry_must_match=True
        )
    names = _linear_layers(tuned_model, targets, kept)
    if not names:
        raise ValueError("no linear layer to extract: the targets select none")
    modules = dict(tuned_model.named_modules())
    base_modules = dict(base_model.named_modules())
    factors, rows = {}, []
    for name in names:
        delta = _weight(modules[name]) - _weight(base_modules[name])  # (out, in)
        if targets is None and not delta.any():
            continue  # unchanged: nothing to carry
        U, s, Vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
        r_new = choose_rank(s, len(s), rank, energy)
        root = s[:r_new].sqrt()  # the even split, as mergekit
        B = (U[:, :r_new] * root).float()  # (out, r')
        A = (root[:, None] * Vh[:r_new]).float()  # (r', in)
        total = float((s**2).sum())
        rows.append(
            LayerExtract(
                name=name,
                shape=tuple(delta.shape),
                rank=r_new,
                norm=math.sqrt(total),
                error=float(torch.linalg.norm(delta - B.double() @ A.double())),
                bound=float(torch.linalg.norm(s[r_new:])),
                energy=float((s[:r_new] ** 2).sum()) / total if total > 0 else 1.0,
            )
        )
        factors[name] = (A, B)
    if not rows:
        raise ValueError("no linear layer's weight differs between base and tuned")
    model = copy.deepcopy(base_model)
    ranks = {row.name: row.rank for row in rows}
    pattern = {f"^{re.escape(n)}": r for n, r in ranks.items()}  # exact names (PEFT's rule)
    exact = "|".join(re.escape(n) for n in ranks)
    add_lora(
        model, exact, r=1, alpha=1, rank_pattern=pattern, alpha_pattern=pattern,
        modules_to_save=kept or None,
    )  # fmt: skip
    with torch.no_grad():
        for name, (A, B) in factors.items():
            layer = model.get_submodule(name)
            layer.A["default"].copy_(A)
            layer.B["default"].copy_(B)
        for name, wrapper in saved_modules(model):
            wrapper.modules_to_save["default"].load_state_dict(modules[name].state_dict())
    carried = {f"{n}.weight" for n in ranks}
    carried |= {f"{m}.{k}" for m in kept for k in modules[m].state_dict()}
    return model, ExtractReport(
        rank, energy, rows, kept, _not_captured(base_model, tuned_model, carried)
    )


def _not_captured(base: nn.Module, tuned: nn.Module, carried: set[str]) -> list[NotCaptured]:
    """Every changed tensor of `tuned` outside `carried`, once per storage (tied weights)."""
    base_state = base.state_dict()
    seen, found = set(), []
    for key, tensor in tuned.state_dict(keep_vars=True).items():
        if id(tensor) in seen or key in carried or not tensor.is_floating_point():
            seen.add(id(tensor))
            continue
        seen.add(id(tensor))
        before = base_state[key].detach().double()
        delta = tensor.detach().double() - before
        if delta.any():
            norm, change = float(torch.linalg.norm(before)), float(torch.linalg.norm(delta))
            relative = change / norm if norm > 0 else None
            found.append(NotCaptured(key, tuple(tensor.shape), change, relative))
    return found


def load_base_and_tuned(base_path, tuned_path) -> tuple[nn.Module, nn.Module, list[str]]:
    """(base, tuned, new modules) from two Hugging Face folders: the tuned model with its own
    class (config "architectures"), the base with the same class and label count, so module
    names line up; new modules are those whose tensors the base folder lacked or held at
    another shape (randomly initialised there: a classifier head). ValueError when the two
    are different model types or a folder does not load.

    Examples:
        >>> from lowrank.torch.extract import load_base_and_tuned
        >>> from lowrank.torch.hf import minilm_path
        >>> base, tuned, new = load_base_and_tuned(minilm_path(), "runs/full")  # doctest: +SKIP
        >>> new  # doctest: +SKIP
        ['classifier']
    """
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(tuned_path))
        base_config = transformers.AutoConfig.from_pretrained(str(base_path))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read a model config: {error}") from None
    if base_config.model_type != config.model_type:
        raise ValueError(
            f"base {str(base_path)!r} is a {base_config.model_type} model and tuned "
            f"{str(tuned_path)!r} a {config.model_type} model: extract needs one architecture"
        )
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise ValueError(f"{tuned_path}: config.json names no known architecture ({architecture})")
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # the new modules are reported, not warned
    transformers.utils.logging.disable_progress_bar()
    try:
        tuned = model_class.from_pretrained(str(tuned_path), dtype=torch.float32)
        base, info = model_class.from_pretrained(
            str(base_path),
            dtype=torch.float32,
            num_labels=config.num_labels,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    except OSError as error:
        raise ValueError(f"cannot load the models: {error}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    lacking = list(info["missing_keys"]) + [entry[0] for entry in info["mismatched_keys"]]
    new = sorted({key.rsplit(".", 1)[0] for key in lacking if "." in key})
    new = [m for m in new if not any(m.startswith(o + ".") for o in new)]  # outermost only
    return base.eval(), tuned.eval(), new

"""LoRA on a whole PyTorch model: add adapters by layer name, list them, merge and unmerge.

LoRA (Hu et al. 2021, arXiv:2106.09685) adapts chosen weight matrices of a frozen model; this
file decides which (`match_targets`), puts a wrapper from `lowrank.torch.lora` on each
(`add_lora`), and folds the active adapter into the frozen weights and back (`merge_lora`,
`unmerge_lora`, `merged_copy`). `quant_type="nf4"` stores each chosen layer's frozen weight in
4 bits first (QLoRA, Dettmers et al. 2023, arXiv:2305.14314). The NumPy mirror is
`lowrank.numpy.model`, on its tiny MLP.

Which wrapper a layer gets is one table, as in minLoRA (`WRAPPERS`): adding a layer type is one
wrapper class (in `lora.py`, or a file of its own as `conv.py`) and one row here. Target
matching is one rule (`matches`), used by `add_lora` and by the PEFT loader, and the same as
PEFT's: a list names layers exactly or by a dotted suffix ("q_proj" selects
"model.layers.0.self_attn.q_proj"); a str is a regex that must match the whole qualified name.

    add_lora(model, ["q_proj", "v_proj"], r=8, alpha=16)   # every q_proj and v_proj
    merge_lora(model)                                       # W <- W + scale * B @ A

(About 600 lines, half of them docstrings and examples: selecting, wrapping, merging and
counting one model read best together; the modules trained in full are `modules_to_save.py`.)
"""

import copy
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from lowrank import _patterns
from lowrank._validate import check_adapter, check_adapter_name, check_quant_type
from lowrank.torch.conv import CONV_TYPES, LoRAConv
from lowrank.torch.dora import DoRALinear
from lowrank.torch.lora import LoRAConv1D, LoRAEmbedding, LoRALayer, LoRALinear
from lowrank.torch.modules_to_save import (
    ModulesToSaveWrapper,
    install_copies,
    saved_modules,
    select_modules,
    stage_copies,
)
from lowrank.torch.qlora import Linear4bit

__all__ = [
    "WRAPPERS",
    "is_conv1d",
    "wrapper_for",
    "features",
    "replace_module",
    "lora_layers",
    "candidate_names",
    "matches",
    "match_targets",
    "pattern_value",
    "active_adapter",
    "mark_only_lora_trainable",
    "add_lora",
    "merge_lora",
    "unmerge_lora",
    "merged_copy",
    "count_parameters",
]

# Base layer type -> the wrapper that adds LoRA to it (GPT-2's Conv1D is recognised by
# `is_conv1d`, so that this file need not import transformers).
WRAPPERS: dict[type[nn.Module], type[LoRALayer]] = {
    nn.Linear: LoRALinear,
    Linear4bit: LoRALinear,
    nn.Embedding: LoRAEmbedding,
    nn.Conv1d: LoRAConv,
    nn.Conv2d: LoRAConv,
}


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers.pytorch_utils.Conv1D, recognised without importing transformers.

    Examples:
        >>> from torch import nn
        >>> from transformers.pytorch_utils import Conv1D
        >>> from lowrank.torch.model import is_conv1d
        >>> is_conv1d(Conv1D(4, 8)), is_conv1d(nn.Linear(8, 4))
        (True, False)
    """
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def wrapper_for(module: nn.Module) -> type[LoRALayer] | None:
    """The LoRA wrapper class for `module` (None: LoRA does not apply to it), from `WRAPPERS`.

    Examples:
        >>> from torch import nn
        >>> from lowrank.torch.model import wrapper_for
        >>> wrapper_for(nn.Linear(8, 4)).__name__, wrapper_for(nn.Embedding(10, 4)).__name__
        ('LoRALinear', 'LoRAEmbedding')
        >>> wrapper_for(nn.ReLU()) is None
        True
    """
    if is_conv1d(module):
        return LoRAConv1D
    return next((w for base, w in WRAPPERS.items() if isinstance(module, base)), None)


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a wrappable layer or of a wrapper.

    Examples:
        >>> from torch import nn
        >>> from lowrank.torch.model import features
        >>> features(nn.Linear(8, 4)), features(nn.Embedding(10, 4))  # an embedding: in = ids
        ((8, 4), (10, 4))
    """
    if isinstance(module, LoRALayer):
        return module.in_features, module.out_features
    return wrapper_for(module).features(module)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at qualified name `name` inside `model` (its parent's attribute).

    Examples:
        >>> from torch import nn
        >>> from lowrank.torch.model import replace_module
        >>> model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
        >>> replace_module(model, "0.1", nn.Identity())
        >>> type(model[0][1]).__name__
        'Identity'
    """
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """(qualified name, wrapper) for every LoRA wrapper in `model`.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora, lora_layers
        >>> model = nn.Sequential(
        ...     OrderedDict(q=nn.Linear(8, 8), v=nn.Linear(8, 8), out=nn.Linear(8, 2))
        ... )
        >>> _ = add_lora(model, ["q", "v"], r=2, alpha=4)
        >>> [(name, type(layer).__name__) for name, layer in lora_layers(model)]
        [('q', 'LoRALinear'), ('v', 'LoRALinear')]
    """
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def candidate_names(model: nn.Module) -> list[str]:
    """Qualified names of the layers `add_lora` can wrap (or has wrapped), in model order.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora, candidate_names
        >>> model = nn.Sequential(
        ...     OrderedDict(q=nn.Linear(8, 8), act=nn.ReLU(), out=nn.Linear(8, 2))
        ... )
        >>> candidate_names(model)  # the ReLU has no weight to adapt
        ['q', 'out']
        >>> candidate_names(add_lora(model, ["q"], r=2))  # a wrapper, not its base_layer
        ['q', 'out']
    """
    names, inside = [], None
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue  # a wrapper's own base_layer and dropout, or a Linear4bit's parts
        if isinstance(module, ModulesToSaveWrapper):
            inside = name + "."  # a module trained in full (modules_to_save): no LoRA inside
        elif name and (isinstance(module, LoRALayer) or wrapper_for(module) is not None):
            names.append(name)
            inside = name + "."
    return names


def matches(name: str, target: str) -> bool:
    """Whether list entry `target` selects layer `name`: equal, or a dotted suffix of it.

    Examples:
        >>> from lowrank.torch.model import matches
        >>> name = "model.layers.0.self_attn.q_proj"
        >>> matches(name, "q_proj"), matches(name, "self_attn.q_proj"), matches(name, "proj")
        (True, True, False)
    """
    return name == target or name.endswith("." + target)


def match_targets(
    model: nn.Module, targets: str | list[str], *, every_pattern_must_match: bool = True
) -> list[str]:
    """The candidate layers `targets` selects, in model order: a str is a regex that must
    match the whole qualified name (re.fullmatch, as in PEFT); a list holds exact names or
    dotted suffixes (`matches`). With `every_pattern_must_match`, a list entry (or the regex)
    that selects no layer raises ValueError listing the candidates.

    The regex is matched by `lowrank._patterns` (the one bounded matcher, also behind
    `pattern_value`): the result is re.fullmatch's, but all names together get about a second
    (a pattern read from a file cannot make a load hang), and invalid syntax is a ValueError
    naming the pattern.

    Examples:
        >>> from torch import nn
        >>> from lowrank.torch.model import match_targets
        >>> model = nn.ModuleList(
        ...     nn.ModuleDict({"q": nn.Linear(8, 8), "v": nn.Linear(8, 8)}) for _ in range(2)
        ... )
        >>> match_targets(model, ["q"])  # a dotted suffix
        ['0.q', '1.q']
        >>> match_targets(model, "1[.](q|v)")  # a regex for the whole name
        ['1.q', '1.v']
        >>> match_targets(model, ["q", "q_proj"])
        Traceback (most recent call last):
            ...
        ValueError: target 'q_proj' matches no Linear/Conv1D/Embedding/Conv1d/Conv2d layer; ...
    """
    candidates = candidate_names(model)
    if isinstance(targets, str):
        patterns = [targets]
        selected = [_patterns.fullmatch_names(targets, candidates)]
    elif (
        isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets)
    ):
        patterns = list(targets)
        selected = [[n for n in candidates if matches(n, t)] for t in patterns]
    else:
        raise TypeError(
            f"targets must be a str (regex) or a non-empty list of str, got {targets!r}"
        )
    for pattern, names in zip(patterns, selected, strict=True):
        if every_pattern_must_match and not names:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            example = f" (e.g. {candidates[0]!r})" if candidates else ""
            raise ValueError(
                f"target {pattern!r} matches no Linear/Conv1D/Embedding/Conv1d/Conv2d layer; "
                f"candidate module names: {', '.join(leaves) or 'none'}{example}"
            )
    chosen = {n for names in selected for n in names}
    return [n for n in candidates if n in chosen]


def pattern_value(patterns: dict[str, float], name: str, default: float) -> float:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that matches the end of
    `name` at a dot boundary (re.match(rf"(.*\\.)?({key})$", name)) gives the value.

    Matched by `lowrank._patterns`, like `match_targets`: re's result, at most about a second
    for the call, a ValueError naming a key that is not a valid regex.

    Examples:
        >>> from lowrank.torch.model import pattern_value
        >>> ranks = {"v": 4, "layers[.]1[.]q": 2}
        >>> [pattern_value(ranks, name, 8) for name in ("layers.0.v", "layers.1.q", "layers.0.q")]
        [4, 2, 8]
    """
    return _patterns.pattern_value(patterns, name, default)


def _quantized(module: nn.Module, quant_type: str) -> nn.Module:
    """A frozen 4-bit copy of a Linear or Conv1D (the Conv1D's W^T becomes a Linear first)."""
    if isinstance(module, nn.Embedding):
        return module  # embeddings stay in full precision, as in QLoRA
    if is_conv1d(module):
        linear = nn.Linear(module.weight.shape[0], module.weight.shape[1], device="meta")
        linear.weight = nn.Parameter(module.weight.detach().T.contiguous())
        linear.bias = nn.Parameter(module.bias.detach().clone())
        module = linear
    return Linear4bit.from_linear(module, quant_type=quant_type, blocksize=64, double_quant=True)


def active_adapter(model: nn.Module) -> str | None:
    """The model's active adapter name (None if it has no LoRA layers or none is active).

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.model import active_adapter, add_lora
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 8)))
        >>> print(active_adapter(model))
        None
        >>> active_adapter(add_lora(model, ["q"], r=2))
        'default'
    """
    return next((layer.active_adapter for _, layer in lora_layers(model)), None)


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze every parameter except the active adapter's A and B in each LoRA layer (and its
    DoRA magnitude) and its copies of the modules it trains in full (`modules_to_save`).

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora, mark_only_lora_trainable
        >>> model = add_lora(
        ...     nn.Sequential(OrderedDict(q=nn.Linear(8, 8), out=nn.Linear(8, 2))), ["q"], r=2
        ... )
        >>> _ = model.out.requires_grad_(True)  # e.g. a head trained in full
        >>> mark_only_lora_trainable(model)  # ... and frozen again
        >>> [name for name, p in model.named_parameters() if p.requires_grad]
        ['q.A.default', 'q.B.default']
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for _, layer in lora_layers(model):
        if layer.active_adapter in layer.A:
            layer.A[layer.active_adapter].requires_grad_(True)
            layer.B[layer.active_adapter].requires_grad_(True)
            if isinstance(layer, DoRALinear):
                layer.magnitude[layer.active_adapter].requires_grad_(True)
    for _, wrapper in saved_modules(model):
        if wrapper.active_adapter in wrapper.modules_to_save:
            wrapper.modules_to_save[wrapper.active_adapter].requires_grad_(True)


def add_lora(
    model: nn.Module,
    targets: str | list[str],
    *,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    quant_type: str | None = None,
    adapter_name: str = "default",
    use_rslora: bool = False,
    init: str = "kaiming",
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    modules_to_save: list[str] | None = None,
    use_dora: bool = False,
) -> nn.Module:
    """Add LoRA adapter `adapter_name` to every layer of `model` that `targets` selects.

    LoRA (Hu et al. 2021, arXiv:2106.09685); with `quant_type`, QLoRA (Dettmers et al. 2023,
    arXiv:2305.14314); with `use_rslora`, rsLoRA (Kalajdzievski 2023, arXiv:2312.03732).

    Args:
        model: the model, changed in place.
        targets: a list of exact qualified names or dotted suffixes (["q_proj", "v_proj"]), or
            a str regex matched against the whole name. Linear, GPT-2 Conv1D, Embedding,
            nn.Conv1d and nn.Conv2d layers (`lowrank.torch.conv`; groups=1 only) and 4-bit
            Linear4bit can be selected; a pattern that selects none raises ValueError listing
            the candidate names.
        r: the rank of each update B @ A (A [r, in], B [out, r]).
        alpha: the update is scaled by alpha / r (alpha / sqrt(r) with `use_rslora`).
        dropout: dropout probability on the adapter's input x.
        quant_type: "nf4", "fp4" (or "int4") replaces each selected Linear/Conv1D by a frozen
            4-bit `Linear4bit` (blocksize 64, double quantization): QLoRA. None: no change.
            A selected nn.Conv1d / nn.Conv2d is refused (ValueError): no 4-bit convolutions.
        adapter_name: the new adapter's name (no '.').
        use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
        init: how A starts, "kaiming" (as nn.Linear's weight) or "gaussian"; B starts at 0.
        rank_pattern: overrides r per layer, keyed by name suffix or regex as in PEFT.
        alpha_pattern: overrides alpha per layer, keyed like rank_pattern.
        modules_to_save: modules that train in full as part of this adapter, by exact name or
            dotted suffix (each must select one): a new classification head, say. Each gets a
            `modules_to_save.ModulesToSaveWrapper` with this adapter's copy, saved with the
            adapter as PEFT saves it. None: none.
        use_dora: DoRA (Liu et al. 2024, arXiv:2402.09353): each layer also trains a
            magnitude per output feature (`lowrank.torch.dora.DoRALinear`), as PEFT's
            `use_dora=True`. Linear (and 4-bit) layers only; a layer already wrapped keeps its
            kind, so plain and DoRA adapters never share a layer.

    Returns:
        `model` itself.

    Layers are wrapped in place (a layer wrapped before gets a second adapter); a new wrapper
    takes the train/eval mode of the layer it wraps. Afterwards only the active adapter's A and
    B require grad (and its copies of `modules_to_save`); everything else is frozen, a new
    classifier head too unless it is in `modules_to_save`. The first adapter put on a model becomes
    active; later ones wait for `set_active_adapter`. Works on the meta device: A and B are
    created where the base weights live.

    Unlike PEFT, which raises only when no target matches at all, every entry of a list must
    match a layer: a typo is an error, not a silently missing adapter.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora, count_parameters
        >>> model = nn.Sequential(
        ...     OrderedDict(q=nn.Linear(8, 8), v=nn.Linear(8, 8), out=nn.Linear(8, 2))
        ... )
        >>> _ = add_lora(model, ["q", "v"], r=2, alpha=4, rank_pattern={"v": 1})
        >>> model.q.r, model.v.r, model.q.scale
        ({'default': 2}, {'default': 1}, {'default': 2.0})
        >>> count_parameters(model)  # (trainable, total): only A and B train
        (48, 210)
        >>> model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(64, 64))), ["q"],
        ...                  r=8, quant_type="nf4")  # QLoRA: the frozen W in 4 bits
        >>> type(model.q.base_layer).__name__
        'Linear4bit'
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), classifier=nn.Linear(8, 2)))
        >>> _ = add_lora(model, ["q"], r=2, modules_to_save=["classifier"])  # a new head
        >>> type(model.classifier).__name__, count_parameters(model)  # + its trainable copy
        ('ModulesToSaveWrapper', (50, 140))
        >>> model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 8))), ["q"], r=2,
        ...                  use_dora=True)  # DoRA: + a magnitude per output feature
        >>> type(model.q).__name__, count_parameters(model)  # 2 * (8 + 8) + 8 trainable
        ('DoRALinear', (40, 112))
    """
    if quant_type is not None:
        check_quant_type(quant_type)
    check_adapter_name(adapter_name)
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
    names = match_targets(model, targets)
    plans = []  # validate every layer before changing any
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALayer):
            if adapter_name in module.A:
                raise ValueError(f"layer {name!r} already has an adapter named {adapter_name!r}")
            # a second adapter keeps the base as it is: fine if it is 4-bit or an embedding
            base_fits = isinstance(module, LoRAEmbedding) or isinstance(
                module.base_layer, Linear4bit
            )
            if quant_type is not None and not base_fits:
                raise ValueError(f"layer {name!r} is wrapped in full precision; cannot quantize")
            if isinstance(module, DoRALinear) != use_dora:
                held = "DoRA" if isinstance(module, DoRALinear) else "plain LoRA"
                raise ValueError(
                    f"layer {name!r} holds {held} adapters; use_dora={use_dora} cannot add the "
                    "other kind to it (plain and DoRA adapters never share a layer)"
                )
        elif use_dora and wrapper_for(module) is not LoRALinear:
            raise ValueError(
                f"layer {name!r} is a {type(module).__name__}; DoRA (use_dora) "
                "applies to Linear layers only"
            )
        if quant_type is not None and isinstance(module, (*CONV_TYPES, LoRAConv)):
            raise ValueError(
                f"layer {name!r} is a convolution; quant_type (4-bit QLoRA) applies to Linear "
                "and GPT-2 Conv1D layers only"
            )
        r_here = pattern_value(rank_pattern or {}, name, r)
        alpha_here = pattern_value(alpha_pattern or {}, name, alpha)
        try:
            in_features, out_features = features(module)  # a grouped conv raises here
            check_adapter(
                r=r_here,
                alpha=alpha_here,
                dropout=dropout,
                init=init,
                in_features=in_features,
                out_features=out_features,
            )
        except ValueError as error:
            raise type(error)(f"layer {name!r}: {error}") from None
        plans.append((name, module, r_here, alpha_here))
    staged = []  # the modules trained in full, copied now: validated before any change
    if modules_to_save is not None:
        kept = select_modules(model, modules_to_save, matches, every_entry_must_match=True)
        staged = stage_copies(model, kept, adapter_name, names)

    bases = {  # built (and quantized) before the model changes: a failure changes nothing
        name: module if quant_type is None else _quantized(module, quant_type)
        for name, module, *_ in plans
        if not isinstance(module, LoRALayer)
    }
    wrapper_class = {LoRALinear: DoRALinear} if use_dora else {}
    wrappers = {
        name: wrapper_class.get(wrapper_for(base), wrapper_for(base))(base)
        for name, base in bases.items()
    }
    for name, module, *_ in plans:  # a 4-bit base is new: the wrapper takes the original's mode
        if name in wrappers:
            wrappers[name].train(module.training)
    active = active_adapter(model)
    for name, module, r_here, alpha_here in plans:
        if name in wrappers:
            module = wrappers[name]
            module.active_adapter = active
            replace_module(model, name, module)
        module.add_adapter(
            adapter_name,
            r=r_here,
            alpha=alpha_here,
            dropout=dropout,
            use_rslora=use_rslora,
            init=init,
        )
    if active is None:
        for _, layer in lora_layers(model):
            layer.active_adapter = adapter_name
    install_copies(model, staged, adapter_name, active_adapter(model))
    mark_only_lora_trainable(model)
    return model


def _layers_or_raise(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers (see add_lora)")
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the active adapter into each layer's frozen weight: W <- W + scale * B @ A.

    Forward then costs exactly the base model's (no LoRA matmuls). Raises RuntimeError if the
    model is already merged and ValueError, before changing any weight, if some merged weight
    would be NaN or inf. On a 4-bit base the merged weight is re-quantized, which changes the
    outputs by quantization rounding: a warning says so; `merged_copy` keeps full precision.

    Differs from PEFT on purpose: PEFT warns "All adapters are already merged, nothing to do"
    and goes on; lowrank raises, because a second merge means the caller's idea of the model's
    state is wrong, and the next unmerge would then subtract an update that is not there.

    Examples:
        >>> from collections import OrderedDict
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora, merge_lora
        >>> _ = torch.manual_seed(0)
        >>> model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 8))), ["q"], r=2)
        >>> _ = nn.init.normal_(model.q.B["default"])  # as if trained
        >>> x = torch.randn(3, 8)
        >>> y = model(x)
        >>> _ = merge_lora(model)
        >>> model.q.merged, torch.allclose(model(x), y, atol=1e-5)
        (True, True)
    """
    layers = _layers_or_raise(model)
    if any(layer.merged for _, layer in layers):
        raise RuntimeError("the model is already merged; merging twice would add updates twice")
    if any(layer.disabled for _, layer in layers):
        raise RuntimeError("adapters are disabled; leave disable_adapters() before merging")
    to_merge = [(n, layer) for n, layer in layers if layer.active_adapter in layer.A]
    if not to_merge:
        raise RuntimeError("no layer has an active adapter to merge")
    for name, layer in to_merge:  # check every layer first, then change them
        if not torch.isfinite(layer.merged_weight(+1.0)).all():
            raise ValueError(f"merging layer {name!r} would produce NaN or inf; nothing changed")
    if any(isinstance(layer.base_layer, Linear4bit) for _, layer in to_merge):
        warnings.warn(
            "merging into a 4-bit base re-quantizes W + scale * B @ A, so outputs change by "
            "quantization rounding; use merged_copy(model) for a full-precision merged model",
            stacklevel=2,
        )
    for _, layer in to_merge:
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take the merged adapter out again: W <- W - scale * B @ A (exact up to rounding of the
    base dtype; a 4-bit base is re-quantized once more). Raises RuntimeError if not merged
    (PEFT warns "Already unmerged. Nothing to do."; lowrank raises, as for merging twice).

    Examples:
        >>> from collections import OrderedDict
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora, merge_lora, unmerge_lora
        >>> _ = torch.manual_seed(0)
        >>> model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 8))), ["q"], r=2)
        >>> _ = nn.init.normal_(model.q.B["default"])
        >>> W = model.q.base_layer.weight.detach().clone()
        >>> _ = unmerge_lora(merge_lora(model))
        >>> model.q.merged, torch.allclose(model.q.base_layer.weight, W, atol=1e-6)
        (False, True)
    """
    layers = [layer for _, layer in _layers_or_raise(model) if layer.merged]
    if not layers:
        raise RuntimeError("the model is not merged; nothing to unmerge")
    if any(isinstance(layer.base_layer, Linear4bit) for layer in layers):
        warnings.warn(
            "unmerging a 4-bit base re-quantizes W: it is not restored exactly", stacklevel=2
        )
    for layer in layers:
        layer.unmerge()
    return model


def merged_copy(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of `model` with each LoRA layer replaced by a plain layer holding W + scale*B@A.

    The usual way to deploy a QLoRA fine-tune: a 4-bit base is dequantized and the update
    added in float32, and the layer becomes an nn.Linear of `dtype` (no second rounding to 4
    bits). Full-precision bases keep their class and dtype. A module trained in full
    (`modules_to_save`) becomes the module it runs. `model` itself is not changed.

    Examples:
        >>> from collections import OrderedDict
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora, merged_copy
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(64, 64)))
        >>> model = add_lora(model, ["q"], r=4, quant_type="nf4")  # QLoRA
        >>> _ = nn.init.normal_(model.q.B["default"], std=0.01)  # as if trained
        >>> plain = merged_copy(model)
        >>> type(plain.q).__name__, plain.q.weight.dtype  # W + scale * B @ A, [out, in]
        ('Linear', torch.float32)
        >>> x = torch.randn(2, 64)
        >>> torch.allclose(plain(x), model(x), atol=1e-4)  # the same function, no 4 bits
        True
    """
    _layers_or_raise(model)
    result = copy.deepcopy(model)
    for name, layer in list(lora_layers(result)):
        base = layer.base_layer
        if isinstance(base, Linear4bit):
            weight = layer.base_weight().float()  # (out, in)
            if layer.active_adapter in layer.A and not layer.merged and not layer.disabled:
                if isinstance(layer, DoRALinear):  # m * V / ||V||_c, from the dequantized W
                    weight = layer.merged_weight(+1.0).float()
                else:
                    weight = weight + layer.delta_weight().detach().float()
            plain = nn.Linear(
                layer.in_features,
                layer.out_features,
                bias=base.bias is not None,
                dtype=dtype,
                device=weight.device,
            )
            with torch.no_grad():
                plain.weight.copy_(weight)
                if base.bias is not None:
                    plain.bias.copy_(base.bias)
            base = plain
        elif layer.active_adapter in layer.A and not layer.merged and not layer.disabled:
            layer.set_base_weight(layer.merged_weight(+1.0))
        replace_module(result, name, base)
    for name, wrapper in list(saved_modules(result)):
        replace_module(result, name, wrapper.active_module)
    return result


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters, each shared tensor counted once.

    A 4-bit weight counts as the out * in numbers it represents, not as its packed bytes
    (counting uint8 storage halves the apparent size, a common confusion); its quantization
    constants (absmax etc.) are storage, not parameters, and are not counted.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora, count_parameters
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(64, 64)))
        >>> count_parameters(model)
        (4160, 4160)
        >>> count_parameters(add_lora(model, ["q"], r=8, quant_type="nf4"))  # W: 64 * 64 = 4096
        (1024, 5184)
    """
    trainable, total, seen = 0, 0, set()
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    inside_quantized = {id(t) for m in quantized for t in (*m.parameters(), *m.buffers())}
    for m in quantized:
        total += m.out_features * m.in_features
        if m.bias is not None:
            total += m.bias.numel()
            trainable += m.bias.numel() if m.bias.requires_grad else 0
    for parameter in model.parameters():
        if id(parameter) in seen or id(parameter) in inside_quantized:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable, total

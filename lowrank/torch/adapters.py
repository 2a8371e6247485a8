"""Several named LoRA adapters on one model: list, switch, disable, delete and combine them.

LoRA (Hu et al. 2021, arXiv:2106.09685) makes task switching cheap: one frozen base model,
one small (A, B) pair per task and layer. `lowrank.torch.model.add_lora(..., adapter_name=...)`
adds adapters; this file manages them (the PEFT file format is in `peft_format.py`):

- `list_adapters`, `set_active_adapter`, `disable_adapters` (a context manager),
  `delete_adapter`;
- `combine_adapters`: a new adapter from a weighted mix of others, by one of `COMBINATIONS`
  ("linear", "cat", "svd");
- `check_known`, `check_unmerged`: the guards these functions (and the PEFT loader) share.

An adapter's copies of the modules it trains in full (`modules_to_save.py`, PEFT's
modules_to_save) switch, disable and go with its LoRA factors.
"""

import math
import numbers
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lowrank._validate import ArgumentTypeError, RankWarning, check_adapter_name
from lowrank.torch.dora import DoRALinear
from lowrank.torch.lora import LoRALayer
from lowrank.torch.model import lora_layers, mark_only_lora_trainable, replace_module
from lowrank.torch.modules_to_save import saved_modules

__all__ = [
    "COMBINATIONS",
    "list_adapters",
    "check_known",
    "check_unmerged",
    "set_active_adapter",
    "disable_adapters",
    "delete_adapter",
    "combine_adapters",
]

COMBINATIONS = ("linear", "cat", "svd")  # how `combine_adapters` can mix adapters


def list_adapters(model: nn.Module) -> list[str]:
    """Adapter names on `model`, in the order they first appear.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.adapters import list_adapters
        >>> from lowrank.torch.model import add_lora
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), v=nn.Linear(8, 8)))
        >>> _ = add_lora(model, ["q", "v"], r=2, adapter_name="sst2")
        >>> _ = add_lora(model, ["q"], r=2, adapter_name="imdb")
        >>> list_adapters(model)
        ['sst2', 'imdb']
    """
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.A))
    return list(names)


def check_known(model: nn.Module, name: str) -> None:
    """Raise ValueError, listing the model's adapters, unless it has an adapter `name`.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.adapters import check_known
        >>> from lowrank.torch.model import add_lora
        >>> model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 8))), ["q"], r=2)
        >>> check_known(model, "default")
        >>> check_known(model, "sst2")
        Traceback (most recent call last):
            ...
        ValueError: no adapter named 'sst2'; the model has ['default']
    """
    if name not in list_adapters(model):
        raise ValueError(f"no adapter named {name!r}; the model has {list_adapters(model)}")


def check_unmerged(model: nn.Module, action: str) -> None:
    """Raise RuntimeError, saying `action` needs `unmerge_lora` first, if any layer is merged.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.adapters import check_unmerged
        >>> from lowrank.torch.model import add_lora, merge_lora
        >>> model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 8))), ["q"], r=2)
        >>> check_unmerged(model, "switch adapters")
        >>> check_unmerged(merge_lora(model), "switch adapters")
        Traceback (most recent call last):
            ...
        RuntimeError: the model is merged; unmerge_lora(model) before you switch adapters
    """
    if any(layer.merged for _, layer in lora_layers(model)):
        raise RuntimeError(f"the model is merged; unmerge_lora(model) before you {action}")


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make adapter `name` the one every LoRA layer adds (layers without it add nothing) and
    whose copies of `modules_to_save` run; only its A and B (and copies) require grad after.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.adapters import set_active_adapter
        >>> from lowrank.torch.model import active_adapter, add_lora
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), v=nn.Linear(8, 8)))
        >>> _ = add_lora(model, ["q", "v"], r=2, adapter_name="sst2")
        >>> _ = add_lora(model, ["q"], r=2, adapter_name="imdb")
        >>> active_adapter(model)  # the first adapter added
        'sst2'
        >>> set_active_adapter(model, "imdb")  # v has no "imdb": it adds nothing now
        >>> [name for name, p in model.named_parameters() if p.requires_grad]
        ['q.A.imdb', 'q.B.imdb']
    """
    check_known(model, name)
    check_unmerged(model, "switch adapters")
    for _, layer in lora_layers(model):
        layer.active_adapter = name
    for _, wrapper in saved_modules(model):
        wrapper.active_adapter = name
    mark_only_lora_trainable(model)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """`with disable_adapters(model):` runs the bare base model (e.g. a reference output).

    Inside the block no adapter adds anything, modules trained in full run their originals
    (`modules_to_save`), and none is trainable (as in PEFT: a step taken there must not move
    an adapter that did not take part); on leaving, every flag and every requires_grad is
    restored, also after an exception.

    Examples:
        >>> from collections import OrderedDict
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.adapters import disable_adapters
        >>> from lowrank.torch.model import add_lora
        >>> _ = torch.manual_seed(0)
        >>> model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(8, 8))), ["q"], r=2)
        >>> _ = nn.init.normal_(model.q.B["default"])  # as if trained
        >>> x = torch.randn(3, 8)
        >>> with disable_adapters(model):
        ...     torch.equal(model(x), model.q.base_layer(x))
        True
        >>> torch.equal(model(x), model.q.base_layer(x)), model.q.B["default"].requires_grad
        (False, True)
    """
    check_unmerged(model, "disable adapters")
    layers = [*(layer for _, layer in lora_layers(model)), *(w for _, w in saved_modules(model))]
    factors = [p for layer in layers for p in _adapter_parameters(layer)]
    trainable = [p.requires_grad for p in factors]
    for layer in layers:
        layer.disabled = True
    for parameter in factors:
        parameter.requires_grad_(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for parameter, flag in zip(factors, trainable, strict=True):
            parameter.requires_grad_(flag)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere; a layer left without adapters becomes its plain base
    layer again. Deleting the active adapter leaves no adapter active: unlike PEFT, which
    activates one of the remaining adapters, lowrank does not switch the model to another
    task's adapter without being asked (`set_active_adapter` does that).

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.adapters import delete_adapter, list_adapters
        >>> from lowrank.torch.model import add_lora
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), v=nn.Linear(8, 8)))
        >>> _ = add_lora(model, ["q", "v"], r=2, adapter_name="sst2")  # active
        >>> _ = add_lora(model, ["q"], r=2, adapter_name="imdb")
        >>> delete_adapter(model, "sst2")
        >>> list_adapters(model), type(model.q).__name__, type(model.v).__name__
        (['imdb'], 'LoRALinear', 'Linear')
        >>> print(model.q.active_adapter)  # not switched to "imdb" behind your back
        None
    """
    check_known(model, name)
    if any(name == layer.merged_adapter for _, layer in lora_layers(model)):
        raise RuntimeError(f"adapter {name!r} is merged; unmerge_lora(model) first")
    for layer_name, layer in list(lora_layers(model)):
        if name in layer.A:
            layer.delete_adapter(name)
        if layer.active_adapter == name:
            layer.active_adapter = None
        if not layer.A:
            replace_module(model, layer_name, layer.base_layer)
    for module_name, wrapper in list(saved_modules(model)):
        if name in wrapper.modules_to_save:
            wrapper.delete_adapter(name)
        if wrapper.active_adapter == name:
            wrapper.active_adapter = None
        if not wrapper.modules_to_save:
            replace_module(model, module_name, wrapper.original_module)


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
    a layer gets rank min(r, in, out), zero-padded where the sum has a lower rank. "cat" may
    give a layer a rank above min(in, out) (the sum's rank cannot be): that is what exactness
    costs, so it does not warn.

    Every layer's factors are computed and checked (finite) before any layer changes; if
    adding them fails anyway, the new adapter is removed again: the model is as it was.
    Adapters that train modules in full (`modules_to_save`: a head each) are refused: a mix
    of their factors has no head to go with it.

    Examples:
        >>> from collections import OrderedDict
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.adapters import combine_adapters
        >>> from lowrank.torch.model import add_lora
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 8)))
        >>> for name in ("sst2", "imdb"):
        ...     _ = add_lora(model, ["q"], r=2, adapter_name=name)
        ...     _ = nn.init.normal_(model.q.B[name])  # as if trained
        >>> combine_adapters(model, ["sst2", "imdb"], [0.5, 0.5], "mix", combination="cat")
        >>> model.q.r["mix"]  # ranks add up
        4
        >>> dW = 0.5 * model.q.delta_weight("sst2") + 0.5 * model.q.delta_weight("imdb")
        >>> torch.allclose(model.q.delta_weight("mix"), dW, atol=1e-6)  # exactly the mix
        True
        >>> combine_adapters(model, ["sst2", "imdb"], [0.5, 0.5], "mix2", r=2)  # "svd"
        >>> model.q.A["mix2"].shape  # the best rank-2 approximation of dW: (r, in)
        torch.Size([2, 8])
    """
    if combination not in COMBINATIONS:
        raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}")
    if not names or len(names) != len(weights):
        raise ValueError(f"need one weight per adapter: {len(names)} names, {len(weights)} weights")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise ArgumentTypeError(f"weights must be real numbers, got {weight!r}")
        if not math.isfinite(weight):
            raise ValueError(f"weights must be finite, got {weights}")
    check_adapter_name(new_name)
    for name in names:
        check_known(model, name)
    dora = [name for name, layer in lora_layers(model) if isinstance(layer, DoRALinear)]
    if dora:  # a mix of DoRA adapters would need their magnitudes mixed too: not defined here
        raise ValueError(f"combine_adapters mixes LoRA adapters only; {dora[0]!r} is a DoRA layer")
    if new_name in list_adapters(model):
        raise ValueError(f"the model already has an adapter named {new_name!r}")
    for module_name, wrapper in saved_modules(model):
        if any(n in wrapper.modules_to_save for n in names):
            raise ValueError(
                f"adapters {names} train {module_name!r} in full (modules_to_save); a "
                "combination of their factors has no such module to go with it"
            )
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
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"combining gives NaN or inf on layer {layer_name!r}; nothing added")
        plans.append((layer, A, B))
    added = []
    try:
        for layer, A, B in plans:
            rank = A.shape[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RankWarning)  # "cat" may exceed min(in, out)
                layer.add_adapter(new_name, r=rank, alpha=rank)
            added.append(layer)
            with torch.no_grad():
                layer.A[new_name].copy_(A)
                layer.B[new_name].copy_(B)
    except BaseException:
        for layer in added:
            layer.delete_adapter(new_name)
        raise
    mark_only_lora_trainable(model)


def _adapter_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """Every adapter's parameters in a LoRA layer (A, B) or a modules_to_save wrapper."""
    if isinstance(layer, LoRALayer):  # DoRA's magnitudes too
        return [*layer.A.values(), *layer.B.values(), *getattr(layer, "magnitude", {}).values()]
    return list(layer.modules_to_save.parameters())


def _combine(
    layer: LoRALayer, present: list[tuple[float, str]], combination: str, r: int | None, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, in], B [out, rank]) of the combined adapter on one layer."""
    if combination == "linear":
        ranks = {layer.r[n] for _, n in present}
        if len(ranks) > 1:
            raise ValueError(f"'linear' needs equal ranks; layer {where!r} has ranks {ranks}")
        roots = [math.sqrt(w * layer.scale[n]) for w, n in present]
        A = sum(c * layer.A[n] for c, (_, n) in zip(roots, present, strict=True))
        B = sum(c * layer.B[n] for c, (_, n) in zip(roots, present, strict=True))
        return A, B
    A_cat = torch.cat([layer.A[n] for _, n in present], dim=0)  # (sum r_i, in)
    B_cat = torch.cat([w * layer.scale[n] * layer.B[n] for w, n in present], dim=1)  # (out, sum)
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

"""PiSSA and OLoRA: start LoRA from the principal part of W instead of from zero.

Plain LoRA starts with B = 0, so the adapter begins as nothing. These two initialisations
move a rank-r piece of the frozen weight W [out, in] into the adapter and keep the rest as the
new frozen base, so the model computes what it did but training starts on the part of W that
matters most:

- PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors
  Adaptation of Large Language Models", arXiv:2404.02948): W = U S V^T, and with the top-r
  triplets A = sqrt(S_r / scale) V_r^T [r, in], B = U_r sqrt(S_r / scale) [out, r], so that
  scale * B @ A is the best rank-r approximation of W.
- OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language
  Models", arXiv:2406.01775): W = Q R, and B = Q[:, :r] (out, r), A = R[:r] (r, in) (not
  divided by scale: scale * B @ A is scale times the leading part of W).

In both the base becomes the residual W_res = W - scale * B @ A. These follow PEFT's
`LoraLayer.pissa_init` / `olora_init` (init_lora_weights="pissa" / "olora") operation for
operation, so the same model gives the same factors and the same residual base.

The residual base is no longer the published model, so an adapter trained on it cannot be
loaded onto the original. `plain_lora_copy` rewrites it as a plain LoRA adapter against the
original W, as PEFT's `save_pretrained(..., path_initial_model_for_weight_conversion=...)`
does: training moved (A0, B0) to (A, B), so W_res + s B A = W + s (B A - B0 A0), and
B A - B0 A0 = [B, -B0] @ [A; A0], an adapter of rank 2r with alpha doubled (times sqrt(2)
with rsLoRA) so that the scale stays s. The NumPy mirror is `lowrank.numpy.pissa`.
"""

import copy
import math

import torch
from torch import nn

from lowrank.torch.lora import LoRAEmbedding, LoRALayer
from lowrank.torch.model import lora_layers

__all__ = ["InitialFactors", "pissa_init", "olora_init", "plain_lora_copy"]

# Layer name -> (A0 [r, in], B0 [out, r]): the adapter as the initialisation left it.
InitialFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _targets(model: nn.Module, adapter_name: str | None) -> list[tuple[str, LoRALayer, str]]:
    """(name, layer, adapter) of every layer holding the adapter; checked before any change."""
    found = []
    for name, layer in lora_layers(model):
        adapter = layer.active_adapter if adapter_name is None else adapter_name
        if adapter is None or adapter not in layer.A:
            continue
        if isinstance(layer, LoRAEmbedding):
            raise ValueError(f"layer {name!r}: PiSSA/OLoRA apply to Linear and Conv1D layers")
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged; unmerge it before re-initialising")
        found.append((name, layer, adapter))
    if not found:
        raise ValueError(f"no LoRA layer holds adapter {adapter_name or '(active)'!r}")
    return found


def _reinit(model: nn.Module, adapter_name: str | None, factors) -> InitialFactors:
    """Compute (A, B) for every layer first, then set them and W_res: all or nothing."""
    plans = []
    for name, layer, adapter in _targets(model, adapter_name):
        dtype = layer.A[adapter].dtype  # float32, or float64 on a float64 base
        W = layer.base_weight().detach().to(dtype)  # (out, in)
        if not torch.isfinite(W).all():
            raise ValueError(f"layer {name!r}: the base weight is not finite; nothing changed")
        scale = layer.scale[adapter]
        A, B = factors(W, layer.r[adapter], scale)  # (r, in), (out, r)
        residual = W - scale * B @ A  # (out, r) @ (r, in) -> (out, in)
        plans.append((name, layer, adapter, A, B, residual))
    initial = {}
    with torch.no_grad():
        for name, layer, adapter, A, B, residual in plans:
            layer.A[adapter].copy_(A)
            layer.B[adapter].copy_(B)
            layer.set_base_weight(residual.to(layer.base_weight().dtype))
            initial[name] = (A.clone(), B.clone())
    return initial


def _pissa_factors(W: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (out, k), (k,), (k, in)
    root = torch.sqrt(S[:r] / scale)  # (r,)
    return root[:, None] * Vh[:r], U[:, :r] * root  # A (r, in), B (out, r)


def _olora_factors(W: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    Q, R = torch.linalg.qr(W)  # (out, k), (k, in)
    return R[:r].contiguous(), Q[:, :r].contiguous()  # A (r, in), B (out, r)


def pissa_init(model: nn.Module, adapter_name: str | None = None) -> InitialFactors:
    """Re-initialise adapter `adapter_name` (None: each layer's active one) by PiSSA, in place.

    For each LoRA layer holding it, W = U S V^T [out, in]; A = sqrt(S_r / scale) V_r^T
    [r, in], B = U_r sqrt(S_r / scale) [out, r], and the frozen base becomes
    W - scale * B @ A (re-quantized, for a 4-bit base). The model computes what it did (up to
    rounding). Computed in the adapter's dtype (float32; float64 on a float64 base), as PEFT's
    `init_lora_weights="pissa"`. Everything is computed before anything changes. Meng et al.
    2024, arXiv:2404.02948.

    Returns:
        The initial factors {layer name: (A0 [r, in], B0 [out, r])}, for `plain_lora_copy`.

    Examples:
        >>> from collections import OrderedDict
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.pissa import pissa_init
        >>> _ = torch.manual_seed(0)
        >>> model = add_lora(nn.Sequential(OrderedDict(fc=nn.Linear(16, 8))), ["fc"], r=2)
        >>> W = model.fc.base_layer.weight.detach().clone()
        >>> x = torch.randn(3, 16)
        >>> before = model(x)
        >>> initial = pissa_init(model)
        >>> torch.allclose(model(x), before, atol=1e-5)  # base + adapter = W
        True
        >>> S = torch.linalg.svdvals(W)  # the adapter holds the top 2 singular values
        >>> torch.allclose(torch.linalg.svdvals(model.fc.delta_weight())[:2], S[:2], atol=1e-5)
        True
    """
    return _reinit(model, adapter_name, _pissa_factors)


def olora_init(model: nn.Module, adapter_name: str | None = None) -> InitialFactors:
    """Re-initialise adapter `adapter_name` (None: each layer's active one) by OLoRA, in place.

    For each LoRA layer holding it, W = Q R (out, in); B = Q[:, :r] (out, r) (orthonormal
    columns), A = R[:r] (r, in), and the frozen base becomes W - scale * B @ A. As PEFT's
    `init_lora_weights="olora"` (no division by scale). Büyükakyüz 2024, arXiv:2406.01775.

    Returns:
        The initial factors {layer name: (A0 [r, in], B0 [out, r])}, for `plain_lora_copy`.

    Examples:
        >>> from collections import OrderedDict
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.pissa import olora_init
        >>> _ = torch.manual_seed(0)
        >>> model = add_lora(nn.Sequential(OrderedDict(fc=nn.Linear(16, 8))), ["fc"], r=2)
        >>> x = torch.randn(3, 16)
        >>> before = model(x)
        >>> _ = olora_init(model)
        >>> B = model.fc.B["default"]  # (out, r), orthonormal columns
        >>> torch.allclose(B.T @ B, torch.eye(2), atol=1e-5)
        True
        >>> torch.allclose(model(x), before, atol=1e-5)
        True
    """
    return _reinit(model, adapter_name, _olora_factors)


def plain_lora_copy(
    model: nn.Module, initial: InitialFactors, adapter_name: str | None = None
) -> nn.Module:
    """A copy of the PiSSA/OLoRA `model` as plain LoRA on the ORIGINAL base: save it with
    `peft_format.save_adapter` and any LoRA loader can use it on the published model.

    Each layer in `initial` gets its base back (W = W_res + s B0 A0) and the adapter
    A' = `[A; A0]` (2r, in), B' = `[B, -B0]` (out, 2r), r' = 2r and alpha' = 2 alpha (sqrt(2)
    alpha with rsLoRA), so s' B' A' = s (B A - B0 A0): PEFT's
    `save_pretrained(path_initial_model_for_weight_conversion=...)`. `model` is not changed.
    A 4-bit base is re-quantized, so Quant(W) differs from the base PiSSA started from.

    Examples:
        >>> from collections import OrderedDict
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.pissa import pissa_init, plain_lora_copy
        >>> _ = torch.manual_seed(0)
        >>> base = nn.Sequential(OrderedDict(fc=nn.Linear(16, 8)))
        >>> W = base.fc.weight.detach().clone()
        >>> model = add_lora(base, ["fc"], r=2)
        >>> initial = pissa_init(model)
        >>> with torch.no_grad():
        ...     _ = model.fc.B["default"].add_(0.01)  # as if trained
        >>> plain = plain_lora_copy(model, initial)
        >>> plain.fc.r["default"], plain.fc.A["default"].shape  # rank 2r
        (4, torch.Size([4, 16]))
        >>> torch.allclose(plain.fc.base_weight(), W, atol=1e-5)  # the original W
        True
        >>> x = torch.randn(3, 16)
        >>> torch.allclose(plain(x), model(x), atol=1e-5)
        True
    """
    targets = {name: (layer, adapter) for name, layer, adapter in _targets(model, adapter_name)}
    unknown = sorted(initial.keys() - targets.keys())
    if unknown:
        raise ValueError(f"initial factors name layers without the adapter: {unknown}")
    for name, (A0, B0) in initial.items():
        layer, adapter = targets[name]
        if A0.shape != layer.A[adapter].shape or B0.shape != layer.B[adapter].shape:
            raise ValueError(
                f"layer {name!r}: initial factors {tuple(A0.shape)}, {tuple(B0.shape)} do not "
                f"match the adapter's {tuple(layer.A[adapter].shape)}, "
                f"{tuple(layer.B[adapter].shape)}"
            )
    result = copy.deepcopy(model)
    converted = dict(lora_layers(result))
    with torch.no_grad():
        for name, (A0, B0) in initial.items():
            layer, adapter = converted[name], targets[name][1]
            A, B, scale = layer.A[adapter], layer.B[adapter], layer.scale[adapter]
            W = layer.base_weight().to(A.dtype) + scale * B0.to(B) @ A0.to(A)  # (out, in)
            layer.set_base_weight(W.to(layer.base_weight().dtype))
            layer.A[adapter] = nn.Parameter(torch.cat([A, A0.to(A)], dim=0))  # (2r, in)
            layer.B[adapter] = nn.Parameter(torch.cat([B, -B0.to(B)], dim=1))  # (out, 2r)
            layer.r[adapter] *= 2
            layer.alpha[adapter] *= math.sqrt(2) if layer.use_rslora[adapter] else 2
    return result

"""PiSSA and OLoRA in NumPy: start LoRA from the principal part of W (the mirror of
`lowrank.torch.pissa`).

Plain LoRA starts with B = 0. These initialisations move a rank-r piece of the frozen weight
W [out, in] into the adapter and keep the rest as the frozen base, so the model computes what
it did but training starts on the part of W that matters most:

- PiSSA (Meng et al. 2024, arXiv:2404.02948): W = U S V^T; A = sqrt(S_r / scale) V_r^T
  [r, in], B = U_r sqrt(S_r / scale) [out, r]: scale * B @ A is the best rank-r part of W.
- OLoRA (Büyükakyüz 2024, arXiv:2406.01775): W = Q R; B = Q[:, :r] (out, r),
  A = R[:r] (r, in) (not divided by scale).

In both the base becomes W_res = W - scale * B @ A, as PEFT's `pissa_init` / `olora_init`.
`plain_lora_copy` rewrites the trained result as plain LoRA of rank 2r against the original W:
W_res + s B A = W + s [B, -B0] @ [A; A0] (PEFT's `path_initial_model_for_weight_conversion`).
"""

import copy
import math

import numpy as np

from .model import MLP, lora_layers

__all__ = ["InitialFactors", "pissa_init", "olora_init", "plain_lora_copy"]

# Layer name -> (A0 [r, in], B0 [out, r]): the adapter as the initialisation left it.
InitialFactors = dict[str, tuple[np.ndarray, np.ndarray]]


def _targets(model: MLP) -> list:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call add_lora first")
    for name, layer in layers:
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged; unmerge it before re-initialising")
    return layers


def _reinit(model: MLP, factors) -> InitialFactors:
    """Compute (A, B) for every layer first, then set them and W_res: all or nothing."""
    plans = []
    for name, layer in _targets(model):
        W = layer.base_weight().astype(layer.A.dtype)  # (out, in)
        if not np.all(np.isfinite(W)):
            raise ValueError(f"layer {name!r}: the base weight is not finite; nothing changed")
        A, B = factors(W, layer.r, layer.scale)  # (r, in), (out, r)
        residual = W - layer.scale * B @ A  # (out, r) @ (r, in) -> (out, in)
        plans.append((name, layer, A, B, residual))
    initial = {}
    for name, layer, A, B, residual in plans:
        layer.A[...] = A  # in place: an optimizer built on the model sees the new values
        layer.B[...] = B
        layer.set_base_weight(residual)
        initial[name] = (A.copy(), B.copy())
    return initial


def _pissa_factors(W: np.ndarray, r: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    U, S, Vh = np.linalg.svd(W, full_matrices=False)  # (out, k), (k,), (k, in)
    root = np.sqrt(S[:r] / scale)  # (r,)
    return root[:, None] * Vh[:r], U[:, :r] * root  # A (r, in), B (out, r)


def _olora_factors(W: np.ndarray, r: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    Q, R = np.linalg.qr(W)  # (out, k), (k, in)
    return R[:r].copy(), Q[:, :r].copy()  # A (r, in), B (out, r)


def pissa_init(model: MLP) -> InitialFactors:
    """Re-initialise every LoRA layer of `model` by PiSSA, in place.

    W = U S V^T [out, in]; A = sqrt(S_r / scale) V_r^T [r, in], B = U_r sqrt(S_r / scale)
    [out, r]; the frozen base becomes W - scale * B @ A (re-quantized, for a 4-bit base). The
    model computes what it did, up to rounding. Meng et al. 2024, arXiv:2404.02948.

    Returns:
        The initial factors {layer name: (A0 [r, in], B0 [out, r])}, for `plain_lora_copy`.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import MLP, add_lora
        >>> from lowrank.numpy.pissa import pissa_init
        >>> model = add_lora(MLP([16, 8]), r=2)
        >>> S = np.linalg.svd(model.layers[0].weight, compute_uv=False)
        >>> x = np.ones((3, 16))
        >>> before = model.forward(x)
        >>> _ = pissa_init(model)
        >>> bool(np.allclose(model.forward(x), before))  # base + adapter = W
        True
        >>> top = np.linalg.svd(model.layers[0].delta_weight(), compute_uv=False)[:2]
        >>> bool(np.allclose(top, S[:2]))  # the adapter holds the top 2 singular values
        True
    """
    return _reinit(model, _pissa_factors)


def olora_init(model: MLP) -> InitialFactors:
    """Re-initialise every LoRA layer of `model` by OLoRA, in place.

    W = Q R (out, in); B = Q[:, :r] (out, r) (orthonormal columns), A = R[:r] (r, in), and
    the frozen base becomes W - scale * B @ A. Büyükakyüz 2024, arXiv:2406.01775.

    Returns:
        The initial factors {layer name: (A0 [r, in], B0 [out, r])}, for `plain_lora_copy`.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import MLP, add_lora
        >>> from lowrank.numpy.pissa import olora_init
        >>> model = add_lora(MLP([16, 8]), r=2)
        >>> x = np.ones((3, 16))
        >>> before = model.forward(x)
        >>> _ = olora_init(model)
        >>> B = model.layers[0].B  # (out, r), orthonormal columns
        >>> bool(np.allclose(B.T @ B, np.eye(2))), bool(np.allclose(model.forward(x), before))
        (True, True)
    """
    return _reinit(model, _olora_factors)


def plain_lora_copy(model: MLP, initial: InitialFactors) -> MLP:
    """A copy of the PiSSA/OLoRA `model` as plain LoRA on the ORIGINAL base.

    Each layer in `initial` gets its base back (W = W_res + s B0 A0) and the adapter
    A' = `[A; A0]` (2r, in), B' = `[B, -B0]` (out, 2r), r' = 2r and alpha' = 2 alpha (sqrt(2)
    alpha with rsLoRA), so s' B' A' = s (B A - B0 A0). `model` is not changed.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import MLP, add_lora
        >>> from lowrank.numpy.pissa import pissa_init, plain_lora_copy
        >>> model = add_lora(MLP([16, 8]), r=2)
        >>> W = model.layers[0].weight.copy()
        >>> initial = pissa_init(model)
        >>> model.layers[0].B += 0.01  # as if trained
        >>> plain = plain_lora_copy(model, initial)
        >>> plain.layers[0].r, bool(np.allclose(plain.layers[0].weight, W))
        (4, True)
        >>> x = np.ones((3, 16))
        >>> bool(np.allclose(plain.forward(x), model.forward(x)))
        True
    """
    layers = dict(_targets(model))
    unknown = sorted(initial.keys() - layers.keys())
    if unknown:
        raise ValueError(f"initial factors name layers that are not LoRA layers: {unknown}")
    for name, (A0, B0) in initial.items():
        layer = layers[name]
        if A0.shape != layer.A.shape or B0.shape != layer.B.shape:
            raise ValueError(
                f"layer {name!r}: initial factors {A0.shape}, {B0.shape} do not match the "
                f"adapter's {layer.A.shape}, {layer.B.shape}"
            )
    result = copy.deepcopy(model)
    converted = dict(lora_layers(result))
    for name, (A0, B0) in initial.items():
        layer = converted[name]
        layer.set_base_weight(layer.base_weight() + layer.scale * B0 @ A0)  # (out, in)
        layer.A = np.concatenate([layer.A, A0.astype(layer.A.dtype)], axis=0)  # (2r, in)
        layer.B = np.concatenate([layer.B, -B0.astype(layer.B.dtype)], axis=1)  # (out, 2r)
        layer.r *= 2
        layer.alpha *= math.sqrt(2) if layer.use_rslora else 2
    return result

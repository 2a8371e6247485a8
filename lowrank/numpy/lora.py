"""LoRA in NumPy: a frozen linear layer plus a trainable low-rank update, with its backward pass.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
freezes a pre-trained weight W [out, in] and learns its change as a product of two thin
matrices, B [out, r] @ A [r, in], with r much smaller than in and out:

    y = x W^T + b + scale * dropout(x) A^T B^T        scale = alpha / r

Only A and B train: r * (in + out) numbers instead of in * out. B starts at zero, so a new
adapter leaves the layer's output exactly as it was; A starts random (like nn.Linear's weight)
so that gradients reach B from the first step. Dividing by r keeps the update's size roughly
independent of r, so alpha need not be retuned when r changes; rsLoRA (Kalajdzievski 2023,
arXiv:2312.03732) argues alpha / sqrt(r) is the scale that keeps learning stable as r grows
(`use_rslora=True`).

After training, scale * B @ A can be folded into W (`merge`): inference then costs exactly as
much as the original layer. `unmerge` takes it out again, e.g. to switch adapters.

Also here: `Linear`, an ordinary trainable layer (the tiny model's building block, the full
fine-tuning baseline, and, frozen, the base layer a LoRALinear wraps), and `kaiming_uniform_A`.

As in `lowrank.torch.lora` (and PEFT), the adapter is a wrapper around its frozen
`base_layer`: y = base_layer(x) + LoRA's path, and dL/dx = base_layer.backward(dy) + LoRA's
part. A 4-bit base (`qlora.Linear4bit`) drops in without changing a line here. The torch
wrapper holds several named adapters, so its r, alpha and scale are dicts keyed by name where
this one holds the values themselves.

(About 430 lines, a fifth of them docstring examples: the plain `Linear` lives here beside the
LoRALinear that wraps it; torch has nn.Linear for that.)

Dtype: layers compute in float64 (the reference precision, needed for gradient checks); a
float32 weight stays float32, anything else is converted to float64.
"""

import math

import numpy as np

from lowrank._validate import check_adapter, check_int

__all__ = ["Linear", "LoRALinear", "kaiming_uniform_A"]


def kaiming_uniform_A(
    r: int, in_features: int, rng: np.random.Generator, dtype: np.dtype = np.float64
) -> np.ndarray:
    """A [r, in] drawn as nn.Linear draws its weight: uniform(-1/sqrt(in), 1/sqrt(in)).

    PyTorch initialises nn.Linear (and PEFT initialises lora_A) with
    kaiming_uniform_(w, a=sqrt(5)). Kaiming uniform draws from uniform(-bound, bound) with

        gain  = sqrt(2 / (1 + a^2))      = sqrt(2 / 6) = 1 / sqrt(3)     (leaky-ReLU gain)
        std   = gain / sqrt(fan_in)
        bound = sqrt(3) * std            (a uniform(-c, c) has std c / sqrt(3))
              = sqrt(3) / sqrt(3) / sqrt(fan_in) = 1 / sqrt(fan_in)

    and for a weight [r, in] the fan-in is `in`. So the whole recipe is 1 / sqrt(in).
    LoRA (Hu et al. 2021, arXiv:2106.09685) starts A random and B at zero; this is the random
    draw PEFT uses for A by default.

    Args:
        r: rows of A, the adapter's rank.
        in_features: columns of A, the layer's input size.
        rng: where the random numbers come from.
        dtype: the dtype of the returned array.

    Returns:
        A: (r, in_features), every entry in [-1/sqrt(in_features), 1/sqrt(in_features)].

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import kaiming_uniform_A
        >>> A = kaiming_uniform_A(4, 16, np.random.default_rng(0))
        >>> A.shape, A.dtype
        ((4, 16), dtype('float64'))
        >>> bool(np.abs(A).max() <= 1 / np.sqrt(16))
        True
    """
    bound = 1.0 / np.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(r, in_features)).astype(dtype, copy=False)


def _as_float_array(name: str, value: object, ndim: int) -> np.ndarray:
    """A float copy of `value` (float32 stays float32, the rest becomes float64)."""
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    dtype = np.float32 if array.dtype == np.float32 else np.float64
    array = np.array(array, dtype=dtype)  # a copy: merge() changes it in place
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf")
    return array


class Linear:
    """y = x W^T + b with W [out, in] and b [out] both trainable; nn.Linear's layout and init.

    `Linear(in_features, out_features, rng=rng)` draws W and b from
    uniform(-1/sqrt(in), 1/sqrt(in)) as nn.Linear does (see `kaiming_uniform_A`). Assign
    `.weight` / `.bias` to load other values. Set `requires_grad = False` to freeze it: it then
    has no parameters and its backward returns only dx.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import Linear
        >>> layer = Linear(3, 2, rng=np.random.default_rng(0))
        >>> layer.weight.shape, layer.bias.shape  # W (out, in), b (out,)
        ((2, 3), (2,))
        >>> y = layer.forward(np.ones((4, 3)))  # (batch, in) -> (batch, out)
        >>> y.shape
        (4, 2)
        >>> dx = layer.backward(np.ones_like(y))  # dL/dy (batch, out) -> dL/dx (batch, in)
        >>> dx.shape, layer.grad_weight.shape, layer.grad_bias.shape
        ((4, 3), (2, 3), (2,))
        >>> sorted(layer.params())
        ['bias', 'weight']
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        rng: np.random.Generator | None = None,
    ) -> None:
        check_int("in_features", in_features)
        check_int("out_features", out_features)
        rng = np.random.default_rng(0) if rng is None else rng
        bound = 1.0 / np.sqrt(in_features)
        self.weight = rng.uniform(-bound, bound, size=(out_features, in_features))  # (out, in)
        self.bias = rng.uniform(-bound, bound, size=out_features) if bias else None  # (out,)
        self.requires_grad = True
        self.grad_weight: np.ndarray | None = None
        self.grad_bias: np.ndarray | None = None
        self._x: np.ndarray | None = None

    @classmethod
    def frozen(cls, weight: np.ndarray, bias: np.ndarray | None = None) -> "Linear":
        """A frozen Linear holding copies of `weight` [out, in] and `bias` [out] (float32 stays
        float32, the rest becomes float64): the base layer LoRALinear wraps.

        Examples:
            >>> import numpy as np
            >>> from lowrank.numpy import Linear
            >>> base = Linear.frozen(np.eye(2, dtype=np.float32), np.zeros(2))
            >>> base.weight.dtype, base.bias.dtype, base.requires_grad, base.params()
            (dtype('float32'), dtype('float64'), False, {})
        """
        weight = _as_float_array("weight", weight, ndim=2)  # (out, in)
        bias = None if bias is None else _as_float_array("bias", bias, ndim=1)  # (out,)
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {bias.shape}")
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None)
        layer.weight, layer.bias, layer.requires_grad = weight, bias, False
        return layer

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """x (..., in) -> y (..., out). `training` is accepted for a uniform layer interface."""
        _check_last_dim(x, self.in_features)
        self._x = x
        y = x @ self.weight.T  # (..., in) @ (in, out) -> (..., out)
        return y if self.bias is None else y + self.bias

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dL/dy (..., out) -> dL/dx (..., in); sets grad_weight and grad_bias if trainable."""
        if self._x is None:
            raise RuntimeError("backward() called before forward()")
        if self.requires_grad:
            x2 = self._x.reshape(-1, self.in_features)  # (n, in): all leading dims are a batch
            dy2 = dy.reshape(-1, self.out_features)  # (n, out)
            self.grad_weight = dy2.T @ x2  # (out, n) @ (n, in) -> (out, in)
            self.grad_bias = None if self.bias is None else dy2.sum(axis=0)  # (out,)
        return dy @ self.weight  # (..., out) @ (out, in) -> (..., in)

    def params(self) -> dict[str, np.ndarray]:
        """Trainable arrays by name (the live arrays: optimizers update them in place)."""
        if not self.requires_grad:
            return {}
        return {"weight": self.weight} | ({} if self.bias is None else {"bias": self.bias})

    def grads(self) -> dict[str, np.ndarray | None]:
        """Gradients from the last backward, with the keys of `params()`."""
        if not self.requires_grad:
            return {}
        return {"weight": self.grad_weight} | (
            {} if self.bias is None else {"bias": self.grad_bias}
        )


class LoRALinear:
    """A frozen linear layer (W, b) plus a trainable LoRA update scale * B @ A.

    LoRA: Hu et al. 2021, arXiv:2106.09685; `use_rslora`: Kalajdzievski 2023, arXiv:2312.03732.
    Shapes: x (..., in) -> y (..., out), with A (r, in) and B (out, r).

    Args:
        weight: W [out, in], frozen (copied: `merge` changes the layer's copy, not yours).
        bias: b [out] or None, frozen.
        r: the rank, a positive int; above min(in, out) it warns (B @ A cannot have a higher
            rank), as PEFT allows it (see `lowrank._validate.check_rank`).
        alpha: the scale numerator; scale = alpha / r (or alpha / sqrt(r) with use_rslora).
        use_rslora: scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r.
        dropout: probability of zeroing an input element of the LoRA path while training
            (inverted dropout: survivors are divided by 1 - p). The frozen path sees x intact.
        init: how to draw A. "kaiming": uniform(-1/sqrt(in), 1/sqrt(in)), nn.Linear's and
            PEFT's default. "gaussian": normal(0, std=1/r), PEFT's init_lora_weights="gaussian".
            B is always zeros.
        rng: a np.random.Generator used for A's init and the dropout masks; default seeded 0.

    Each `forward` caches what `backward` needs; `backward(dy)` returns dx and sets
    `grad_A` and `grad_B` (overwriting, not accumulating). W and b get no gradient.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import LoRALinear
        >>> rng = np.random.default_rng(0)
        >>> W = rng.normal(size=(8, 16))  # (out, in)
        >>> layer = LoRALinear(W, r=2, alpha=4)
        >>> layer.A.shape, layer.B.shape, layer.scale  # A (r, in), B (out, r), alpha / r
        ((2, 16), (8, 2), 2.0)
        >>> x = rng.normal(size=(5, 16))  # (batch, in)
        >>> bool(np.allclose(layer.forward(x), x @ W.T))  # B = 0: the frozen layer's output
        True
        >>> dx = layer.backward(np.ones((5, 8)))  # dL/dy (batch, out) -> dL/dx (batch, in)
        >>> dx.shape, layer.grad_A.shape, layer.grad_B.shape
        ((5, 16), (2, 16), (8, 2))
        >>> layer.B[...] = rng.normal(size=(8, 2))  # as if trained
        >>> y = layer.forward(x, training=False)
        >>> layer.merge()  # W += scale * B @ A: one matmul from now on
        >>> bool(np.allclose(layer.forward(x), y))
        True
    """

    def __init__(
        self,
        weight: np.ndarray,
        bias: np.ndarray | None = None,
        *,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        rng: np.random.Generator | None = None,
    ) -> None:
        self.base_layer = Linear.frozen(weight, bias)  # copies: merge changes ours, not yours
        out_features, in_features = self.base_layer.weight.shape
        self._start_adapter(in_features, out_features, r, alpha, dropout, use_rslora, init, rng)

    def _start_adapter(self, in_features, out_features, r, alpha, dropout, use_rslora, init, rng):
        """Check the adapter's settings, then make A [r, in] (kaiming or gaussian) and B = 0."""
        check_adapter(
            r=r,
            alpha=alpha,
            dropout=dropout,
            init=init,
            in_features=in_features,
            out_features=out_features,
        )
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a np.random.Generator, got {type(rng).__name__}")

        self.r = int(r)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.rng = np.random.default_rng(0) if rng is None else rng
        dtype = self.base_layer.weight.dtype
        if init == "kaiming":
            self.A = kaiming_uniform_A(self.r, in_features, self.rng, dtype)  # (r, in)
        else:
            self.A = self.rng.normal(0.0, 1.0 / self.r, size=(self.r, in_features)).astype(dtype)
        self.B = np.zeros((out_features, self.r), dtype=dtype)  # (out, r)
        self.merged = False
        self.grad_A: np.ndarray | None = None
        self.grad_B: np.ndarray | None = None
        self._cache: tuple | None = None  # what forward keeps for backward

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (derived, so it always follows alpha).

        Examples:
            >>> import numpy as np
            >>> from lowrank.numpy import LoRALinear
            >>> LoRALinear(np.zeros((4, 4)), r=4, alpha=8).scale
            2.0
            >>> LoRALinear(np.zeros((4, 4)), r=4, alpha=8, use_rslora=True).scale
            4.0
        """
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def weight(self) -> np.ndarray:
        """The frozen base weight W [out, in] (a 4-bit base has none: see `base_weight`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> np.ndarray | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.A.shape[1]  # from A and B, not W: a subclass may store W differently

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    def base_weight(self) -> np.ndarray:
        """The frozen W [out, in] (decoded, for a 4-bit base) in the adapter's dtype."""
        if isinstance(self.base_layer, Linear):
            return self.base_layer.weight
        return self.base_layer.dequantize_weight().astype(self.A.dtype)

    def set_base_weight(self, weight: np.ndarray) -> None:
        """Overwrite the frozen weight with `weight` [out, in] (re-quantizing a 4-bit base)."""
        if isinstance(self.base_layer, Linear):
            self.base_layer.weight[...] = weight
        else:
            self.base_layer.set_weight(weight)

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """x (..., in) -> y (..., out); dropout on the LoRA path only when `training`.

        While merged the layer is a plain linear layer with W + scale * B @ A: no dropout, and
        no backward (unmerge to train again), as in PEFT.
        """
        _check_last_dim(x, self.in_features)
        y = self.base_layer.forward(x)  # (..., in) -> (..., out): x W^T + b
        if self.merged:  # scale * B @ A is already inside W
            self._cache = None
            return y
        mask = None
        x_lora = x
        if training and self.dropout > 0:
            keep = self.rng.random(x.shape) >= self.dropout
            mask = (keep / (1.0 - self.dropout)).astype(self.A.dtype)  # inverted: E[mask] = 1
            x_lora = x * mask
        h = x_lora @ self.A.T  # (..., in) @ (in, r) -> (..., r)
        self._cache = (x_lora, mask, h)
        return y + self.scale * (h @ self.B.T)  # (..., r) @ (r, out) -> (..., out)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dL/dy (..., out) -> dL/dx (..., in); sets grad_A [r, in] and grad_B [out, r].

        With h = dropout(x) A^T and y = ... + scale * h B^T:
            dL/dB = scale * dy^T h              (summed over every leading dim)
            dL/dh = scale * dy B
            dL/dA = (dL/dh)^T dropout(x)
            dL/dx = dy W + (dL/dh A) * mask     (the frozen base's backward, plus LoRA's path)
        """
        if self.merged:
            raise RuntimeError("the adapter is merged into the weight; unmerge() before training")
        if self._cache is None:
            raise RuntimeError("backward() called before forward()")
        x_lora, mask, h = self._cache
        if dy.shape[-1] != self.out_features:
            raise ValueError(f"dy must end in {self.out_features} features, got {dy.shape}")
        dy2 = dy.reshape(-1, self.out_features)  # (n, out): all leading dims are a batch
        self.grad_B = self.scale * (dy2.T @ h.reshape(-1, self.r))  # (out, n) @ (n, r)
        dh = self.scale * (dy @ self.B)  # (..., out) @ (out, r) -> (..., r)
        self.grad_A = dh.reshape(-1, self.r).T @ x_lora.reshape(-1, self.in_features)  # (r, in)
        dx_lora = dh @ self.A  # (..., r) @ (r, in) -> (..., in)
        if mask is not None:
            dx_lora = dx_lora * mask
        return self.base_layer.backward(dy) + dx_lora  # dy W: (..., out) @ (out, in) -> (..., in)

    def delta_weight(self) -> np.ndarray:
        """The update this adapter adds to W: scale * B @ A, [out, in], of rank <= r.

        Examples:
            >>> import numpy as np
            >>> from lowrank.numpy import LoRALinear
            >>> layer = LoRALinear(np.zeros((6, 5)), r=2)
            >>> layer.B[...] = 1.0
            >>> delta = layer.delta_weight()
            >>> delta.shape, int(np.linalg.matrix_rank(delta))
            ((6, 5), 1)
        """
        return self.scale * (self.B @ self.A)  # (out, r) @ (r, in) -> (out, in)

    def merged_weight(self, sign: float = 1.0) -> np.ndarray:
        """W + sign * scale * B @ A [out, in] (sign +1: merge, -1: unmerge)."""
        with np.errstate(over="ignore", invalid="ignore"):  # the caller reports non-finite
            return self.base_weight() + sign * self.delta_weight()

    def merge(self) -> None:
        """Fold scale * B @ A into W, so forward costs one matmul. Checks before it changes W;
        a 4-bit base is re-quantized (lossy: outputs move by the 4-bit rounding)."""
        if self.merged:
            raise RuntimeError("the adapter is already merged; merging twice would add it twice")
        merged = self.merged_weight(+1.0)
        if not np.all(np.isfinite(merged)):
            raise ValueError("merging would produce NaN or inf weights; W left unchanged")
        self.set_base_weight(merged)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract scale * B @ A from W again (exact up to float rounding; not for a 4-bit
        base, where both steps round to 4 bits)."""
        if not self.merged:
            raise RuntimeError("the adapter is not merged; nothing to unmerge")
        self.set_base_weight(self.merged_weight(-1.0))
        self.merged = False

    def params(self) -> dict[str, np.ndarray]:
        """Trainable arrays by name: only A and B (the live arrays, updated in place)."""
        return {"A": self.A, "B": self.B}

    def grads(self) -> dict[str, np.ndarray | None]:
        """Gradients from the last backward, with the keys of `params()`."""
        return {"A": self.grad_A, "B": self.grad_B}


def _check_last_dim(x: np.ndarray, in_features: int) -> None:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a NumPy array, got {type(x).__name__}")
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., {in_features}), got {x.shape}")

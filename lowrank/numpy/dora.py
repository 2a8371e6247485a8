"""DoRA in NumPy: a LoRA layer split into a trained magnitude and a direction, with its backward.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353)
writes the adapted weight as a magnitude times a direction:

    V  = W + scale * B @ A                  [out, in]   (the LoRA-updated weight)
    n  = ||V||_c                            [out]       (the norm of each row of V, over `in`)
    W' = (m / n)[:, None] * V               [out, in]   m [out] trains; A and B train as in LoRA

The paper stores W as [in, out] and calls the norm "column-wise"; in the [out, in] layout of
nn.Linear and PEFT (`torch.linalg.norm(weight, dim=1)`) it is one norm per output feature,
taken over the input dimension. m starts at ||W||_c, so a new adapter (B = 0) leaves the
output unchanged.

Forward follows PEFT's order, which also says what dropout does (it applies to the adapter's
copy of x, on both the direction's W and its B @ A):

    y = x W^T + b + (m / n - 1) * dropout(x) W^T + (m / n) * scale * dropout(x) A^T B^T

Section 4.3 of the paper treats n as a constant in backward (no gradient flows through the
norm), which saves memory and barely changes training; PEFT does the same. That is the default
(`detach_norm=True`) and what `lowrank.torch.dora` computes. `detach_norm=False` back-propagates
through n as well: the exact gradient of the forward, which a finite-difference check can
confirm (tests/numpy/test_dora.py checks both).
"""

import numpy as np

from lowrank._validate import check_bool

from .lora import LoRALinear, _check_last_dim

__all__ = ["DoRALinear", "row_norms"]


def row_norms(V: np.ndarray) -> np.ndarray:
    """||V||_c of DoRA: the L2 norm of each row of V [out, in], over the input dim -> [out].

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy.dora import row_norms
        >>> row_norms(np.array([[3.0, 4.0], [0.0, 2.0]]))
        array([5., 2.])
    """
    return np.sqrt(np.sum(V * V, axis=1))  # (out, in) -> (out,)


class DoRALinear(LoRALinear):
    """A frozen linear layer plus a DoRA adapter: magnitude m [out], direction W + scale * B @ A.

    DoRA: Liu et al. 2024, arXiv:2402.09353. x (..., in) -> y (..., out), with A (r, in),
    B (out, r), magnitude (out,). Takes `LoRALinear`'s arguments, and:

    Args:
        detach_norm: treat n = ||W + scale * B @ A||_c as a constant in backward (the paper's
            section 4.3, and PEFT); False gives the exact gradient through n as well.

    `backward(dy)` returns dx and sets grad_A, grad_B and grad_magnitude. `merge` folds
    (m / n) * (W + scale * B @ A) into W and remembers n, so that `unmerge` divides it out.
    A 4-bit base is not supported here (torch's `DoRALinear` takes one).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy.dora import DoRALinear
        >>> rng = np.random.default_rng(0)
        >>> W = rng.normal(size=(4, 6))  # (out, in)
        >>> layer = DoRALinear(W, r=2, alpha=4)
        >>> layer.magnitude.shape, bool(np.allclose(layer.magnitude, np.linalg.norm(W, axis=1)))
        ((4,), True)
        >>> x = rng.normal(size=(3, 6))  # (batch, in)
        >>> bool(np.allclose(layer.forward(x), x @ W.T))  # B = 0 and m = ||W||_c: unchanged
        True
        >>> layer.B[...] = rng.normal(size=(4, 2))  # as if trained
        >>> y = layer.forward(x)
        >>> dx = layer.backward(np.ones_like(y))
        >>> dx.shape, layer.grad_magnitude.shape
        ((3, 6), (4,))
        >>> layer.merge()  # W <- (m / n) * (W + scale * B @ A)
        >>> bool(np.allclose(layer.forward(x), y))
        True
        >>> layer.unmerge()
        >>> bool(np.allclose(layer.weight, W))
        True
    """

    def __init__(
        self,
        weight: np.ndarray,
        bias: np.ndarray | None = None,
        *,
        detach_norm: bool = True,
        **lora_options: object,
    ) -> None:
        super().__init__(weight, bias, **lora_options)
        self.detach_norm = check_bool("detach_norm", detach_norm)
        self.magnitude = row_norms(self.direction())  # (out,): ||W||_c, since B = 0
        self.grad_magnitude: np.ndarray | None = None
        self._merged_norm: np.ndarray | None = None  # n at merge time, for unmerge

    def direction(self) -> np.ndarray:
        """V = W + scale * B @ A [out, in] (unnormalised; W is the unmerged base weight)."""
        return self.base_weight() + self.delta_weight()

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """x (..., in) -> y (..., out); see the module docstring for the formula. While merged
        the layer is a plain linear layer holding W' (no dropout, no backward)."""
        _check_last_dim(x, self.in_features)
        y = self.base_layer.forward(x)  # (..., in) -> (..., out): x W^T + b
        if self.merged:
            self._cache = None
            return y
        mask = None
        x_lora = x
        if training and self.dropout > 0:
            keep = self.rng.random(x.shape) >= self.dropout
            mask = (keep / (1.0 - self.dropout)).astype(self.A.dtype)  # inverted: E[mask] = 1
            x_lora = x * mask
        V = self.direction()  # (out, in)
        n = row_norms(V)  # (out,)
        c = self.magnitude / n  # (out,): m / n, 1 at initialisation
        h = x_lora @ self.A.T  # (..., in) @ (in, r) -> (..., r)
        P = x_lora @ self.base_weight().T  # (..., in) @ (in, out) -> (..., out)
        Q = self.scale * (h @ self.B.T)  # (..., r) @ (r, out) -> (..., out)
        self._cache = (x_lora, mask, h, V, n, c, P, Q)
        return y + (c - 1.0) * P + c * Q

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dL/dy (..., out) -> dL/dx (..., in); sets grad_A, grad_B and grad_magnitude.

        With c = m / n, P = dropout(x) W^T, h = dropout(x) A^T and Q = scale * h B^T:
            dL/dm  = sum(dy * (P + Q)) / n                      (summed over the batch)
            dL/dB  = scale * (c * dy)^T h,   dL/dh = scale * (c * dy) B,   dL/dA = dL/dh^T x_d
            dL/dx  = dy W + (((c - 1) * dy) W + dL/dh A) * mask
        and, unless detach_norm, also through n = ||V||_c with V = W + scale * B @ A:
            dL/dn  = -sum(dy * (P + Q)) * m / n^2,   dL/dV = (dL/dn / n)[:, None] * V
            dL/dB += scale * dL/dV A^T,   dL/dA += scale * B^T dL/dV
        """
        if self.merged:
            raise RuntimeError("the adapter is merged into the weight; unmerge() before training")
        if self._cache is None:
            raise RuntimeError("backward() called before forward()")
        x_lora, mask, h, V, n, c, P, Q = self._cache
        if dy.shape[-1] != self.out_features:
            raise ValueError(f"dy must end in {self.out_features} features, got {dy.shape}")
        dy2 = dy.reshape(-1, self.out_features)  # (N, out): all leading dims are a batch
        grad_c = np.sum(dy2 * (P + Q).reshape(-1, self.out_features), axis=0)  # (out,)
        self.grad_magnitude = grad_c / n
        dy_c = c * dy  # (..., out): dL/dQ
        self.grad_B = self.scale * (dy_c.reshape(-1, self.out_features).T @ h.reshape(-1, self.r))
        dh = self.scale * (dy_c @ self.B)  # (..., out) @ (out, r) -> (..., r)
        self.grad_A = dh.reshape(-1, self.r).T @ x_lora.reshape(-1, self.in_features)  # (r, in)
        dx_lora = ((c - 1.0) * dy) @ self.base_weight() + dh @ self.A  # (..., in)
        if mask is not None:
            dx_lora = dx_lora * mask
        if not self.detach_norm:
            grad_n = -grad_c * self.magnitude / n**2  # (out,)
            grad_V = (grad_n / n)[:, None] * V  # (out, in)
            self.grad_B = self.grad_B + self.scale * (grad_V @ self.A.T)  # (out, in) @ (in, r)
            self.grad_A = self.grad_A + self.scale * (self.B.T @ grad_V)  # (r, out) @ (out, in)
        return self.base_layer.backward(dy) + dx_lora  # dy W: (..., out) @ (out, in)

    def merged_weight(self, sign: float = 1.0) -> np.ndarray:
        """(m / n) * (W + scale * B @ A) for sign +1; W' / (m / n) - scale * B @ A for -1,
        with n remembered from the merge [out, in]."""
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if sign > 0:
                c = self.magnitude / row_norms(self.direction())
                return c[:, None] * self.direction()
            c = self.magnitude / self._merged_norm
            return self.base_weight() / c[:, None] - self.delta_weight()

    def merge(self) -> None:
        """Fold (m / n) * (W + scale * B @ A) into W; forward is then one matmul."""
        norm = row_norms(self.direction())  # n of the unmerged W (merge raises if merged)
        super().merge()
        self._merged_norm = norm

    def unmerge(self) -> None:
        """Take the DoRA weight out of W again (exact up to float rounding)."""
        super().unmerge()
        self._merged_norm = None

    def params(self) -> dict[str, np.ndarray]:
        """Trainable arrays by name: A, B and the magnitude (the live arrays)."""
        return {"A": self.A, "B": self.B, "magnitude": self.magnitude}

    def grads(self) -> dict[str, np.ndarray | None]:
        """Gradients from the last backward, with the keys of `params()`."""
        return {"A": self.grad_A, "B": self.grad_B, "magnitude": self.grad_magnitude}

"""DoRA in PyTorch: a LoRA layer whose weight is a trained magnitude times a direction.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353)
adapts W [out, in] as

    W' = (m / ||W + scale * B @ A||_c)[:, None] * (W + scale * B @ A)      m [out] trains

where ||.||_c is the norm of each row of the [out, in] matrix, taken over the input dimension
(the paper stores W as [in, out] and says "column-wise"; PEFT computes
`torch.linalg.norm(weight, dim=1)`). m starts at ||W||_c, so with B = 0 nothing changes.
Forward is PEFT's (`peft.tuners.lora.dora.DoraLinearLayer`), so outputs agree with PEFT's:

    y = base(x) + (m / n - 1) * (base(x) - b) + (m / n) * scale * dropout(x) A^T B^T

(with dropout active, PEFT uses dropout(x) W^T in place of base(x) - b). The norm n is detached
from the graph, as the paper's section 4.3 suggests and PEFT does: no gradient flows through it.
The maths with a hand-written backward, both with and without that detach, is
`lowrank.numpy.dora`.

`DoRALinear` subclasses `lora.LoRALinear` (nn.Linear or a 4-bit `Linear4bit` base, as PEFT
allows); each adapter's magnitude is `magnitude[name]`, saved by PEFT as
`<path>.lora_magnitude_vector` [out]. `lowrank.torch.model.add_lora(..., use_dora=True)` puts
it on a model; `peft_format` / `peft_load` read and write it.
"""

import torch
from torch import nn

from lowrank.torch.lora import LoRALinear

__all__ = ["DoRALinear", "row_norms"]


def row_norms(V: torch.Tensor) -> torch.Tensor:
    """||V||_c of DoRA: the L2 norm of each row of V [out, in], over the input dim -> [out].

    Examples:
        >>> import torch
        >>> from lowrank.torch.dora import row_norms
        >>> row_norms(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
        tensor([5., 2.])
    """
    return torch.linalg.norm(V, dim=1)  # (out, in) -> (out,)


class DoRALinear(LoRALinear):
    """LoRA on an nn.Linear or `Linear4bit` with DoRA's magnitude: W' = m * V / ||V||_c.

    DoRA: Liu et al. 2024, arXiv:2402.09353. x (..., in) -> (..., out). Each adapter has A
    [r, in], B [out, r] and `magnitude[name]` [out] (all three train); V = W + scale * B @ A.
    `merge` folds W' into the base weight and keeps the norm it used, so `unmerge` can divide
    it out again (as PEFT does). `delta_weight` stays LoRA's scale * B @ A (what the factors
    hold); `merged_weight(+1.0)` is the DoRA weight W'.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.dora import DoRALinear
        >>> _ = torch.manual_seed(0)
        >>> layer = DoRALinear(nn.Linear(8, 4))
        >>> layer.add_adapter("default", r=2, alpha=4)
        >>> layer.active_adapter = "default"
        >>> layer.magnitude["default"].shape  # one magnitude per output feature
        torch.Size([4])
        >>> x = torch.randn(3, 8)  # (batch, in)
        >>> torch.allclose(layer(x), layer.base_layer(x), atol=1e-6)  # m = ||W||_c, B = 0
        True
        >>> _ = nn.init.normal_(layer.B["default"])  # as if trained
        >>> y = layer(x)
        >>> layer.merge()  # W <- m * V / ||V||_c
        >>> torch.allclose(layer(x), y, atol=1e-5)
        True
        >>> layer.unmerge()
        >>> layer.merged
        False
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.magnitude = nn.ParameterDict()
        # ||V||_c at merge time, for unmerge; a buffer so that .to(device) moves it along
        self.register_buffer("merged_norm", None, persistent=False)

    def add_adapter(self, name: str, **options: object) -> None:
        """Add adapter `name` (LoRA's options) with magnitude ||W + scale * B @ A||_c."""
        super().add_adapter(name, **options)
        with torch.no_grad():
            norm = self.direction_norm(name)  # (out,): ||W||_c as long as B = 0
        self.magnitude[name] = nn.Parameter(norm.to(self.A[name].dtype))

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` and its magnitude (RuntimeError if it is merged)."""
        super().delete_adapter(name)
        del self.magnitude[name]

    def direction_norm(self, name: str, W: torch.Tensor | None = None) -> torch.Tensor:
        """||W + scale * B @ A||_c [out], detached (section 4.3), W the unmerged base weight."""
        W = self.base_weight() if W is None else W
        A = self.A[name]
        delta = self.delta_weight(name).detach()  # (out, r) @ (r, in) -> (out, in)
        return row_norms(W.to(A.dtype) + delta).detach()

    def merged_weight(self, sign: float = 1.0) -> torch.Tensor:
        """W' = (m / n) * (W + scale * B @ A) for sign +1 (the active adapter); for -1 the
        merged adapter's W' / (m / n) - scale * B @ A with the n kept at merge time."""
        W = self.base_weight()
        with torch.no_grad():
            if sign > 0:
                name = self.active_adapter
                V = W.to(self.A[name].dtype) + self.delta_weight(name)  # (out, in)
                factor = self.magnitude[name] / row_norms(V)  # (out,)
                return (factor[:, None] * V).to(W.dtype)
            name = self.merged_adapter
            factor = self.magnitude[name] / self.merged_norm  # (out,)
            return (W.to(factor.dtype) / factor[:, None] - self.delta_weight(name)).to(W.dtype)

    def merge(self) -> None:
        """Fold W' into the base weight (see `LoRALayer.merge`); keeps n for `unmerge`."""
        norm = self.direction_norm(self.active_adapter) if self.active_adapter in self.A else None
        super().merge()
        self.merged_norm = norm

    def unmerge(self) -> None:
        """Restore W from W' (exact up to the base dtype's rounding)."""
        super().unmerge()
        self.merged_norm = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA forward for the active adapter: (..., in) -> (..., out)."""
        y = self.base_layer(x)
        name = self.active_adapter
        if self.disabled or self.merged or name not in self.A:
            return y
        A, B, dropout = self.A[name], self.B[name], self.dropout[name]
        W = self.base_weight().to(A.dtype)  # (out, in)
        factor = (self.magnitude[name] / self.direction_norm(name, W)).view(1, -1)  # (1, out)
        x = x.to(A.dtype)
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base_result = y.to(A.dtype) if bias is None else y.to(A.dtype) - bias.to(A.dtype)
        else:
            x = dropout(x)
            base_result = x @ W.T  # (..., in) @ (in, out) -> (..., out)
        lora_result = (x @ A.T) @ B.T  # (..., in) @ (in, r) @ (r, out) -> (..., out)
        update = (factor - 1) * base_result + factor * lora_result * self.scale[name]
        return (y + update).to(y.dtype)

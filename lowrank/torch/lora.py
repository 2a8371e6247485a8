"""LoRA in PyTorch: wrappers that add trainable low-rank updates to frozen layers of any model.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
freezes a pre-trained weight W [out, in] and learns its change as B [out, r] @ A [r, in]:

    y = base(x) + scale * dropout(x) A^T B^T        scale = alpha / r

rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) uses scale = alpha / sqrt(r) instead
(`use_rslora=True`). The maths, and a hand-written backward pass to check it against, is in
`lowrank.numpy.lora`; here autograd does the backward and the same names mean the same things
(`A`, `B`, `r`, `alpha`, `scale`, `merged`, `delta_weight`, `merge`, `unmerge`).

One wrapper class per way a layer stores its weight, all sharing `LoRALayer`:
- `LoRALinear`: nn.Linear keeps W as [out, in]; also wraps the 4-bit `qlora.Linear4bit`
  (QLoRA, Dettmers et al. 2023, arXiv:2305.14314), whose frozen W lives in 4 bits.
- `LoRAConv1D`: GPT-2's transformers Conv1D keeps W as [in, out] (y = x W + b), so the update
  B @ A is transposed before it is merged (PEFT's `fan_in_fan_out=True`).
- `LoRAEmbedding`: nn.Embedding is one_hot(ids) @ W with W [num_embeddings, dim], i.e. a linear
  layer with in = num_embeddings, also stored [in, out]. A is [r, num_embeddings] and B is
  [dim, r] (PEFT's lora_embedding_A / lora_embedding_B); looking up rows of A^T replaces the
  one-hot matmul.

A wrapper holds several named adapters (`A` and `B` are nn.ParameterDicts keyed by name); one
of them is active. Per-adapter attributes (`r`, `alpha`, `use_rslora`, `scale`) are dicts keyed
by adapter name where `lowrank.numpy.lora.LoRALinear`, which holds one adapter, has the value
itself; methods that act on one adapter take its name and default to the active one.

This file is one layer. LoRA on a whole model (`add_lora`, `merge_lora`, ...) is in
`lowrank.torch.model`; several adapters in `adapters.py`; the PEFT file format in
`peft_format.py`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowrank._validate import check_adapter, check_adapter_name
from lowrank.torch.qlora import Linear4bit

__all__ = ["LoRALayer", "LoRALinear", "LoRAConv1D", "LoRAEmbedding"]


class LoRALayer(nn.Module):
    """A frozen `base_layer` plus named LoRA adapters; the subclasses say how x meets A.

    LoRA (Hu et al. 2021, arXiv:2106.09685): forward maps x (..., in) to
    base(x) + scale * dropout(x) A^T B^T, (..., in) @ (in, r) @ (r, out) -> (..., out), with
    the active adapter's A [r, in] and B [out, r]. Per-adapter attributes are dicts keyed by
    adapter name.

    Adapter parameters are float32 on a bfloat16/float16 base (as PEFT keeps them: small,
    and trained in full precision), float64 on a float64 base; the output keeps the dtype of
    the base layer's output. Cast the model (`model.to(torch.bfloat16)`) before adding
    adapters: `.to(dtype)` afterwards casts the adapters too.

    Attributes:
        A: nn.ParameterDict of each adapter's A, [r, in].
        B: nn.ParameterDict of each adapter's B, [out, r].
        r: each adapter's rank.
        alpha: each adapter's alpha.
        use_rslora: whether each adapter scales by alpha / sqrt(r) (rsLoRA, Kalajdzievski
            2023, arXiv:2312.03732) instead of alpha / r.
        scale: `scale[name]` = alpha / r or alpha / sqrt(r) (derived, so it always follows
            alpha).
        dropout: nn.ModuleDict of each adapter's input dropout (nn.Identity when p = 0).
        active_adapter: the adapter forward adds (None: none).
        disabled: True while no adapter adds anything (`adapters.disable_adapters`).
        merged_adapter: the adapter folded into the base weight, or None (`merged`).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.lora import LoRALinear
        >>> _ = torch.manual_seed(0)
        >>> layer = LoRALinear(nn.Linear(8, 4))
        >>> layer.add_adapter("default", r=2, alpha=4)
        >>> layer.active_adapter = "default"
        >>> layer.A["default"].shape, layer.B["default"].shape  # (r, in), (out, r)
        (torch.Size([2, 8]), torch.Size([4, 2]))
        >>> layer.scale  # alpha / r
        {'default': 2.0}
        >>> x = torch.randn(3, 8)  # (batch, in)
        >>> torch.equal(layer(x), layer.base_layer(x))  # B starts at 0: nothing changes yet
        True
    """

    weight_is_in_out = False  # True where the base stores W as [in, out] (Conv1D, Embedding)

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self.dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self.disabled = False
        self.train(base_layer.training)  # a wrapper takes the mode of what it wraps

    @property
    def merged(self) -> bool:
        """Whether an adapter is folded into the base weight (`merge`)."""
        return self.merged_adapter is not None

    @property
    def scale(self) -> dict[str, float]:
        """Each adapter's scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return {
            name: self.alpha[name] / (math.sqrt(r) if self.use_rslora[name] else r)
            for name, r in self.r.items()
        }

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) of a base layer this wrapper takes."""
        return base_layer.in_features, base_layer.out_features

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as [out, in] (a view where possible; dequantized for 4 bits)."""
        if isinstance(self.base_layer, Linear4bit):
            return self.base_layer.dequantize_weight()
        weight = self.base_layer.weight
        return weight.T if self.weight_is_in_out else weight

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Overwrite the frozen weight with `weight` [out, in] (re-quantizing a 4-bit base)."""
        if isinstance(self.base_layer, Linear4bit):
            self.base_layer.set_weight(weight)
            return
        with torch.no_grad():
            target = self.base_layer.weight
            target.copy_(weight.T if self.weight_is_in_out else weight)

    def _device(self) -> torch.device:
        tensor = next(iter(self.base_layer.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.base_layer.buffers()))
        return tensor.device

    def _adapter_dtype(self) -> torch.dtype:
        if isinstance(self.base_layer, Linear4bit):
            return torch.float32
        return torch.promote_types(self.base_layer.weight.dtype, torch.float32)

    def add_adapter(
        self,
        name: str,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ) -> None:
        """Add adapter `name` with B = 0, so the layer's output does not change."""
        check_adapter_name(name)
        check_adapter(
            r=r,
            alpha=alpha,
            dropout=dropout,
            init=init,
            in_features=self.in_features,
            out_features=self.out_features,
        )
        if name in self.A:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        shape_A, shape_B = (r, self.in_features), (self.out_features, r)
        options = {"dtype": self._adapter_dtype(), "device": self._device()}
        A, B = torch.empty(shape_A, **options), torch.empty(shape_B, **options)
        self.init_factors(A, B, init)
        self.A[name] = nn.Parameter(A)  # (r, in)
        self.B[name] = nn.Parameter(B)  # (out, r)
        self.dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout[name].train(self.training)  # in eval mode, a new adapter's dropout is off
        self.r[name], self.alpha[name], self.use_rslora[name] = r, float(alpha), use_rslora

    @staticmethod
    def init_factors(A: torch.Tensor, B: torch.Tensor, init: str) -> None:
        """A like nn.Linear's weight (kaiming-uniform, a=sqrt(5): uniform(+-1/sqrt(in))) or
        normal(0, 1/r) for "gaussian"; B zeros."""
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            else:
                nn.init.normal_(A, std=1.0 / A.shape[0])
            nn.init.zeros_(B)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (RuntimeError if it is merged); none is active if it was."""
        if name == self.merged_adapter:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge before deleting it")
        for table in (self.A, self.B, self.dropout):
            del table[name]
        for table in (self.r, self.alpha, self.use_rslora):
            del table[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """The update adapter `name` (default: the active one) adds to W: scale * B @ A,
        [out, in], of rank <= r."""
        name = self.active_adapter if name is None else name
        return self.scale[name] * (self.B[name] @ self.A[name])  # (out, r) @ (r, in)

    def merged_weight(self, sign: float = 1.0) -> torch.Tensor:
        """W +- scale * B @ A for the active (sign +1) or merged (sign -1) adapter, [out, in]."""
        name = self.active_adapter if sign > 0 else self.merged_adapter
        W = self.base_weight()
        with torch.no_grad():
            return W + (sign * self.delta_weight(name)).to(W.dtype)

    def merge(self) -> None:
        """Fold the active adapter into the base weight: forward then costs just base(x).

        Checks before it changes W: a non-finite result raises ValueError, W unchanged."""
        if self.merged:
            raise RuntimeError("the adapter is already merged; merging twice would add it twice")
        if self.active_adapter not in self.A:
            raise RuntimeError("this layer has no active adapter to merge")
        new_weight = self.merged_weight(+1.0)
        if not torch.isfinite(new_weight).all():
            raise ValueError("merging would produce NaN or inf weights; W left unchanged")
        self.set_base_weight(new_weight)
        self.merged_adapter = self.active_adapter

    def unmerge(self) -> None:
        """Subtract the merged adapter's update again (exact up to the base dtype's rounding)."""
        if not self.merged:
            raise RuntimeError("the adapter is not merged; nothing to unmerge")
        self.set_base_weight(self.merged_weight(-1.0))
        self.merged_adapter = None

    def project_down(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """h = dropout(x) A^T: (..., in) @ (in, r) -> (..., r)."""
        A = self.A[name]
        return self.dropout[name](x.to(A.dtype)) @ A.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + scale * dropout(x) A^T B^T for the active adapter: (..., in) -> (..., out)."""
        y = self.base_layer(x)
        name = self.active_adapter
        if self.disabled or self.merged or name not in self.A:
            return y  # a merged layer is just its base: no extra matmul
        update = (self.project_down(x, name) @ self.B[name].T) * self.scale[name]  # (..., out)
        return (y + update).to(y.dtype)  # PEFT's order of operations: identical outputs

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{name}: r={r}" for name, r in self.r.items())
        return f"adapters={{{ranks}}}, active={self.active_adapter!r}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """LoRA on an nn.Linear (W [out, in]) or on a 4-bit `Linear4bit` (QLoRA).

    x (..., in) -> (..., out). On a `Linear4bit` base (QLoRA, Dettmers et al. 2023,
    arXiv:2305.14314) the frozen W stays in 4 bits and A, B are float32.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.lora import LoRALinear
        >>> _ = torch.manual_seed(0)
        >>> layer = LoRALinear(nn.Linear(8, 4))
        >>> layer.add_adapter("default", r=2, alpha=2)
        >>> layer.active_adapter = "default"
        >>> _ = nn.init.normal_(layer.B["default"])  # as if trained
        >>> x = torch.randn(3, 8)
        >>> y = layer(x)  # (batch, in) -> (batch, out)
        >>> y.shape, layer.delta_weight().shape  # scale * B @ A is [out, in]
        (torch.Size([3, 4]), torch.Size([4, 8]))
        >>> int(torch.linalg.matrix_rank(layer.delta_weight()))  # at most r
        2
        >>> layer.merge()  # W <- W + scale * B @ A: forward is then one matmul
        >>> layer.merged, torch.allclose(layer(x), y, atol=1e-6)
        (True, True)
        >>> layer.unmerge()
        >>> layer.merged
        False
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, *self.features(base_layer))


class LoRAConv1D(LoRALayer):
    """LoRA on GPT-2's transformers Conv1D: y = x W + b with W stored [in, out] (nx, nf).

    The LoRA path is the same as for nn.Linear (A [r, in], B [out, r]); only merging has to
    transpose: W_in_out += (scale * B @ A)^T. PEFT calls this `fan_in_fan_out=True`.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from transformers.pytorch_utils import Conv1D
        >>> from lowrank.torch.lora import LoRAConv1D
        >>> _ = torch.manual_seed(0)
        >>> layer = LoRAConv1D(Conv1D(4, 8))  # Conv1D(nf=out, nx=in)
        >>> layer.base_layer.weight.shape  # stored [in, out]
        torch.Size([8, 4])
        >>> layer.add_adapter("default", r=2, alpha=2)
        >>> layer.active_adapter = "default"
        >>> layer.A["default"].shape, layer.B["default"].shape  # (r, in), (out, r) as for Linear
        (torch.Size([2, 8]), torch.Size([4, 2]))
        >>> _ = nn.init.normal_(layer.B["default"])
        >>> x = torch.randn(3, 8)
        >>> y = layer(x)
        >>> layer.merge()  # the update is transposed into W [in, out]
        >>> torch.allclose(layer(x), y, atol=1e-6)
        True
    """

    weight_is_in_out = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, *self.features(base_layer))

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        in_features, out_features = base_layer.weight.shape  # W is stored [in, out]
        return in_features, out_features


class LoRAEmbedding(LoRALayer):
    """LoRA on nn.Embedding: y = W[ids] + scale * (A^T)[ids] B^T, W [num_embeddings, dim].

    An embedding is one_hot(ids) @ W, a linear layer with in = num_embeddings whose weight is
    stored [in, out]. So A is [r, num_embeddings], B is [dim, r] and (A^T)[ids] is
    one_hot(ids) @ A^T without building the one-hot matrix (PEFT's lora_embedding_A/B).
    Initialisation follows loralib and PEFT for embeddings: A = 0 and B ~ normal(0, 1), which
    also leaves the output unchanged (A = 0 plays the role that B = 0 plays elsewhere; the
    `init` choice does not apply). Dropout does not apply either: ids cannot be dropped out.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.lora import LoRAEmbedding
        >>> _ = torch.manual_seed(0)
        >>> layer = LoRAEmbedding(nn.Embedding(10, 4))  # 10 ids, dim 4
        >>> layer.add_adapter("default", r=2, alpha=2)
        >>> layer.active_adapter = "default"
        >>> layer.A["default"].shape, layer.B["default"].shape  # (r, num_embeddings), (dim, r)
        (torch.Size([2, 10]), torch.Size([4, 2]))
        >>> ids = torch.tensor([[1, 2, 3]])  # (batch, tokens)
        >>> layer(ids).shape  # (batch, tokens, dim)
        torch.Size([1, 3, 4])
        >>> torch.equal(layer(ids), layer.base_layer(ids))  # A starts at 0
        True
    """

    weight_is_in_out = True

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer, *self.features(base_layer))

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.num_embeddings, base_layer.embedding_dim

    @staticmethod
    def init_factors(A: torch.Tensor, B: torch.Tensor, init: str) -> None:
        with torch.no_grad():
            nn.init.zeros_(A)
            nn.init.normal_(B)

    def project_down(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """h = rows `x` of A^T: ids (...) -> (..., r)."""
        return F.embedding(x, self.A[name].T, padding_idx=self.base_layer.padding_idx)

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
of them is active. `add_lora` puts wrappers on a model, `merge_lora` / `unmerge_lora` fold the
active adapter into the frozen weights and back, `count_parameters` counts honestly.
Several-adapter tools and the PEFT file format are in `lowrank.torch.adapters`.
"""

import copy
import math
import numbers
import re
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.numpy.lora import INITS, validate_rank
from lowrank.torch.qlora import Linear4bit

QUANT_TYPES = ("nf4", "fp4")


class LoRALayer(nn.Module):
    """A frozen `base_layer` plus named LoRA adapters; the subclasses say how x meets A.

    Attributes (dicts keyed by adapter name):
        A: nn.ParameterDict of [r, in]; B: nn.ParameterDict of [out, r].
        r, alpha, use_rslora: each adapter's hyperparameters; `scale(name)` = alpha / r or
            alpha / sqrt(r).
        dropout: nn.ModuleDict of each adapter's input dropout (nn.Identity when p = 0).
        active_adapter: the adapter forward adds (None: none); `disabled`: add none for now.
        merged_adapter: the adapter folded into the base weight, or None (`merged`).

    Adapter parameters are float32 on a bfloat16/float16 base (as PEFT keeps them: small,
    and trained in full precision), float64 on a float64 base; the output keeps the dtype of
    the base layer's output. Cast the model (`model.to(torch.bfloat16)`) before adding
    adapters: `.to(dtype)` afterwards casts the adapters too.
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

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    def scale(self, name: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r = self.r[name]
        return self.alpha[name] / (math.sqrt(r) if self.use_rslora[name] else r)

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
        check_adapter_args(name, r, alpha, dropout, init, self.in_features, self.out_features)
        if name in self.A:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        shape_A, shape_B = (r, self.in_features), (self.out_features, r)
        options = {"dtype": self._adapter_dtype(), "device": self._device()}
        A, B = torch.empty(shape_A, **options), torch.empty(shape_B, **options)
        self.init_factors(A, B, init)
        self.A[name] = nn.Parameter(A)  # (r, in)
        self.B[name] = nn.Parameter(B)  # (out, r)
        self.dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
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
        if name == self.merged_adapter:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge before deleting it")
        for table in (self.A, self.B, self.dropout):
            del table[name]
        for table in (self.r, self.alpha, self.use_rslora):
            del table[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def delta_weight(self, name: str) -> torch.Tensor:
        """The update adapter `name` adds to W: scale * B @ A, [out, in], of rank <= r."""
        return self.scale(name) * (self.B[name] @ self.A[name])  # (out, r) @ (r, in)

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
        y = self.base_layer(x)
        name = self.active_adapter
        if self.disabled or self.merged or name not in self.A:
            return y  # a merged layer is just its base: no extra matmul
        update = (self.project_down(x, name) @ self.B[name].T) * self.scale(name)  # (..., out)
        return (y + update).to(y.dtype)  # PEFT's order of operations: identical outputs

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{name}: r={r}" for name, r in self.r.items())
        return f"adapters={{{ranks}}}, active={self.active_adapter!r}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """LoRA on an nn.Linear (W [out, in]) or on a 4-bit `Linear4bit` (QLoRA)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, base_layer.in_features, base_layer.out_features)


class LoRAConv1D(LoRALayer):
    """LoRA on GPT-2's transformers Conv1D: y = x W + b with W stored [in, out] (nx, nf).

    The LoRA path is the same as for nn.Linear (A [r, in], B [out, r]); only merging has to
    transpose: W_in_out += (scale * B @ A)^T. PEFT calls this `fan_in_fan_out=True`.
    """

    weight_is_in_out = True

    def __init__(self, base_layer: nn.Module) -> None:
        in_features, out_features = base_layer.weight.shape
        super().__init__(base_layer, in_features, out_features)


class LoRAEmbedding(LoRALayer):
    """LoRA on nn.Embedding: y = W[ids] + scale * (A^T)[ids] B^T, W [num_embeddings, dim].

    An embedding is one_hot(ids) @ W, a linear layer with in = num_embeddings whose weight is
    stored [in, out]. So A is [r, num_embeddings], B is [dim, r] and (A^T)[ids] is
    one_hot(ids) @ A^T without building the one-hot matrix (PEFT's lora_embedding_A/B).
    Initialisation follows loralib and PEFT for embeddings: A = 0 and B ~ normal(0, 1), which
    also leaves the output unchanged (A = 0 plays the role that B = 0 plays elsewhere; the
    `init` choice does not apply). Dropout does not apply either: ids cannot be dropped out.
    """

    weight_is_in_out = True

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer, base_layer.num_embeddings, base_layer.embedding_dim)

    @staticmethod
    def init_factors(A: torch.Tensor, B: torch.Tensor, init: str) -> None:
        with torch.no_grad():
            nn.init.zeros_(A)
            nn.init.normal_(B)

    def project_down(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """h = rows `x` of A^T: ids (...) -> (..., r)."""
        return F.embedding(x, self.A[name].T, padding_idx=self.base_layer.padding_idx)


def check_adapter_args(
    name: str, r: int, alpha: float, dropout: float, init: str, in_features: int, out_features: int
) -> None:
    """Raise ValueError/TypeError naming the first bad adapter argument."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty str without '.', got {name!r}")
    validate_rank(r, in_features, out_features)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers.pytorch_utils.Conv1D, recognised without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _is_wrappable(module: nn.Module) -> bool:
    return isinstance(module, (LoRALayer, Linear4bit, nn.Linear, nn.Embedding)) or is_conv1d(module)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """(qualified name, wrapper) for every LoRA wrapper in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def candidate_names(model: nn.Module) -> list[str]:
    """Qualified names of the layers `add_lora` can wrap (or has wrapped), in model order."""
    names, inside = [], None
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue  # a wrapper's own base_layer and dropout, or a Linear4bit's parts
        if name and _is_wrappable(module):
            names.append(name)
            inside = name + "."
    return names


def match_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """The candidate layers `targets` selects: a str is a regex that must match the whole
    qualified name (re.fullmatch, as in PEFT); a list holds exact names or dotted suffixes
    ("q_proj" selects "model.layers.0.self_attn.q_proj"). Every pattern must select a layer."""
    candidates = candidate_names(model)
    if isinstance(targets, str):
        patterns = [targets]
        selected = [[n for n in candidates if re.fullmatch(targets, n)]]
    elif (
        isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets)
    ):
        patterns = list(targets)
        selected = [[n for n in candidates if n == t or n.endswith("." + t)] for t in patterns]
    else:
        raise TypeError(
            f"targets must be a str (regex) or a non-empty list of str, got {targets!r}"
        )
    for pattern, names in zip(patterns, selected, strict=True):
        if not names:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            example = f" (e.g. {candidates[0]!r})" if candidates else ""
            raise ValueError(
                f"target {pattern!r} matches no Linear/Conv1D/Embedding layer; candidate "
                f"module names: {', '.join(leaves) or 'none'}{example}"
            )
    chosen = {n for names in selected for n in names}
    return [n for n in candidates if n in chosen]


def pattern_value(patterns: dict[str, float], name: str, default: float) -> float:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that matches the end of
    `name` at a dot boundary (re.match(rf"(.*\\.)?({key})$", name)) gives the value."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


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


def _wrap(module: nn.Module) -> LoRALayer:
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding(module)
    if is_conv1d(module):
        return LoRAConv1D(module)
    return LoRALinear(module)


def active_adapter(model: nn.Module) -> str | None:
    """The model's active adapter name (None if it has no LoRA layers or none is active)."""
    return next((layer.active_adapter for _, layer in lora_layers(model)), None)


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze every parameter except the active adapter's A and B in each LoRA layer."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for _, layer in lora_layers(model):
        if layer.active_adapter in layer.A:
            layer.A[layer.active_adapter].requires_grad_(True)
            layer.B[layer.active_adapter].requires_grad_(True)


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
) -> nn.Module:
    """Add LoRA adapter `adapter_name` to every layer of `model` that `targets` selects.

    targets: a list of exact qualified names or dotted suffixes (["q_proj", "v_proj"]), or a
        str regex matched against the whole name. Linear, GPT-2 Conv1D and Embedding layers
        (and 4-bit Linear4bit) can be selected; a pattern that selects none raises ValueError
        listing the candidate names.
    r, alpha, dropout, use_rslora, init: the adapter (see `LoRALayer`); rank_pattern and
        alpha_pattern override r and alpha per layer, keyed by name suffix or regex as in PEFT.
    quant_type: "nf4" or "fp4" replaces each selected Linear/Conv1D by a frozen 4-bit
        `Linear4bit` (blocksize 64, double quantization): QLoRA.

    Layers are wrapped in place (a layer wrapped before gets a second adapter). Afterwards
    only the active adapter's A and B require grad; everything else is frozen. The first
    adapter put on a model becomes active; later ones wait for `set_active_adapter`.
    Works on the meta device: A and B are created where the base weights live.
    """
    if quant_type is not None and quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be None or one of {QUANT_TYPES}, got {quant_type!r}")
    names = match_targets(model, targets)
    plans = []  # validate every layer before changing any
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALayer):
            in_features, out_features = module.in_features, module.out_features
            if adapter_name in module.A:
                raise ValueError(f"layer {name!r} already has an adapter named {adapter_name!r}")
            # a second adapter keeps the base as it is: fine if it is 4-bit or an embedding
            base_fits = isinstance(module, LoRAEmbedding) or isinstance(
                module.base_layer, Linear4bit
            )
            if quant_type is not None and not base_fits:
                raise ValueError(f"layer {name!r} is wrapped in full precision; cannot quantize")
        elif isinstance(module, nn.Embedding):
            in_features, out_features = module.num_embeddings, module.embedding_dim
        elif is_conv1d(module):
            in_features, out_features = module.weight.shape
        else:
            in_features, out_features = module.in_features, module.out_features
        r_here = pattern_value(rank_pattern or {}, name, r)
        alpha_here = pattern_value(alpha_pattern or {}, name, alpha)
        try:
            check_adapter_args(
                adapter_name, r_here, alpha_here, dropout, init, in_features, out_features
            )
        except ValueError as error:
            raise ValueError(f"layer {name!r}: {error}") from None
        plans.append((name, module, r_here, alpha_here))

    wrappers = {  # built (and quantized) before the model changes: a failure changes nothing
        name: _wrap(module if quant_type is None else _quantized(module, quant_type))
        for name, module, *_ in plans
        if not isinstance(module, LoRALayer)
    }
    active = active_adapter(model)
    for name, module, r_here, alpha_here in plans:
        if name in wrappers:
            module = wrappers[name]
            module.active_adapter = active
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module)
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
    base dtype; a 4-bit base is re-quantized once more). Raises RuntimeError if not merged."""
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
    bits). Full-precision bases keep their class and dtype. `model` itself is not changed.
    """
    _layers_or_raise(model)
    result = copy.deepcopy(model)
    for name, layer in list(lora_layers(result)):
        base = layer.base_layer
        if isinstance(base, Linear4bit):
            weight = layer.base_weight().float()  # (out, in)
            if layer.active_adapter in layer.A and not layer.merged and not layer.disabled:
                weight = weight + layer.delta_weight(layer.active_adapter).detach().float()
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
        parent_name, _, child = name.rpartition(".")
        setattr(result.get_submodule(parent_name), child, base)
    return result


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters, each shared tensor counted once.

    A 4-bit weight counts as the out * in numbers it represents, not as its packed bytes
    (counting uint8 storage halves the apparent size, a common confusion); its quantization
    constants (absmax etc.) are storage, not parameters, and are not counted.
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

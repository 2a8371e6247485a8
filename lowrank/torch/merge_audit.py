"""The merge audit: how to deploy an adapter trained on a 4-bit base (QLoRA), measured.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) trains LoRA factors (Hu et al. 2021,
arXiv:2106.09685) against deq(Q(W)), the 4-bit base, not against the original weights W. So
merging the update s B A into W is not what was trained, and for many layers the quantization
error ||W - deq(Q(W))||_F is larger than the update ||s B A||_F itself (unsloth-zoo #810
measured 10-150x; transformers #31293, PEFT #2321 and #1384 are reports of the consequences).
`merge_audit` measures both per layer (the update's norm from its factors: `factored_core`) and
compares the model's outputs under the four ways to deploy it, each built from a fresh copy:

    (a) the adapter on the 4-bit base         deq(Q(W)) x + s B A x    what was trained
    (b) merged into the original weights      W + s B A                  stored in `dtype`
    (c) merged into the dequantized base      deq(Q(W)) + s B A          stored in `dtype`
    (d) merged and re-quantized               Q(deq(Q(W)) + s B A)       4 bits again

For (b), (c) and (d) against (a) on the same inputs: the mean KL divergence KL(p_a || p_x) of
the softmax over the logits' last dim, the largest |logit difference|, how often the argmax
agrees with (a)'s, and the accuracy where labels are given. The merged weights are rounded to
`dtype` (what storing them in it keeps); the rest of the model and the compute stay in the
model's own dtype, as in (a), so the differences are the weights' alone.

    report = merge_audit(model, "runs/qlora", batches)   # model: the full-precision base
    print(report.table())

(About 400 lines, a third of them docstrings: the report's three records and its table read
best next to the one function that fills them.)
"""

import copy
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowrank._validate import check_blocksize, check_bool, check_quant_type
from lowrank.accounting import format_bytes
from lowrank.torch.checkpoint import load_trainable
from lowrank.torch.dora import DoRALinear
from lowrank.torch.factored import factored_core
from lowrank.torch.lora import LoRALinear
from lowrank.torch.model import lora_layers, merged_copy, replace_module
from lowrank.torch.qlora import Linear4bit
from lowrank.torch.train import move_to

__all__ = ["DTYPES", "QUANT_TYPES", "LayerAudit", "ChoiceAudit", "MergeAuditReport",
           "kl_divergence", "merge_audit"]  # fmt: skip

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit types, the ones QLoRA bases are stored in
CHOICES = {
    "a": "adapter on the 4-bit base (trained)",
    "b": "merged into the original W",
    "c": "merged into deq(Q(W))",
    "d": "merged, re-quantized to 4 bits",
}
KL_TIE = 1e-9  # nats: KL differences below this are float32 rounding of the logits, a tie


@dataclass
class LayerAudit:
    """One adapted layer: W [out, in], ||W||_F, the quantization error ||W - deq(Q(W))||_F,
    the update's ||s B A||_F, and error / update (inf where the update is zero).

    Examples:
        >>> layer = LayerAudit("q", (64, 32), r=4, weight_norm=10.0, quant_error=0.5,
        ...                    update_norm=0.05)
        >>> layer.ratio, layer.relative_error, layer.relative_update
        (10.0, 0.05, 0.005)
    """

    name: str
    shape: tuple[int, int]  # (out, in)
    r: int
    weight_norm: float
    quant_error: float
    update_norm: float

    @property
    def ratio(self) -> float:
        """||W - deq(Q(W))||_F / ||s B A||_F."""
        return self.quant_error / self.update_norm if self.update_norm > 0 else math.inf

    @property
    def relative_error(self) -> float:
        """||W - deq(Q(W))||_F / ||W||_F."""
        return self.quant_error / self.weight_norm

    @property
    def relative_update(self) -> float:
        """||s B A||_F / ||W||_F."""
        return self.update_norm / self.weight_norm


@dataclass
class ChoiceAudit:
    """One deployment choice against (a): mean KL(p_a || p_choice) in nats, max |logit
    difference|, argmax agreement with (a), accuracy (None without labels), and the bytes of
    the adapted layers' weights (the factors too for (a)).

    Examples:
        >>> ChoiceAudit("c", CHOICES["c"], 1e-4, 0.02, 1.0, None, 2048).kl
        0.0001
    """

    key: str
    name: str
    kl: float
    max_logit_diff: float
    agreement: float
    accuracy: float | None
    weight_bytes: int


@dataclass
class MergeAuditReport:
    """What `merge_audit` measured: `layers`, `choices` (a) to (d), the recommendation.

    Examples:
        >>> layers = [LayerAudit("q", (8, 8), 2, 4.0, 0.2, 0.02)]
        >>> choices = [ChoiceAudit(k, CHOICES[k], kl, 0.0, 1.0, None, 64)
        ...            for k, kl in (("a", 0.0), ("b", 3e-3), ("c", 2e-8), ("d", 1e-3))]
        >>> report = MergeAuditReport(layers, choices, {"quant_type": "nf4"})
        >>> report.recommended
        'c'
        >>> report.ratio_summary()
        {'median': 10.0, 'min': 10.0, 'max': 10.0}
    """

    layers: list[LayerAudit]
    choices: list[ChoiceAudit]
    settings: dict

    @property
    def recommended(self) -> str:
        """Of (b), (c), (d): the lowest KL; among those within `KL_TIE` of it, the fewest bytes."""
        merged = self.choices[1:]
        best = min(choice.kl for choice in merged)
        tied = [choice for choice in merged if choice.kl - best <= KL_TIE]
        return min(tied, key=lambda choice: choice.weight_bytes).key

    def reason(self) -> str:
        """The recommendation in words: why, the ties, and the memory of each choice."""
        by_key = {choice.key: choice for choice in self.choices}
        pick = by_key[self.recommended]
        best = min(choice.kl for choice in self.choices[1:])
        tied = [c.key for c in self.choices[1:] if c.kl - best <= KL_TIE and c.key != pick.key]
        text = f"({pick.key}) {pick.name}: the lowest KL to what was trained ({pick.kl:.3g} nats)"
        if tied:
            names = ", ".join(f"({key})" for key in tied)
            text += f"; tied with {names} (within {KL_TIE:g} nats), and the smaller in memory"
        memory = ", ".join(f"({c.key}) {format_bytes(c.weight_bytes)}" for c in self.choices)
        return f"{text}. Adapted layers' weights: {memory}."

    def ratio_summary(self) -> dict[str, float]:
        """Median, min and max of quantization error / update over the layers."""
        ratios = [layer.ratio for layer in self.layers]
        return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}

    def to_dict(self) -> dict:
        """JSON-ready: settings, layers (with ratio; null for an infinite one), choices,
        the ratio summary and the recommendation."""
        layers = []
        for layer in self.layers:
            row = {**asdict(layer), "shape": list(layer.shape)}
            row["ratio"] = None if math.isinf(layer.ratio) else layer.ratio
            row["relative_error"] = layer.relative_error
            row["relative_update"] = layer.relative_update
            layers.append(row)
        ratios = {k: (None if math.isinf(v) else v) for k, v in self.ratio_summary().items()}
        return {
            "settings": self.settings,
            "layers": layers,
            "ratio_summary": ratios,
            "choices": [asdict(choice) for choice in self.choices],
            "recommended": self.recommended,
            "reason": self.reason(),
        }

    def table(self) -> str:
        """The report as text: the settings, one line per layer, one per choice, the verdict."""
        s = self.settings
        width = max(len("layer"), *(len(layer.name) for layer in self.layers))
        lines = [
            f"merge audit: {s['quant_type']} base, blocksize {s['blocksize']}, double quant "
            f"{'on' if s['double_quant'] else 'off'}; merged weights in {s['dtype']}; "
            f"{s['compared']} outputs compared",
            "",
            f"{'layer':<{width}} {'out x in':>9} {'r':>3} {'||W - deq||':>11} {'||s B A||':>10} "
            f"{'err/upd':>8} {'err/||W||':>9} {'upd/||W||':>9}",
        ]
        for layer in self.layers:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            lines.append(
                f"{layer.name:<{width}} {shape:>9} {layer.r:>3} {layer.quant_error:>11.4g} "
                f"{layer.update_norm:>10.4g} {layer.ratio:>8.3g} {layer.relative_error:>9.3g} "
                f"{layer.relative_update:>9.3g}"
            )
        summary = self.ratio_summary()
        lines += [
            f"{len(self.layers)} layers: quantization error / update median {summary['median']:.3g}"
            f" (range {summary['min']:.3g} to {summary['max']:.3g})",
            "",
            f"{'deployment (against (a))':<40} {'KL(a||x)':>9} {'max|dlogit|':>11} "
            f"{'agree':>6} {'accuracy':>8}  weights",
        ]
        for c in self.choices:
            accuracy = "-" if c.accuracy is None else f"{c.accuracy:.4f}"
            lines.append(
                f"({c.key}) {c.name:<36} {c.kl:>9.3g} {c.max_logit_diff:>11.3g} "
                f"{c.agreement:>6.3f} {accuracy:>8}  {format_bytes(c.weight_bytes)}"
            )
        return "\n".join([*lines, "", f"recommended: {self.reason()}"])


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(other)) over the last dim, in float64 nats:
    logits (..., classes) each -> (...).

    Examples:
        >>> p, q = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])
        >>> kl_divergence(p, q)  # 0.5 log(0.5 / 0.25) + 0.5 log(0.5 / 0.75)
        tensor([0.1438], dtype=torch.float64)
    """
    log_p = torch.log_softmax(reference.double(), dim=-1)
    log_q = torch.log_softmax(other.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _check_options(quant_type, blocksize, double_quant, dtype) -> None:
    check_quant_type(quant_type, QUANT_TYPES)
    check_blocksize(blocksize)
    check_bool("double_quant", double_quant)
    if dtype not in DTYPES.values():
        raise TypeError(f"dtype must be one of {list(DTYPES)} (a torch.dtype), got {dtype!r}")


def _check_batches(inputs, labels) -> tuple[list, list | None]:
    batches = list(inputs)
    if not batches:
        raise ValueError("inputs is empty: give at least one batch to run the models on")
    for i, batch in enumerate(batches):
        tensors = batch.values() if isinstance(batch, dict) else [batch]
        if not all(isinstance(t, torch.Tensor) for t in tensors) or not tensors:
            raise TypeError(f"inputs[{i}] must be a tensor or a dict of tensors, got {batch!r}")
    if labels is not None:
        labels = list(labels)
        if len(labels) != len(batches):
            raise ValueError(f"labels has {len(labels)} entries for {len(batches)} batches")
    return batches, labels


def _run(model: nn.Module, batch) -> torch.Tensor:
    """The model's logits for one batch, float32 on the CPU."""
    device = next(model.parameters()).device
    batch = move_to(batch, device)
    output = model(**batch) if isinstance(batch, dict) else model(batch)
    return getattr(output, "logits", output).float().cpu()


def _counted(batch, logits: torch.Tensor) -> torch.Tensor:
    """Which positions count, (...) of logits (..., classes): a 3-d output's padding does not."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if logits.dim() == 3 and mask is not None:
        return mask.cpu().bool()
    return torch.ones(logits.shape[:-1], dtype=torch.bool)


def _compare(key, model, trained, batches, labels, weight_bytes) -> ChoiceAudit:
    """Choice `key`'s model against (a)'s logits `trained` (one tensor per batch)."""
    kl_sum, count, agree, top, correct, scored = 0.0, 0, 0, 0.0, 0, 0
    for i, (batch, reference) in enumerate(zip(batches, trained, strict=True)):
        logits = _run(model, batch)
        keep = _counted(batch, logits)  # (batch,) or (batch, seq)
        kl_sum += float(kl_divergence(reference[keep], logits[keep]).sum())
        count += int(keep.sum())
        agree += int((reference.argmax(-1) == logits.argmax(-1))[keep].sum())
        top = max(top, float((reference[keep] - logits[keep]).abs().max()))
        if labels is not None:
            target = labels[i].cpu()
            scored_here = keep & (target != -100)
            correct += int((logits.argmax(-1) == target)[scored_here].sum())
            scored += int(scored_here.sum())
    accuracy = correct / scored if labels is not None and scored else None
    return ChoiceAudit(
        key, CHOICES[key], kl_sum / count, top, agree / count, accuracy, weight_bytes
    )


@torch.no_grad()
def merge_audit(
    model: nn.Module,
    adapter: str | os.PathLike,
    inputs: Sequence[torch.Tensor | Mapping[str, torch.Tensor]],
    *,
    labels: Sequence[torch.Tensor] | None = None,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    dtype: torch.dtype = torch.bfloat16,
) -> MergeAuditReport:
    """Audit deploying `adapter`, trained on the 4-bit version of `model`: see the module doc.

    Args:
        model: the base model with its full-precision weights and no LoRA layers (not changed;
            every choice is built from a copy).
        adapter: a PEFT adapter folder, or a `save_trainable` folder (adapter + head).
        inputs: batches to run: tensors (model(batch)) or dicts of tensors (model(**batch));
            a dict's attention_mask leaves padding out of a (batch, seq, vocab) output.
        labels: one tensor per batch, shaped like the logits without their last dim,
            -100 where not scored (a language model's are the next tokens); None: no accuracy.
        quant_type: the base's 4-bit type, "nf4" or "fp4" (not in a PEFT file: as trained).
        blocksize: the quantization block size.
        double_quant: whether the block scales were quantized too.
        dtype: what the merged weights of (b) and (c) are stored in, and (d) quantized from.

    Returns:
        A `MergeAuditReport`: per layer the quantization error and the update, per choice
        the KL, max |logit difference|, agreement and accuracy against (a).

    Examples:
        >>> import tempfile
        >>> from collections import OrderedDict
        >>> from lowrank.torch import add_lora, save_adapter
        >>> _ = torch.manual_seed(0)
        >>> base = nn.Sequential(OrderedDict(q=nn.Linear(64, 64), out=nn.Linear(64, 3)))
        >>> trained = add_lora(copy.deepcopy(base), ["q"], r=4, quant_type="nf4")
        >>> _ = nn.init.normal_(trained.q.B["default"], std=0.01)  # as if trained
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_adapter(trained, folder)
        ...     report = merge_audit(base, folder, [torch.randn(16, 64)], dtype=torch.float32)
        >>> [(c.key, c.kl < 1e-9) for c in report.choices]  # (c) in float32 is (a) exactly
        [('a', True), ('b', False), ('c', True), ('d', False)]
        >>> report.recommended
        'c'
    """
    _check_options(quant_type, blocksize, double_quant, dtype)
    batches, labels = _check_batches(inputs, labels)
    if any(True for _ in lora_layers(model)):
        raise ValueError("model already has LoRA layers: pass the base model, without adapters")
    loaded = load_trainable(copy.deepcopy(model), adapter)  # W + the factors (+ a head)
    layers = list(lora_layers(loaded))
    for name, layer in layers:
        if isinstance(layer, DoRALinear):  # its merge is not W + sBA: audit LoRA only
            raise ValueError(f"{adapter}: layer {name!r} is DoRA; the audit reads LoRA only")
        if not isinstance(layer, LoRALinear) or not isinstance(layer.base_layer, nn.Linear):
            raise ValueError(
                f"{adapter}: layer {name!r} is a {type(layer.base_layer).__name__}; a QLoRA "
                "adapter adapts nn.Linear layers only (their weights are the ones in 4 bits)"
            )
    options = {"quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant}
    quantized = {
        name: Linear4bit.from_linear(layer.base_layer, **options) for name, layer in layers
    }
    audits = [_audit_layer(name, layer, quantized[name]) for name, layer in layers]

    trained_model = copy.deepcopy(loaded)  # (a): the factors on the 4-bit base
    for name, _ in layers:
        trained_model.get_submodule(name).base_layer = quantized[name]
    trained = [_run(trained_model.eval(), batch) for batch in batches]
    factors = [
        (layer.A[layer.active_adapter], layer.B[layer.active_adapter]) for _, layer in layers
    ]
    factor_bytes = sum(t.numel() * t.element_size() for pair in factors for t in pair)
    four_bit = sum(q.quantized().nbytes for q in quantized.values())
    choices = [_compare("a", trained_model, trained, batches, labels, four_bit + factor_bytes)]
    del trained_model

    for key in ("b", "c", "d"):
        deployed = merged_copy(loaded)  # plain layers (and the head) in the model's dtype
        for name, layer in layers:
            base = layer.base_layer.weight if key == "b" else quantized[name].dequantize_weight()
            merged = (base.float() + layer.delta_weight().float()).to(dtype)  # (out, in)
            plain = deployed.get_submodule(name)
            if key == "d":  # Q(deq(Q(W)) + s B A), with the base's settings
                replace_module(deployed, name, _four_bit(plain, merged, options))
            else:
                plain.weight.copy_(merged.to(plain.weight.dtype))  # the values `dtype` keeps
        if key == "d":
            weight_bytes = sum(deployed.get_submodule(n).quantized().nbytes for n, _ in layers)
        else:
            weight_bytes = sum(math.prod(a.shape) for a in audits) * torch.finfo(dtype).bits // 8
        choices.append(_compare(key, deployed.eval(), trained, batches, labels, weight_bytes))
        del deployed
    compared = sum(int(_counted(b, t).sum()) for b, t in zip(batches, trained, strict=True))
    settings = {**options, "dtype": str(dtype).removeprefix("torch."), "compared": compared}
    return MergeAuditReport(audits, choices, {**settings, "adapter": str(adapter)})


def _audit_layer(name: str, layer: LoRALinear, quantized: Linear4bit) -> LayerAudit:
    """||W||, ||W - deq(Q(W))|| and ||s B A|| (from the r x r core of the factors' QRs)."""
    W = layer.base_layer.weight.double()  # (out, in)
    error = torch.linalg.norm(W - quantized.dequantize_weight().double())
    adapter = layer.active_adapter
    _, core, _ = factored_core(layer.B[adapter], layer.A[adapter])  # (r, r)
    update = layer.scale[adapter] * torch.linalg.norm(core)
    return LayerAudit(
        name, tuple(W.shape), layer.r[adapter], float(torch.linalg.norm(W)), float(error),
        float(update),
    )  # fmt: skip


def _four_bit(plain: nn.Linear, weight: torch.Tensor, options: dict) -> Linear4bit:
    """A Linear4bit holding Q(weight) and `plain`'s bias."""
    layer = Linear4bit(
        plain.in_features,
        plain.out_features,
        bias=plain.bias is not None,
        dtype=plain.weight.dtype,
        device=plain.weight.device,
        **options,
    )
    layer.set_weight(weight)
    if plain.bias is not None:
        layer.bias.copy_(plain.bias)
    return layer

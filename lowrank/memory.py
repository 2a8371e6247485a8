"""How much memory does fine-tuning this model need? An estimate from its config.json alone.

    >>> from lowrank.memory import estimate_memory
    >>> llama2_7b = {"_name_or_path": "Llama-2-7b", "model_type": "llama",
    ...              "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    ...              "intermediate_size": 11008, "vocab_size": 32000}  # from its config.json
    >>> print(estimate_memory(llama2_7b, method="qlora", batch_size=1, seq_len=512))
    Llama-2-7b: qlora, weights NF4 linears + bf16, batch 1 x 512 tokens, on cuda
    adapters: r=8 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (qlora's default:
      every linear layer)
    attention: fused SDPA kernel (flash / memory-efficient): no seq x seq matrix kept
    trainable parameters 19,988,480 of 6,758,404,096 (0.296%)
      weights                    3.9 GB (3.6 GiB)
        4-bit packed weights     3.2 GB (3.0 GiB)
        absmax, double-quant  102.8 MB (98.0 MiB)
        embeddings and head  524.3 MB (500.0 MiB)
        norms and biases     532.5 kB (520.0 KiB)
      adapters                 80.0 MB (76.2 MiB)
      gradients                80.0 MB (76.2 MiB)
      optimizer (AdamW)      159.9 MB (152.5 MiB)
      activations                4.6 GB (4.2 GiB)
        adapter inputs           2.3 GB (2.2 GiB)
        attention            539.0 MB (514.0 MiB)
        MLP                      1.1 GB (1.0 GiB)
        norms                537.0 MB (512.1 MiB)
        logits and loss        65.5 MB (62.5 MiB)
      backward working       131.1 MB (125.0 MiB)
      optimizer step           80.0 MB (76.2 MiB)
      total (the peak)           8.8 GB (8.2 GiB)
      (weights, adapters, optimizer and the larger of activations + backward working
      and gradients + optimizer step: gradients are made as activations are freed)
    with gradient checkpointing: 4.4 GB (4.1 GiB)
    fits on a GPU with 12 GB (12 GiB; ~0.5 GB kept for the CUDA context)

A path to a config.json, or a model folder holding one, works the same:
`estimate_memory("Llama-2-7b/config.json", method="qlora")`.

Framework-free (no torch, no transformers, no weights): `lowrank.shapes` reads the shapes from
the config, `lowrank.accounting.training_memory` turns them into the bytes that do not depend on
the batch, and `lowrank.activations` counts what the batch adds:

- weights: every parameter in `dtype`, or, for QLoRA, each adapted linear weight in NF4 (4 bits
  a weight in packed codes, one absmax byte per block of 64 and an fp32 scale per 256 blocks
  with double quantization: 4.127 bits; Dettmers et al. 2023, arXiv:2305.14314, section 3).
  `lowrank.torch.add_lora(..., quant_type="nf4")` quantizes the layers it adapts, so QLoRA's
  default, every linear layer, puts all of them in 4 bits; embeddings, norms, biases and the
  output head stay in `dtype`;
- adapters: LoRA's A and B in fp32 (Hu et al. 2021, arXiv:2106.09685); gradients: one per
  trainable number; optimizer state: AdamW's two fp32 moments per trainable number;
- activations and the backward pass's working memory: `lowrank.activations` (what is saved by
  kind, the attention kernel the device runs, gradient checkpointing).

The peak. Gradients are made during the backward pass while the activations are freed, so the
peak holds the weights, adapters and optimizer state and the larger of (activations + backward
working memory) and (gradients + the optimizer step's temporaries: on CUDA PyTorch's foreach
AdamW makes one temporary as large as the trainable parameters, on a CPU the loop over
parameters two as large as the largest one). For LoRA the first is the peak; for full
fine-tuning either can be.

Each estimate also carries the total with gradient checkpointing the other way round
(`other_total`, printed under the table). GPUs: `fits(gpu_bytes)` keeps 0.5 GB aside for the
CUDA context, `largest_batch_size` finds the most sequences per step that fit, and
`parse_gpu_memory("24GB")` reads a card's size in binary units: GPU memory is built in powers of
two, so a "24 GB" card holds 24 GiB (what `lowrank estimate --gpu 24GB` uses).

Assumed: the model and its activations in `dtype` without autocast, no padding mask, LoRA
dropout 0, PyTorch's AdamW. Not counted: the CUDA context, allocator fragmentation, the
tokenizer and data loader. tests/test_memory.py holds the estimate to peaks measured by
`lowrank.torch.measure` in a fresh process (CPU within 15%, CUDA within 10%).

DoRA (`dora=True`; Liu et al. 2024, arXiv:2402.09353) adds a trained magnitude per output
feature and two saved fp32 tensors per adapted layer. Several GPUs (`gpus=N`, `strategy="ddp"`
or `"fsdp"`): the batch is split among them and the estimate is one GPU's, with what DDP or
FSDP replicates, shards and gathers (`lowrank.sharding`). (~520 lines: the estimate, its table
and the GPU questions read together; what the batch adds is `lowrank.activations`, what a
strategy changes `lowrank.sharding`.)
"""

import math
import os
import re
from dataclasses import dataclass, field, replace

from lowrank._validate import FLOAT_DTYPES, METHODS, check_bool, check_choice, check_int
from lowrank.accounting import (
    DTYPE_BITS,
    MemoryBreakdown,
    format_bytes,
    param_counts,
    tensor_bytes,
    training_memory,
)
from lowrank.activations import ATTENTION_KERNELS, Activations, saved_activations
from lowrank.shapes import (
    ALL_LINEAR,
    HF_LINEAR_NAMES,
    MODEL_FAMILIES,
    TransformerShape,
    config_to_shape,
    hf_linear_shapes,
    method_default_targets,
    read_config,
)
from lowrank.sharding import STRATEGIES, per_gpu_parts, sharded_weight_parts

__all__ = ["MemoryEstimate", "estimate_memory", "largest_batch_size", "parse_gpu_memory"]

CUDA_CONTEXT_BYTES = 500_000_000  # what `fits` keeps aside for the CUDA context
GPU_SIZES_GIB = (8, 12, 16, 24, 48, 80)  # the cards __str__ tries, smallest first
SHARING = {
    "ddp": "a whole replica on each GPU; only the trainable gradients are all-reduced",
    "fsdp": "parameters, frozen or not, their gradients and AdamW state sharded",
}
QLORA_SHARDING = {
    "ddp": "",
    "fsdp": "; the 4-bit codes too (stored as a parameter: set_quant_storage), their "
    "constants (buffers) replicated",
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step's peak, by part; `str()` prints the table.

    `weights`, `adapters`, `gradients`, `optimizer_states` and `activations` read the parts of
    `breakdown`; `total` is the peak (see the module doc), not their sum.

    Attributes:
        model: the model's name (the config's `_name_or_path`, else its `model_type`).
        method: "full", "lora" or "qlora".
        dtype: storage of the weights that are not 4-bit, and of the activations.
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        r: the LoRA rank.
        targets: the adapted layers, by Hugging Face name.
        default_targets: whether `targets` are the method's default (`method_default_targets`).
        gradient_checkpointing: whether only each block's input is kept.
        device: "cuda" or "cpu", which decides the attention kernel and the optimizer's loop.
        trainable_params: parameters the optimizer updates.
        total_params: every parameter, adapters included.
        breakdown: `training_memory`'s adapters, gradients and optimizer states, the weights
            of `weight_parts`, and the activations filled in.
        weight_parts: the weights by kind (4-bit codes, their constants, embeddings and head,
            norms and biases, linear weights kept in `dtype`).
        per_batch: what the batch adds (`lowrank.activations.Activations`): saved activations
            by kind, the working memory of the backward pass and of the optimizer step, the
            attention kernel.
        other_total: `total` with gradient checkpointing the other way round.
        dora: whether the adapters are DoRA's (a trained magnitude per output feature).
        gpus: GPUs sharing the step; every byte here is one GPU's.
        strategy: "ddp" or "fsdp" with several GPUs, "" with one.
        parallel_parts: what the strategy adds on each GPU (`lowrank.sharding.per_gpu_parts`):
            DDP's gradient buckets, FSDP's gathered root and blocks.

    Examples:
        >>> from lowrank.accounting import format_bytes
        >>> from lowrank.memory import estimate_memory
        >>> gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
        ...         "vocab_size": 50257, "n_positions": 1024}
        >>> estimate = estimate_memory(gpt2, method="lora", batch_size=8, seq_len=512)
        >>> estimate.targets, estimate.trainable_params
        (('c_attn',), 294912)
        >>> format_bytes(estimate.total), estimate.fits(12 * 2**30)
        ('4.6 GB (4.3 GiB)', True)
    """

    model: str
    method: str
    dtype: str
    batch_size: int
    seq_len: int
    r: int
    targets: tuple[str, ...]  # Hugging Face layer names
    default_targets: bool
    gradient_checkpointing: bool
    device: str
    trainable_params: int
    total_params: int
    breakdown: MemoryBreakdown
    weight_parts: dict[str, int] = field(default_factory=dict)
    per_batch: Activations = field(default_factory=Activations)
    other_total: int = 0
    dora: bool = False
    gpus: int = 1
    strategy: str = ""
    parallel_parts: dict[str, int] = field(default_factory=dict)

    @property
    def weights(self) -> int:
        return self.breakdown.weights

    @property
    def adapters(self) -> int:
        return self.breakdown.adapters

    @property
    def gradients(self) -> int:
        return self.breakdown.gradients

    @property
    def optimizer_states(self) -> int:
        return self.breakdown.optimizer_states

    @property
    def activations(self) -> int:
        return self.breakdown.activations

    @property
    def working(self) -> int:
        """The backward pass's working memory on top of the activations, early on."""
        return self.per_batch.working

    @property
    def total(self) -> int:
        """The step's peak: what always stays, plus the larger of the two phases."""
        early = self.activations + self.per_batch.working  # no gradient made yet
        late = self.gradients + max(
            self.per_batch.step_working, self.per_batch.working_with_gradients
        )
        always = self.weights + self.adapters + self.optimizer_states
        return always + sum(self.parallel_parts.values()) + max(early, late)

    def fits(self, gpu_bytes: float) -> bool:
        """Whether the estimate fits in `gpu_bytes` (e.g. 24 * 2**30 for a "24 GB" card),
        leaving 0.5 GB for the CUDA context."""
        return self.total + CUDA_CONTEXT_BYTES <= gpu_bytes

    def __str__(self) -> str:
        checkpointing = ", gradient checkpointing" if self.gradient_checkpointing else ""
        weights = {"qlora": "NF4 linears + " + self.dtype}.get(self.method, self.dtype)
        where = self.device if self.gpus == 1 else f"{self.gpus} x {self.device}"
        lines = [
            f"{self.model}: {self.method}, weights {weights}, batch {self.batch_size} x "
            f"{self.seq_len} tokens{checkpointing}, on {where}"
        ]
        if self.gpus > 1:
            each = self.batch_size // self.gpus
            each = f"{each} sequence{'s' if each > 1 else ''} each"
            sharing = SHARING[self.strategy]
            sharing += QLORA_SHARDING[self.strategy] if self.method == "qlora" else ""
            lines += _wrapped(f"per GPU ({self.strategy.upper()}, {each}): {sharing}")
        if self.method != "full":
            default = f" ({self.method}'s default: " if self.default_targets else ""
            if default:
                default += "every linear layer)" if self.method == "qlora" else "query, value)"
            kind = "DoRA " if self.dora else ""
            lines += _wrapped(f"adapters: {kind}r={self.r} on {','.join(self.targets)}{default}")
        lines += [
            f"attention: {ATTENTION_KERNELS[self.per_batch.kernel]}",
            f"trainable parameters {self.trainable_params:,} of {self.total_params:,} "
            f"({self.trainable_params / self.total_params:.3%})",
        ]
        rows = [("weights", self.weights, self.weight_parts)]
        rows += [("adapters", self.adapters, {}), ("gradients", self.gradients, {})]
        rows += [("optimizer (AdamW)", self.optimizer_states, {})]
        rows += [("activations", self.activations, self.per_batch.saved)]
        rows += [("backward working", self.working, {})]
        rows += [("optimizer step", self.per_batch.step_working, {})]
        rows += [(part, n, {}) for part, n in self.parallel_parts.items()]
        for name, n_bytes, parts in rows:
            lines.append(f"  {name:<22} {format_bytes(n_bytes):>20}")
            if len(parts) > 1:
                lines += [f"    {kind:<20} {format_bytes(n):>20}" for kind, n in parts.items()]
        lines += [
            f"  {'total (the peak)':<22} {format_bytes(self.total):>20}",
            "  (weights, adapters, optimizer and the larger of activations + backward working",
            "  and gradients + optimizer step: gradients are made as activations are freed)",
        ]
        other = "without" if self.gradient_checkpointing else "with"
        lines.append(f"{other} gradient checkpointing: {format_bytes(self.other_total)}")
        fitting = [gib for gib in GPU_SIZES_GIB if self.fits(gib * 2**30)]
        if fitting:
            lines.append(
                f"fits on a GPU with {fitting[0]} GB ({fitting[0]} GiB; ~0.5 GB kept for the "
                "CUDA context)"
            )
        else:
            lines.append(f"does not fit on a GPU with {GPU_SIZES_GIB[-1]} GB")
        return "\n".join(lines)


def _wrapped(text: str, width: int = 95) -> list[str]:
    """`text` cut at commas or spaces into lines of at most `width`, continued indented."""
    lines = []
    while len(text) > width:
        cut = max(text.rfind(",", 0, width), text.rfind(" ", 0, width)) + 1
        lines.append(text[:cut].rstrip())
        text = "  " + text[cut:].lstrip()
    return lines + [text]


def estimate_memory(
    config: dict | str | os.PathLike,
    *,
    method: str = "lora",
    batch_size: int = 1,
    seq_len: int = 512,
    r: int = 8,
    targets: list[str] | str | None = None,
    gradient_checkpointing: bool = False,
    dtype: str = "bf16",
    double_quant: bool = True,
    lm_head: bool | None = None,
    device: str = "cuda",
    dora: bool = False,
    gpus: int = 1,
    strategy: str = "ddp",
) -> MemoryEstimate:
    """Estimate the peak memory of one training step; see the module doc for each part.

    config: a Hugging Face config (dict, config.json path, or model folder).
    method: "full" (every weight trains), "lora" or "qlora" (adapters on `targets`, Hugging Face
        layer names, or "all-linear" for every linear layer of the blocks; default: the
        method's, `lowrank.shapes.method_default_targets`: query and value for LoRA, every
        linear layer for QLoRA, as `lowrank finetune` uses). QLoRA stores the adapted linear
        weights in NF4.
    dtype: storage of the weights that are not 4-bit, and of the activations.
    lm_head: count logits over the vocabulary (default: True for decoders, False for encoders).
    device: "cuda" or "cpu": the attention kernel and the optimizer's loop differ.
    dora: DoRA adapters (Liu et al. 2024, arXiv:2402.09353): a trained magnitude per output
        feature, and two fp32 tensors of each adapted layer's output width saved per token.
    gpus: GPUs sharing the step; `batch_size` is the whole step's, split evenly among them,
        and the estimate is what one GPU holds (`lowrank.sharding`).
    strategy: with several GPUs, "ddp" (a replica on each) or "fsdp" (parameters, gradients
        and AdamW state sharded N ways, FSDP2's `fully_shard` per block).

    Full fine-tuning pays gradients and AdamW states for every weight; LoRA (Hu et al. 2021,
    arXiv:2106.09685) only for the adapters; QLoRA (Dettmers et al. 2023, arXiv:2305.14314)
    also stores the frozen linear weights in 4 bits.

    Examples:
        >>> from lowrank.accounting import format_bytes
        >>> from lowrank.memory import estimate_memory
        >>> gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
        ...         "vocab_size": 50257, "n_positions": 1024}
        >>> for method in ("full", "lora", "qlora"):
        ...     estimate = estimate_memory(gpt2, method=method, batch_size=8, seq_len=512)
        ...     print(method, format_bytes(estimate.total))
        full 5.9 GB (5.5 GiB)
        lora 4.6 GB (4.3 GiB)
        qlora 5.4 GB (5.0 GiB)
        >>> full = estimate_memory(gpt2, method="full", batch_size=8, seq_len=512,
        ...                        gradient_checkpointing=True)
        >>> format_bytes(full.activations)  # mostly the loss's fp32 log-probabilities
        '914.6 MB (872.3 MiB)'
    """
    check_choice("method", method, METHODS)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("r", r)):
        check_int(name, value)
    check_choice("dtype", dtype, FLOAT_DTYPES)
    check_choice("device", device, ("cuda", "cpu"))
    check_bool("dora", dora)
    check_int("gpus", gpus)
    check_choice("strategy", strategy, STRATEGIES)
    if batch_size % gpus:
        raise ValueError(
            f"batch_size {batch_size} does not split evenly over {gpus} GPUs: each GPU runs "
            "batch_size / gpus sequences"
        )
    if dora and method == "full":
        raise ValueError(
            "dora=True needs method 'lora' or 'qlora': full fine-tuning has no adapter"
        )
    config = read_config(config)
    shape = config_to_shape(config)
    family = MODEL_FAMILIES[config["model_type"]]
    per_layer = hf_linear_shapes(config)
    default_targets = targets is None
    if targets is None:
        targets = method_default_targets(method, config["model_type"])
    if targets in (ALL_LINEAR, [ALL_LINEAR]):
        targets = list(per_layer)
    unknown = [t for t in targets if t not in per_layer]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; this architecture has {list(per_layer)}")
    if not targets and method != "full":
        raise ValueError(
            f"method {method!r} needs targets; this architecture has {list(per_layer)}"
        )
    targets = [] if method == "full" else targets
    shape_keys = [HF_LINEAR_NAMES[family][t] for t in targets]  # "c_attn" -> "qkv"
    fixed = training_memory(
        shape,
        method=method,
        r=r,
        targets=shape_keys or ("q",),
        weight_dtype="nf4" if method == "qlora" else dtype,
        unquantized_dtype=dtype,
        adapter_dtype="fp32",
        optimizer="adamw",
        double_quant=double_quant,
        dora=dora,
    )
    counts = param_counts(shape, method=method, r=r, targets=shape_keys or ("q",), dora=dora)
    weight_parts = _weight_parts(
        shape, quantized=shape_keys if method == "qlora" else (), dtype=dtype,
        double_quant=double_quant,
    )  # fmt: skip
    options = dict(
        method=method, adapted=tuple(shape_keys), tokens=batch_size // gpus * seq_len,
        seq_len=seq_len,
        r=r, dtype=dtype, device=device,
        lm_head=lm_head if lm_head is not None else family != "bert", dora=dora,
    )  # fmt: skip
    saved = saved_activations(
        config, shape, family, gradient_checkpointing=gradient_checkpointing, **options
    )
    other = saved_activations(
        config, shape, family, gradient_checkpointing=not gradient_checkpointing, **options
    )
    parallel: dict[str, int] = {}
    if gpus > 1:
        parallel = per_gpu_parts(
            gpus=gpus, strategy=strategy, weight_parts=weight_parts, adapters=fixed.adapters,
            gradients=fixed.gradients, n_layers=shape.n_layers, full=method == "full",
        )  # fmt: skip
        shares = 1 if strategy == "ddp" else gpus
        weight_parts = sharded_weight_parts(weight_parts, gpus, strategy)
        fixed = replace(
            fixed, adapters=-(-fixed.adapters // shares), gradients=-(-fixed.gradients // shares),
            optimizer_states=-(-fixed.optimizer_states // shares),
        )  # fmt: skip
        saved = replace(saved, step_working=-(-saved.step_working // shares))
        other = replace(other, step_working=-(-other.step_working // shares))
    estimate = MemoryEstimate(
        model=shape.name,
        method=method,
        dtype=dtype,
        batch_size=batch_size,
        seq_len=seq_len,
        r=r,
        targets=tuple(targets),
        default_targets=default_targets and method != "full",
        gradient_checkpointing=gradient_checkpointing,
        device=device,
        trainable_params=counts.trainable,
        total_params=counts.total,
        breakdown=replace(fixed, weights=sum(weight_parts.values()), activations=saved.total),
        weight_parts={kind: n for kind, n in weight_parts.items() if n},
        per_batch=saved,
        dora=dora,
        gpus=gpus,
        strategy=strategy if gpus > 1 else "",
        parallel_parts=parallel,
    )
    flipped = replace(
        estimate, per_batch=other, breakdown=replace(estimate.breakdown, activations=other.total)
    )
    return replace(estimate, other_total=flipped.total)


def _weight_parts(
    shape: TransformerShape, *, quantized: list[str] | tuple, dtype: str, double_quant: bool
) -> dict[str, int]:
    """The model's weights by kind, in bytes: the adapted linears in NF4 (codes, constants),
    the rest in `dtype`."""
    element = DTYPE_BITS[dtype] // 8
    groups = shape.param_groups()
    parts = dict.fromkeys(
        ("4-bit packed weights", "absmax, double-quant", "embeddings and head",
         "norms and biases", f"linear weights ({dtype})"), 0,
    )  # fmt: skip
    for key, (out, in_) in shape.linear_shapes().items():
        n = out * in_
        if key in quantized:
            packed = math.ceil(n / 2)
            nf4 = tensor_bytes(n, "nf4", double_quant=double_quant)
            parts["4-bit packed weights"] += shape.n_layers * packed
            parts["absmax, double-quant"] += shape.n_layers * (nf4 - packed)
        else:
            parts[f"linear weights ({dtype})"] += shape.n_layers * n * element
    parts["embeddings and head"] = (groups["embeddings"] + groups["output head"]) * element
    parts["norms and biases"] = (groups["norms"] + groups["linear biases"]) * element
    return parts


def largest_batch_size(gpu_bytes: float, config: dict | str | os.PathLike, **options) -> int:
    """The most sequences per step whose estimate `fits(gpu_bytes)` (0: not even one); the
    other keyword arguments are `estimate_memory`'s (batch_size aside). With `gpus=N` the
    answer is the whole step's, a multiple of N: each GPU of that size runs 1/N of it.

    Examples:
        >>> from lowrank.memory import largest_batch_size
        >>> gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
        ...         "vocab_size": 50257, "n_positions": 1024}
        >>> largest_batch_size(24 * 2**30, gpt2, method="lora", seq_len=512)
        45
    """

    gpus = options.get("gpus", 1)

    def fits(per_gpu: int) -> bool:  # sequences on each GPU
        return estimate_memory(config, batch_size=per_gpu * gpus, **options).fits(gpu_bytes)

    low, high = 0, 1  # fits(low) (0 trivially), and `high` is the first size known not to fit
    while fits(high):
        low, high = high, 2 * high
        if high > 2**24:
            return low * gpus
    while high - low > 1:  # the estimate grows with the batch: bisect
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * gpus


def parse_gpu_memory(text: str) -> int:
    """A GPU's memory in bytes from "24GB", "24 GiB", "80gb", "24" (GB) or "12288MB".

    GB and GiB mean the same here, 2**30 bytes: GPU memory is made and sold in binary sizes, so
    a "24 GB" card holds 24 GiB (nvidia-smi lists it in MiB), not 24e9 bytes.

    Examples:
        >>> from lowrank.memory import parse_gpu_memory
        >>> parse_gpu_memory("24GB") == parse_gpu_memory("24 GiB") == 24 * 2**30
        True
        >>> parse_gpu_memory("12288MB") == 12 * 2**30
        True
        >>> parse_gpu_memory("24 furlongs")
        Traceback (most recent call last):
        ...
        ValueError: GPU memory must be a size such as 24GB, 24GiB or 80GB, got '24 furlongs'
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gb|gib|g|mb|mib|m|)\s*", str(text), re.I)
    if not found or float(found.group(1)) <= 0:
        raise ValueError(f"GPU memory must be a size such as 24GB, 24GiB or 80GB, got {text!r}")
    scale = 2**20 if found.group(2).lower().startswith("m") else 2**30
    return int(float(found.group(1)) * scale)

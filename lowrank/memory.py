"""How much memory does fine-tuning this model need? An estimate from its config.json alone.

    >>> from lowrank.memory import estimate_memory
    >>> llama2_7b = {"_name_or_path": "Llama-2-7b", "model_type": "llama",
    ...              "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    ...              "intermediate_size": 11008, "vocab_size": 32000}  # from its config.json
    >>> print(estimate_memory(llama2_7b, method="qlora", batch_size=1, seq_len=512))
    Llama-2-7b: qlora, r=8 on q_proj,v_proj, weights NF4 linears + bf16, batch 1 x 512 tokens
    trainable parameters 4,194,304 of 6,742,609,920 (0.062%)
      weights                    3.9 GB (3.6 GiB)
      adapters                 16.8 MB (16.0 MiB)
      gradients                16.8 MB (16.0 MiB)
      optimizer (AdamW)        33.6 MB (32.0 MiB)
      activations                2.2 GB (2.0 GiB)
      backward working       128.7 MB (122.8 MiB)
      total                      6.2 GB (5.8 GiB)
    fits in 8 GB of GPU memory (counting ~0.5 GB for the CUDA context)

A path to a config.json, or a model folder holding one, works the same:
`estimate_memory("Llama-2-7b/config.json", method="qlora")`.

Framework-free (no torch, no transformers, no weights): `lowrank.shapes` reads the shapes from
the config and `lowrank.accounting.training_memory` turns them into the bytes that do not
depend on the batch:

- weights: every parameter in the storage dtype (fp32, bf16), or, for QLoRA, the blocks'
  linear weights in NF4 (4.5 bits per weight, 4.127 with double quantization; Dettmers et al.
  2023, arXiv:2305.14314, section 3) and the rest (embeddings, norms, biases) in `dtype`;
- adapters: LoRA's A and B in fp32 (Hu et al. 2021, arXiv:2106.09685);
- gradients: one per trainable number; optimizer state: AdamW's two fp32 moments per trainable
  number. Full fine-tuning pays these for every weight, LoRA only for the adapters.

This file adds what sits in memory at the peak of a training step on top of that:

- activations: what autograd keeps from the forward pass for the backward pass, proportional
  to batch_size * seq_len tokens. Per layer and token it is c_h * d_model + c_ff * d_ff numbers.
  The coefficients below were counted by recording every tensor autograd saves
  (torch.autograd.graph.saved_tensors_hooks) in transformers' PyTorch implementations with SDPA
  attention (which keeps no seq_len x seq_len score matrix). A frozen linear layer needs no copy
  of its input for the backward pass (only a trainable weight's gradient x^T dy does), which is
  why LoRA also saves fewer activations. A language model adds its logits and log-probabilities,
  tokens x vocab numbers each, often the largest single tensors of a step;
- working memory: the backward pass of one layer allocates about one layer's activations again
  (gradients of its inputs), and the gradient of the logits;
- with gradient checkpointing, only each block's input (d_model numbers per token) is kept, and
  one block at a time is recomputed during the backward pass.

Not counted: the CUDA context (~0.3-0.5 GB on a GPU), allocator fragmentation, the tokenizer and
data loader. The estimate is checked against peaks measured by `lowrank.torch.measure` in
tests/torch/test_measure.py.
"""

import os
from dataclasses import dataclass, replace

from lowrank._validate import FLOAT_DTYPES, METHODS, check_choice, check_int
from lowrank.accounting import (
    DTYPE_BITS,
    MemoryBreakdown,
    format_bytes,
    param_counts,
    training_memory,
)
from lowrank.shapes import (
    DEFAULT_TARGETS,
    HF_LINEAR_NAMES,
    MODEL_FAMILIES,
    config_to_shape,
    hf_linear_shapes,
    read_config,
)

__all__ = ["MemoryEstimate", "estimate_memory"]

# Saved activations per layer and token, in numbers: (c_h, c_ff) with the base trainable (full)
# and frozen (lora, qlora), plus numbers per token saved outside the blocks (embeddings, final
# norm), in units of d_model. Counted with saved_tensors_hooks (see the module doc).
_ACTIVATION_COEFFICIENTS = {
    # Llama: RMSNorm in fp32, rotary q and k, SwiGLU keeps gate, silu(gate), up, their product.
    "llama": {"full": (10, 4, 3), "frozen": (7, 3, 0)},
    # GPT-2: dropout masks, tanh-GELU keeps several intermediates of its d_ff input.
    "gpt2": {"full": (13, 5, 3), "frozen": (11, 4, 0)},
    # BERT: post-norm LayerNorms, GELU input and output.
    "bert": {"full": (13, 2, 3), "frozen": (11, 1, 0)},
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step's peak, by part; `str()` prints the table.

    `weights`, `adapters`, `gradients`, `optimizer_states` and `activations` read the parts of
    `breakdown`; `total` adds `working` to them.

    Attributes:
        model: the model's name (the config's `_name_or_path`, else its `model_type`).
        method: "full", "lora" or "qlora".
        dtype: storage of the weights that are not 4-bit, and of the activations.
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        r: the LoRA rank.
        targets: the adapted layers, by Hugging Face name.
        gradient_checkpointing: whether only each block's input is kept.
        trainable_params: parameters the optimizer updates.
        total_params: every parameter, adapters included.
        breakdown: `training_memory`'s weights, adapters, gradients and optimizer states, with
            the activations filled in.
        working: the backward pass's temporaries on top of it.

    Examples:
        >>> from lowrank.accounting import format_bytes
        >>> from lowrank.memory import estimate_memory
        >>> gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
        ...         "vocab_size": 50257, "n_positions": 1024}
        >>> estimate = estimate_memory(gpt2, method="lora", batch_size=8, seq_len=512)
        >>> estimate.targets, estimate.trainable_params
        (('c_attn',), 294912)
        >>> format_bytes(estimate.total), estimate.fits(12e9)
        ('4.9 GB (4.6 GiB)', True)
    """

    model: str
    method: str
    dtype: str
    batch_size: int
    seq_len: int
    r: int
    targets: tuple[str, ...]  # Hugging Face layer names
    gradient_checkpointing: bool
    trainable_params: int
    total_params: int
    breakdown: MemoryBreakdown
    working: int

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
    def total(self) -> int:
        return self.breakdown.total + self.working

    def fits(self, gpu_bytes: float) -> bool:
        """Whether the estimate fits in `gpu_bytes` (e.g. 12e9), leaving ~0.5 GB for the
        CUDA context and fragmentation."""
        return self.total + 0.5e9 <= gpu_bytes

    def __str__(self) -> str:
        adapted = "" if self.method == "full" else f", r={self.r} on {','.join(self.targets)}"
        checkpointing = ", gradient checkpointing" if self.gradient_checkpointing else ""
        weights = {"qlora": "NF4 linears + " + self.dtype}.get(self.method, self.dtype)
        lines = [
            f"{self.model}: {self.method}{adapted}, weights {weights}, batch {self.batch_size} "
            f"x {self.seq_len} tokens{checkpointing}",
            f"trainable parameters {self.trainable_params:,} of {self.total_params:,} "
            f"({self.trainable_params / self.total_params:.3%})",
        ]
        parts = {
            "weights": self.weights,
            "adapters": self.adapters,
            "gradients": self.gradients,
            "optimizer (AdamW)": self.optimizer_states,
            "activations": self.activations,
            "backward working": self.working,
        }
        for name, n_bytes in parts.items():
            lines.append(f"  {name:<18} {format_bytes(n_bytes):>24}")
        lines.append(f"  {'total':<18} {format_bytes(self.total):>24}")
        for gb in (8, 12, 16, 24, 48, 80):
            if self.fits(gb * 1e9):
                lines.append(
                    f"fits in {gb} GB of GPU memory (counting ~0.5 GB for the CUDA context)"
                )
                break
        else:
            lines.append("does not fit in 80 GB of GPU memory")
        return "\n".join(lines)


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
) -> MemoryEstimate:
    """Estimate the peak memory of one training step; see the module doc for each part.

    config: a Hugging Face config (dict, config.json path, or model folder).
    method: "full" (every weight trains), "lora" or "qlora" (adapters on `targets`, Hugging Face
        layer names; default: the architecture's query and value projections,
        `DEFAULT_TARGETS`; "all-linear" for every linear layer of the blocks). QLoRA stores the
        blocks' linear weights in NF4.
    dtype: storage of the weights that are not 4-bit, and of the activations.
    lm_head: count logits over the vocabulary (default: True for decoders, False for encoders).

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
        full 6.7 GB (6.2 GiB)
        lora 4.9 GB (4.6 GiB)
        qlora 4.8 GB (4.5 GiB)
        >>> full = estimate_memory(gpt2, method="full", batch_size=8, seq_len=512,
        ...                        gradient_checkpointing=True)
        >>> format_bytes(full.activations)  # block inputs only
        '1.7 GB (1.6 GiB)'
    """
    check_choice("method", method, METHODS)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("r", r)):
        check_int(name, value)
    check_choice("dtype", dtype, FLOAT_DTYPES)
    config = read_config(config)
    shape = config_to_shape(config)
    family = MODEL_FAMILIES[config["model_type"]]
    per_layer = hf_linear_shapes(config)
    if targets is None:
        targets = DEFAULT_TARGETS[config["model_type"]]
    elif targets in ("all-linear", ["all-linear"]):
        targets = list(per_layer)
    unknown = [t for t in targets if t not in per_layer]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; this architecture has {list(per_layer)}")
    if not targets and method != "full":
        raise ValueError(
            f"method {method!r} needs targets; this architecture has {list(per_layer)}"
        )
    shape_keys = [HF_LINEAR_NAMES[family][t] for t in targets]  # "c_attn" -> "qkv"
    breakdown = training_memory(
        shape,
        method=method,
        r=r,
        targets=shape_keys,
        weight_dtype="nf4" if method == "qlora" else dtype,
        unquantized_dtype=dtype,
        adapter_dtype="fp32",
        optimizer="adamw",
        double_quant=double_quant,
    )
    counts = param_counts(shape, method=method, r=r, targets=shape_keys)

    element = DTYPE_BITS[dtype] // 8  # bytes per activation
    tokens = batch_size * seq_len
    c_h, c_ff, c_outside = _ACTIVATION_COEFFICIENTS[family][
        "full" if method == "full" else "frozen"
    ]
    layer_numbers = tokens * (c_h * shape.d_model + c_ff * shape.d_ff)
    outside_numbers = tokens * c_outside * shape.d_model
    if gradient_checkpointing:  # block inputs only, and one block recomputed at a time
        activations = (tokens * shape.d_model * shape.n_layers + outside_numbers) * element
    else:
        activations = (layer_numbers * shape.n_layers + outside_numbers) * element
    working = layer_numbers * element  # one block's recomputed activations or input gradients
    if lm_head if lm_head is not None else family != "bert":
        logits = tokens * shape.vocab_size * 4  # the loss is computed in fp32
        activations += 2 * logits  # logits and log-probabilities
        working += logits  # their gradient
    return MemoryEstimate(
        model=shape.name,
        method=method,
        dtype=dtype,
        batch_size=batch_size,
        seq_len=seq_len,
        r=r,
        targets=tuple(targets),
        gradient_checkpointing=gradient_checkpointing,
        trainable_params=counts.trainable,
        total_params=counts.total,
        breakdown=replace(breakdown, activations=activations),
        working=working,
    )

"""What autograd keeps for the backward pass of one training step, by kind, from a config alone.

Framework-free (no torch): `saved_activations` counts, for a Hugging Face config, the tensors
that transformers' PyTorch models (Llama, GPT-2, BERT families) save for their backward pass,
and the memory the backward pass allocates on top of them at its peak. The counts were read off
real steps by recording every saved tensor with `torch.autograd.graph.saved_tensors_hooks` (one
storage counted once; `lowrank estimate --measure` prints the same census next to these
numbers) and by following resident memory op by op. Where LoRA (Hu et al. 2021,
arXiv:2106.09685) and QLoRA (Dettmers et al. 2023, arXiv:2305.14314) change what is saved:

- a frozen linear layer saves no copy of its input (only a trainable weight's gradient needs
  it); QLoRA's 4-bit base (`lowrank.torch.qlora.Linear4bit`) saves only its packed codes and
  scales, which are buffers, not activations;
- each adapted layer saves its input x for A's gradient and h = x A^T for B's. Layers that read
  the same tensor (q, k and v; gate and up) share it in fp32; in a 16-bit model every adapted
  layer casts x to its fp32 adapter dtype and saves its own copy (4 bytes a number). `down_proj`'s
  input is d_ff wide: adapting every linear layer costs more activations than q and v;
- a DoRA layer (Liu et al. 2024, arXiv:2402.09353; `lowrank.torch.dora`) also saves, for its
  magnitude's gradient, the base output and the scaled LoRA output, out numbers each in fp32
  (8 bytes a token per output feature: measured on a tiny Llama, QLoRA on every linear layer,
  +78.8 MB for 1,024 tokens, exactly this count). Its norm ||W + sBA||_c is detached, so the
  (out, in) matrix it is computed from is transient forward work, not kept.

Attention (`attention_kernel`). transformers picks `attn_implementation="sdpa"` unless the
config names another (`_attn_implementation`; "eager" is the plain kernel). PyTorch's SDPA then
picks a backend: on CUDA the flash (16-bit) or memory-efficient (fp32) kernel, both fused, both
with dropout and grouped-query attention, so only q, k, v, the output and a log-sum-exp per row
are saved; on a CPU the fused flash kernel runs only without dropout, and with attention dropout
> 0 in training SDPA falls back to its math kernel, which keeps the (batch, heads, seq, seq)
probabilities, the dropout mask and the dropped probabilities: 3 x heads x seq numbers per token
and layer, in fp32 on a CPU whatever the model's dtype (eager attention keeps the probabilities
without dropout too). Assumed: no padding mask (a mask makes CUDA's memory-efficient kernel keep
it), head_dim <= 256, and model, activations and loss in `dtype` without autocast.

Hidden-state dropout masks: a float tensor of the activation dtype on a CPU, one byte (bool) on
CUDA.

Working memory of the backward pass: a language model's first backward ops hold the gradients
of the log-probabilities and of the logits (tokens x vocab, fp32 each) while everything saved is
still alive, the peak of most steps; one block's input gradients (about 2 x d_ff numbers a token)
are the other candidate. With gradient checkpointing only each block's input (d_model numbers a
token) is kept, and one block is recomputed at a time during the backward pass, so its saved
activations come back as working memory.
"""

from dataclasses import dataclass, field

from lowrank.accounting import DTYPE_BITS, lora_parameters, lora_target_shapes
from lowrank.shapes import MODEL_FAMILIES, TransformerShape

__all__ = ["ACTIVATION_KINDS", "ATTENTION_KERNELS", "Activations", "attention_kernel",
           "saved_activations"]  # fmt: skip

ACTIVATION_KINDS = (
    "adapter inputs",  # x for A's gradient (an fp32 copy per layer in 16 bits), h = x A^T for B's
    "linear inputs",  # a trainable weight's input (full fine-tuning)
    "attention",  # q, k, v, the output, softmax statistics
    "attention scores",  # (seq x seq) probabilities, dropout mask: unfused kernels only
    "MLP",  # the activation function's input and intermediates, the gate
    "norms",  # norm inputs (and RMSNorm's normalised output when its weight trains)
    "dropout masks",  # hidden-state dropout
    "block inputs",  # gradient checkpointing: each block's input, all that is kept of it
    "logits and loss",  # log-probabilities over the vocabulary, or the hidden state the loss reads
)
ATTENTION_KERNELS = {
    "fused": "fused SDPA kernel (flash / memory-efficient): no seq x seq matrix kept",
    "unfused": "unfused attention (eager, or SDPA's math kernel: CPU with attention dropout): "
    "seq x seq probabilities kept",
}

# family -> config keys (with transformers' defaults) of attention and hidden-state dropout,
# and the activation function.
_DROPOUT_KEYS = {
    "llama": (("attention_dropout", 0.0), None),
    "gpt2": (("attn_pdrop", 0.1), ("resid_pdrop", 0.1)),
    "bert": (("attention_probs_dropout_prob", 0.1), ("hidden_dropout_prob", 0.1)),
}
_ACTIVATION_KEYS = {"llama": ("hidden_act", "silu"), "gpt2": ("activation_function", "gelu_new"),
                    "bert": ("hidden_act", "gelu")}  # fmt: skip
_COMPOSED_ACTIVATIONS = ("gelu_new", "gelu_fast")  # tanh-GELU in elementwise ops: 4 saved
# family -> {input: the linear layers (shape keys) that read it}
_INPUT_GROUPS = {
    "llama": {"attn": ("q", "k", "v"), "o": ("o",), "mlp": ("gate", "up"), "down": ("down",)},
    "gpt2": {"attn": ("qkv",), "o": ("o",), "mlp": ("up",), "down": ("down",)},
    "bert": {"attn": ("q", "k", "v"), "o": ("o",), "mlp": ("up",), "down": ("down",)},
}


@dataclass(frozen=True)
class Activations:
    """Saved activations by kind, and the backward pass's working memory, in bytes.

    Attributes:
        saved: kind (`ACTIVATION_KINDS`) -> bytes kept from the forward pass for the backward.
        working: bytes the backward pass allocates on top of `saved` at its peak, early on
            (the head's gradients, or a recomputed block), before any gradient exists.
        working_with_gradients: what the end of the backward pass holds beside the gradients,
            counted against all of them: with checkpointing, the first block recomputed (its
            own and the embeddings' gradients not made yet); otherwise 0.
        step_working: the optimizer step's temporaries (beside every gradient).
        kernel: the attention kernel assumed, a key of `ATTENTION_KERNELS`.

    Examples:
        >>> from lowrank.activations import Activations
        >>> Activations(saved={"MLP": 3, "norms": 1}, working=2).total
        4
    """

    saved: dict[str, int] = field(default_factory=dict)
    working: int = 0
    working_with_gradients: int = 0
    step_working: int = 0
    kernel: str = "fused"

    @property
    def total(self) -> int:
        return sum(self.saved.values())


def attention_kernel(config: dict, *, device: str) -> str:
    """The attention kernel a training step of `config` runs on `device` ("cuda" or "cpu"):
    "fused" or "unfused" (see the module doc).

    Examples:
        >>> from lowrank.activations import attention_kernel
        >>> bert = {"model_type": "bert"}  # attention_probs_dropout_prob: 0.1 by default
        >>> attention_kernel(bert, device="cpu")  # SDPA's math kernel
        'unfused'
        >>> attention_kernel(bert, device="cuda")  # memory-efficient (fp32) or flash (16-bit)
        'fused'
        >>> attention_kernel({**bert, "attention_probs_dropout_prob": 0.0}, device="cpu")
        'fused'
    """
    implementation = config.get("_attn_implementation") or config.get("attn_implementation")
    if implementation == "eager":
        return "unfused"
    dropout = _value(config, *_DROPOUT_KEYS[MODEL_FAMILIES[config["model_type"]]][0])
    return "unfused" if device != "cuda" and dropout > 0 else "fused"


def saved_activations(
    config: dict,
    shape: TransformerShape,
    family: str,
    *,
    method: str,
    adapted: tuple[str, ...],
    tokens: int,
    seq_len: int,
    r: int,
    dtype: str,
    device: str,
    gradient_checkpointing: bool,
    lm_head: bool,
    dora: bool = False,
) -> Activations:
    """What one step of `tokens` tokens (sequences of `seq_len`) saves and works with.

    config: the Hugging Face config (dropout and activation keys); shape and family: what
    `lowrank.shapes` reads from it; adapted: the shape keys of the adapted layers ("q", "v",
    ...); method "full" trains every weight; dora: DoRA adapters (two more fp32 tensors of
    the layer's output width each). See the module doc for each part.

    Examples:
        >>> from lowrank.activations import saved_activations
        >>> from lowrank.shapes import config_to_shape
        >>> llama = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
        ...          "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 8000}
        >>> common = dict(method="qlora", tokens=1024, seq_len=128, r=8, dtype="fp32",
        ...               device="cpu", gradient_checkpointing=False, lm_head=True)
        >>> qv = saved_activations(llama, config_to_shape(llama), "llama", adapted=("q", "v"),
        ...                        **common)
        >>> every = saved_activations(llama, config_to_shape(llama), "llama",
        ...     adapted=("q", "k", "v", "o", "gate", "up", "down"), **common)
        >>> (every.saved["adapter inputs"] - qv.saved["adapter inputs"]) // 2**20  # MiB
        15
        >>> qv.saved["logits and loss"] == 1024 * 8000 * 4  # log-probabilities, fp32
        True
    """
    act = DTYPE_BITS[dtype] // 8  # bytes per activation
    mask = 1 if device == "cuda" else act  # a dropout mask: bool on CUDA, float on a CPU
    d, ff, heads = shape.d_model, shape.d_ff, shape.n_heads
    kv = shape.n_kv_heads * shape.head_dim
    trains = method == "full"
    kernel = attention_kernel(config, device=device)
    (attn_key, attn_default), hidden = _DROPOUT_KEYS[family]
    attn_dropout = _value(config, attn_key, attn_default) > 0
    hidden_dropout = hidden is not None and _value(config, *hidden) > 0
    act_name = _value(config, *_ACTIVATION_KEYS[family])
    block: list[tuple[str, float, int]] = []  # (kind, numbers per token and layer, bytes each)

    # the inputs of the linear layers: saved for a trainable weight, or for the adapters
    widths = {"attn": d, "o": d, "mlp": d, "down": ff}
    for group, keys in _INPUT_GROUPS[family].items():
        # a fused kernel's output is the o input itself, already saved by the kernel
        shared_with_kernel = group == "o" and kernel == "fused"
        if trains and not shared_with_kernel:
            block.append(("linear inputs", widths[group], act))
        ours = [key for key in keys if key in adapted]
        if ours and act != 4:  # each layer casts x to fp32: its own copy
            block.append(("adapter inputs", widths[group] * len(ours), 4))
        elif ours and not (trains or shared_with_kernel):  # fp32: one tensor for the group
            block.append(("adapter inputs", widths[group], 4))
        block.append(("adapter inputs", r * len(ours), 4))  # h = x A^T per adapted layer
        if dora:  # m's gradient reads the base output and the scaled LoRA output, fp32 each
            outs = sum(shape.linear_shapes()[key][0] for key in ours)
            block.append(("adapter inputs", 2 * outs, 4))

    # attention: the kernel's inputs and what it keeps of the scores
    if kernel == "fused":
        block += [("attention", 2 * d + 2 * kv, act), ("attention", heads, 4)]  # q k v out, lse
    else:  # SDPA's math kernel computes in fp32 on a CPU
        exact = 4 if device != "cuda" else act
        block.append(("attention", 3 * d, exact))  # q, k, v as the kernel's matmuls read them
        probabilities = heads * seq_len  # per token: one row of (seq x seq) per head
        block.append(("attention scores", probabilities, exact))
        if attn_dropout:  # the mask, and the dropped probabilities
            block += [("attention scores", probabilities, 4 if device != "cuda" else 1),
                      ("attention scores", probabilities, exact)]  # fmt: skip

    # MLP and norms
    saves = 4 if act_name in _COMPOSED_ACTIVATIONS else 1
    if shape.gated_mlp:  # act(gate) * up keeps both factors
        block.append(("MLP", (saves + 2) * ff, act))
    else:
        block.append(("MLP", saves * ff, act))
    if shape.norm == "rmsnorm":  # computed in fp32; the normalised output kept if trained
        block.append(("norms", 2 * d + 2, 4))
        if trains:
            block.append(("norms", 2 * d, act))
    else:  # LayerNorm keeps its input, a mean and a reciprocal deviation
        block += [("norms", 2 * d, act), ("norms", 4, 4)]
    if hidden_dropout:
        block.append(("dropout masks", 2 * d, mask))

    saved = dict.fromkeys(ACTIVATION_KINDS, 0)
    per_block = dict.fromkeys(ACTIVATION_KINDS, 0)
    for kind, numbers, nbytes in block:
        per_block[kind] += round(tokens * numbers * nbytes)
    block_bytes = sum(per_block.values())
    if gradient_checkpointing:
        saved["block inputs"] = shape.n_layers * tokens * d * act
    else:
        for kind, n_bytes in per_block.items():
            saved[kind] += shape.n_layers * n_bytes

    # outside the blocks. The embeddings' output needs a gradient when they train, and with
    # checkpointing (transformers then calls enable_input_require_grads). Otherwise the first
    # block's first norm (GPT-2, Llama) saves nothing, which cancels the final norm's input.
    norm_bytes = 4 if shape.norm == "rmsnorm" else act
    embeddings_need_grad = trains or gradient_checkpointing
    if family == "bert" and embeddings_need_grad:  # the embeddings' LayerNorm and dropout
        saved["norms"] += tokens * d * act
        saved["dropout masks"] += tokens * d * mask if hidden_dropout else 0
    elif family != "bert" and embeddings_need_grad:  # the final norm; GPT-2's embedding dropout
        saved["norms"] += tokens * d * norm_bytes
        saved["dropout masks"] += tokens * d * mask if hidden_dropout else 0
    if trains and family != "bert":  # the head's input; RMSNorm's normalised output
        saved["linear inputs"] += tokens * d * act
        saved["norms"] += tokens * d * act if shape.norm == "rmsnorm" else 0
    if lm_head:
        saved["logits and loss"] += tokens * shape.vocab_size * 4  # fp32 log-probabilities
        head_working = 2 * tokens * shape.vocab_size * 4  # their gradient, the logits'
    else:
        saved["logits and loss"] += tokens * d * act  # the loss reads the last hidden state
        head_working = tokens * d * act
    block_working = 2 * tokens * ff * act  # one block's input gradients
    late = 0  # beside every gradient but those of the embeddings and the first block
    if gradient_checkpointing:
        block_working += block_bytes  # the block being recomputed
        groups = shape.param_groups()
        unmade = groups["embeddings"] + (groups["linear weights"] + groups["linear biases"]) // (
            shape.n_layers
        )
        late = max(0, block_working - unmade * act) if trains else block_working
    # the blocks' backward comes after the head's, which has freed the log-probabilities
    return Activations(
        saved={kind: n for kind, n in saved.items() if n},
        working=max(head_working, block_working - saved["logits and loss"]),
        working_with_gradients=late,
        step_working=_step_working(shape, method, r, adapted, device, dora),
        kernel=kernel,
    )


def _step_working(
    shape: TransformerShape, method: str, r: int, adapted, device: str, dora: bool
) -> int:
    """AdamW's temporaries in its step (fp32): CUDA's foreach loop one as large as all trainable
    parameters together, a CPU's loop over parameters two as large as the largest one."""
    linears = shape.linear_shapes()
    if method == "full":
        sizes = [out * in_ for out, in_ in linears.values()] + [shape.vocab_size * shape.d_model]
        total = shape.n_params()
    else:
        sizes = [r * max(linears[key]) for key in adapted]
        total = lora_parameters(lora_target_shapes(shape, adapted), r, dora=dora)
    return 4 * total if device == "cuda" else 2 * 4 * max(sizes)


def _value(config: dict, key: str, default):
    """config[key], or transformers' default where it is absent or null."""
    value = config.get(key)
    return default if value is None else value

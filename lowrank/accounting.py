"""Parameter, byte and training-memory accounting for full fine-tuning, LoRA and QLoRA.

Framework-free (no numpy, no torch): plain integers from layer shapes or a transformer
description, so a plan for GPT-3 175B costs nothing to compute.

What this file makes explicit is WHERE LoRA's savings come from (Hu et al. 2021,
arXiv:2106.09685, section 4.2; QLoRA: Dettmers et al. 2023, arXiv:2305.14314):

- trainable parameters: LoRA trains r * (in + out) numbers per adapted (out, in) matrix instead of
  every weight. GPT-3 175B, r=4 on W_q and W_v: 18.9M instead of 175B, about 10,000x fewer.
- checkpoint size: only the adapters are saved, so the same ~10,000x (350 GB -> ~36 MiB in fp16).
- training memory (VRAM): the frozen weights still sit on the GPU. LoRA saves their gradients
  and optimizer states, so memory falls by a factor of about 3-6 (the paper: 1.2 TB -> 350 GB),
  NOT 10,000. QLoRA then shrinks the frozen weights themselves to ~4.127 bits each.

`lora_paper_claims()` and `qlora_paper_claims()` put the papers' headline numbers next to ours.

Units: bytes are plain integers. `format_bytes` prints decimal units (GB = 10^9 bytes, as the
papers write them) with the binary unit (GiB = 2^30 bytes) beside it; "35MB" in the LoRA paper
is 37.7e6 bytes = 36.0 MiB.
"""

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "sgd")
FLOAT_DTYPES = ("fp32", "fp16", "bf16")
FOUR_BIT_DTYPES = ("nf4", "fp4")
QUANTIZED_DTYPES = ("int8", *FOUR_BIT_DTYPES)  # applied to the blocks' linear weights only
DTYPE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "nf4": 4, "fp4": 4}

# bitsandbytes' double quantization quantizes the fp32 absmax values in blocks of 256.
DOUBLE_QUANT_BLOCKSIZE = 256


def _check_int(value: int, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _as_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """A target name or names as a tuple: "q" -> ("q",)."""
    return (targets,) if isinstance(targets, str) else tuple(targets)


def _check_blocksize(blocksize: int) -> None:
    _check_int(blocksize, "blocksize", low=1)
    if blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a positive power of two, got {blocksize}")


# --- shapes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerShape:
    """The sizes that decide a decoder or encoder transformer's parameter count.

    Each of the n_layers blocks holds attention projections q, k, v, o and an MLP (up/down, or
    Llama's gate/up/down when gated_mlp), plus two norms. Outside the blocks: token embeddings,
    learned position and token-type embeddings if any, one more norm (GPT and Llama's final norm,
    BERT's embedding norm) and an output head unless it is tied to the token embeddings.
    d_ff and n_kv_heads are filled in when left as None, so `shape.d_ff` is always the width
    (and `dataclasses.replace(shape, d_model=...)` keeps the old d_ff: pass both).
    """

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int | None = None  # MLP width; None means 4 * d_model
    vocab_size: int = 0
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads (multi-head)
    gated_mlp: bool = False  # Llama: down(silu(gate(x)) * up(x))
    bias: bool = True  # linear layers carry biases (GPT, BERT) or not (Llama)
    norm: str = "layernorm"  # "layernorm" (weight and bias) or "rmsnorm" (weight only)
    max_positions: int = 0  # learned position embeddings (GPT, BERT); 0 for rotary (Llama)
    n_token_types: int = 0  # BERT's segment embeddings
    tie_embeddings: bool = True  # output head shares the token embedding matrix

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads"):
            _check_int(getattr(self, name), name, low=1)
        # fill in the defaults that depend on other fields (frozen, hence object.__setattr__)
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("d_ff", "n_kv_heads"):
            _check_int(getattr(self, name), name, low=1)
        for name in ("vocab_size", "max_positions", "n_token_types"):
            _check_int(getattr(self, name), name, low=0)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """The linear layers of ONE block: name -> (out, in), the shape of the weight W.

        q, k, v, o are the paper's W_q, W_k, W_v, W_o; up and down the MLP (plus gate if gated).
        With grouped-query attention k and v map d_model to n_kv_heads * head_dim.
        """
        d, kv, ff = self.d_model, self.n_kv_heads * self.head_dim, self.d_ff
        shapes = {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d)}
        if self.gated_mlp:
            shapes["gate"] = (ff, d)
        shapes["up"] = (ff, d)
        shapes["down"] = (d, ff)
        return shapes

    def param_groups(self) -> dict[str, int]:
        """Where the parameters live, by kind; the values sum to n_params()."""
        linears = self.linear_shapes().values()
        norm_size = 2 * self.d_model if self.norm == "layernorm" else self.d_model
        embedding_rows = self.vocab_size + self.max_positions + self.n_token_types
        return {
            "linear weights": self.n_layers * sum(out * in_ for out, in_ in linears),
            "linear biases": self.n_layers * sum(out for out, _ in linears) if self.bias else 0,
            "norms": (2 * self.n_layers + 1) * norm_size,
            "embeddings": embedding_rows * self.d_model,
            "output head": 0 if self.tie_embeddings else self.vocab_size * self.d_model,
        }

    def n_params(self) -> int:
        """Every parameter of the model: blocks, embeddings, norms and an untied output head.

        Matches Hugging Face's base models (BertModel without its pooler) and causal-LM models
        (GPT2LMHeadModel, LlamaForCausalLM); task heads and poolers are not counted.
        """
        return sum(self.param_groups().values())


# Presets. Sources: GPT-3 (Brown et al. 2020, arXiv:2005.14165, Table 2.1: d_model 12288,
# 96 layers, 96 heads, d_ff = 4 d_model, context 2048, GPT-2's 50257-token vocabulary);
# RoBERTa (Liu et al. 2019, arXiv:1907.11692, and Hugging Face's roberta-base/large configs:
# vocab 50265, 514 positions, 1 token type); LLaMA (Touvron et al. 2023, arXiv:2302.13971,
# Table 2, and Hugging Face's LlamaConfig: vocab 32000, SwiGLU MLP, RMSNorm, untied head).
GPT3_175B = TransformerShape(
    "GPT-3 175B", d_model=12288, n_layers=96, n_heads=96, vocab_size=50257, max_positions=2048
)
ROBERTA_BASE = TransformerShape(
    "RoBERTa-base", d_model=768, n_layers=12, n_heads=12, vocab_size=50265, max_positions=514,
    n_token_types=1,
)  # fmt: skip
ROBERTA_LARGE = TransformerShape(
    "RoBERTa-large", d_model=1024, n_layers=24, n_heads=16, vocab_size=50265, max_positions=514,
    n_token_types=1,
)  # fmt: skip
_LLAMA = dict(vocab_size=32000, gated_mlp=True, bias=False, norm="rmsnorm", tie_embeddings=False)
LLAMA_7B = TransformerShape("LLaMA-7B", d_model=4096, n_layers=32, n_heads=32, d_ff=11008, **_LLAMA)
LLAMA_65B = TransformerShape(
    "LLaMA-65B", d_model=8192, n_layers=80, n_heads=64, d_ff=22016, **_LLAMA
)


# --- parameter counts -------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    """trainable: parameters the optimizer updates; total: every parameter the model holds
    (a 4-bit weight counts as one parameter)."""

    trainable: int
    total: int

    @property
    def trainable_share(self) -> float:
        """trainable / total, e.g. 1.08e-4 for GPT-3 175B with LoRA r=4 on W_q and W_v."""
        return self.trainable / self.total


def lora_parameters(shapes: Iterable[tuple[int, int]], r: int) -> int:
    """Trainable parameters of LoRA adapters on weights of the given (out, in) shapes:
    A [r, in] plus B [out, r], so r * (in + out) per matrix."""
    _check_int(r, "r", low=1)
    total = 0
    for out, in_ in shapes:
        if r > min(out, in_):
            raise ValueError(f"r={r} exceeds min(out, in) = {min(out, in_)} for shape {(out, in_)}")
        total += r * (in_ + out)
    return total


def lora_target_shapes(shape: TransformerShape, targets: Iterable[str]) -> list[tuple[int, int]]:
    """(out, in) of every adapted matrix in the model: each target once per layer."""
    targets = _as_targets(targets)
    per_layer = shape.linear_shapes()
    unknown = [t for t in targets if t not in per_layer]
    if unknown or not targets:
        raise ValueError(
            f"targets must be a non-empty selection of {list(per_layer)}, got {list(targets)}"
        )
    return [per_layer[t] for t in targets] * shape.n_layers


def param_counts(
    shape: TransformerShape, *, method: str, r: int = 8, targets: Iterable[str] = ("q", "v")
) -> ParamCounts:
    """Trainable and total parameters for a fine-tuning method.

    full: everything trains. lora / qlora: only the adapters on `targets` (names from
    `shape.linear_shapes()`) train; the total is the model plus the adapters. QLoRA stores the
    frozen weights in 4 bits but has the same counts as LoRA.
    """
    _check_choice(method, "method", METHODS)
    if method == "full":
        return ParamCounts(trainable=shape.n_params(), total=shape.n_params())
    adapters = lora_parameters(lora_target_shapes(shape, targets), r)
    return ParamCounts(trainable=adapters, total=shape.n_params() + adapters)


# --- bytes ------------------------------------------------------------------------------------


def bits_per_weight(dtype: str, *, blocksize: int = 64, double_quant: bool = True) -> float:
    """Storage cost of one weight in bits, quantization constants included, on large tensors.

    fp32 32, fp16/bf16 16, int8 8 (a scheme's scales, such as LLM.int8's one fp32 per row, are
    not counted). 4-bit nf4/fp4 (QLoRA, section 3): 4 bits per weight plus one fp32 absmax per
    block, 4 + 32/blocksize = 4.5 at blocksize 64; double quantization stores that absmax as one
    byte and adds one fp32 per 256 blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits.
    """
    _check_choice(dtype, "dtype", tuple(DTYPE_BITS))
    if dtype not in FOUR_BIT_DTYPES:
        return float(DTYPE_BITS[dtype])
    _check_blocksize(blocksize)
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * DOUBLE_QUANT_BLOCKSIZE)
    return 4 + 32 / blocksize


def tensor_bytes(n: int, dtype: str, *, blocksize: int = 64, double_quant: bool = True) -> int:
    """Exact bytes to store a tensor of n elements.

    4-bit: ceil(n/2) bytes of packed codes plus, per block of `blocksize` elements, an fp32
    absmax, or with double quantization a uint8 absmax code, one fp32 scale per 256 blocks and
    one fp32 offset (the layout of bitsandbytes.functional.quantize_4bit).
    """
    _check_int(n, "n", low=0)
    _check_choice(dtype, "dtype", tuple(DTYPE_BITS))
    if dtype not in FOUR_BIT_DTYPES:
        return n * DTYPE_BITS[dtype] // 8
    _check_blocksize(blocksize)
    packed = math.ceil(n / 2)
    n_blocks = math.ceil(n / blocksize)
    if not double_quant:
        return packed + 4 * n_blocks
    return packed + n_blocks + 4 * math.ceil(n_blocks / DOUBLE_QUANT_BLOCKSIZE) + 4


def weight_bytes(
    shape: TransformerShape, dtype: str, *, blocksize: int = 64, double_quant: bool = True
) -> int:
    """Bytes of the model's weights stored in `dtype`.

    For the quantized dtypes (int8, nf4, fp4) only the blocks' linear weights are quantized, each
    matrix on its own, as bitsandbytes does when Hugging Face loads a model in 8 or 4 bits;
    biases, norms, embeddings and the output head stay in 16 bits.
    """
    _check_choice(dtype, "dtype", tuple(DTYPE_BITS))
    if dtype not in QUANTIZED_DTYPES:
        return tensor_bytes(shape.n_params(), dtype)
    linears = shape.linear_shapes().values()
    quantized = shape.n_layers * sum(
        tensor_bytes(out * in_, dtype, blocksize=blocksize, double_quant=double_quant)
        for out, in_ in linears
    )
    rest = shape.n_params() - shape.param_groups()["linear weights"]
    return quantized + tensor_bytes(rest, "bf16")


def adapter_checkpoint_bytes(
    shape: TransformerShape, *, r: int = 8, targets: Iterable[str] = ("q", "v"), dtype: str = "fp16"
) -> int:
    """Bytes of a saved LoRA adapter (A and B of every target; the file's small header aside).
    The full fine-tuning checkpoint to compare with is weight_bytes(shape, dtype)."""
    _check_choice(dtype, "dtype", FLOAT_DTYPES)
    return tensor_bytes(lora_parameters(lora_target_shapes(shape, targets), r), dtype)


# --- training memory --------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBreakdown:
    """GPU memory of training, in bytes, by what it holds.

    weights: the model's own weights (frozen under LoRA; 4-bit linears under QLoRA).
    adapters: LoRA's A and B. gradients: one per trainable parameter.
    optimizer_states: AdamW's two fp32 moments per trainable parameter (0 for plain SGD).
    master_weights: fp32 copies of 16-bit trainable parameters in mixed-precision training.
    activations: what the forward pass keeps for the backward; 0 here (it depends on batch and
    sequence length; `dataclasses.replace(breakdown, activations=...)` fills it in).
    """

    weights: int
    adapters: int
    gradients: int
    optimizer_states: int
    master_weights: int = 0
    activations: int = 0
    label: str = field(default="", compare=False)  # what was estimated, for printing

    def as_dict(self) -> dict[str, int]:
        """Name -> bytes of every part, with the total last."""
        parts = {k: v for k, v in asdict(self).items() if k != "label"}
        return {**parts, "total": sum(parts.values())}

    @property
    def total(self) -> int:
        return self.as_dict()["total"]

    def __str__(self) -> str:
        lines = [self.label] if self.label else []
        lines += [f"{name:<17} {format_bytes(n):>24}" for name, n in self.as_dict().items()]
        if self.activations == 0:
            lines.append("(activations not counted)")
        return "\n".join(lines)


def training_memory(
    shape: TransformerShape,
    *,
    method: str,
    r: int = 8,
    targets: Iterable[str] = ("q", "v"),
    weight_dtype: str | None = None,
    adapter_dtype: str = "fp32",
    optimizer: str = "adamw",
    master_weights: bool = False,
    blocksize: int = 64,
    double_quant: bool = True,
) -> MemoryBreakdown:
    """Bytes of GPU memory to fine-tune `shape`, activations excluded.

    weight_dtype: storage of the model's weights; default bf16 for full and lora, nf4 for qlora
    (which needs nf4 or fp4; 4-bit weights belong to qlora only).
    adapter_dtype: LoRA's A and B and their gradients; fp32 by default, as PEFT upcasts them.
    optimizer: "adamw" keeps two fp32 moments per trainable parameter (8 bytes), "sgd" none.
    master_weights: keep an fp32 copy of 16-bit trainable parameters (mixed precision as in ZeRO,
    Rajbhandari et al. 2020: 2 + 2 + 12 = 16 bytes per parameter for full fine-tuning).

    Full fine-tuning in bf16 with AdamW and no master copy costs 2 + 2 + 8 = 12 bytes per
    parameter: LLaMA-65B -> 783 GB, the QLoRA paper's ">780GB". LoRA keeps the 2-byte frozen
    weights and drops the other 10 bytes for all but the adapters, so it saves at most 6x.
    """
    _check_choice(method, "method", METHODS)
    targets = _as_targets(targets)
    _check_choice(optimizer, "optimizer", OPTIMIZERS)
    _check_choice(adapter_dtype, "adapter_dtype", FLOAT_DTYPES)
    if weight_dtype is None:
        weight_dtype = "nf4" if method == "qlora" else "bf16"
    allowed = {"full": FLOAT_DTYPES, "lora": (*FLOAT_DTYPES, "int8"), "qlora": FOUR_BIT_DTYPES}
    _check_choice(weight_dtype, f"weight_dtype for method={method!r}", allowed[method])

    weights = weight_bytes(shape, weight_dtype, blocksize=blocksize, double_quant=double_quant)
    counts = param_counts(shape, method=method, r=r, targets=targets)
    trainable_dtype = weight_dtype if method == "full" else adapter_dtype
    gradients = tensor_bytes(counts.trainable, trainable_dtype)
    moments = 2 * tensor_bytes(counts.trainable, "fp32") if optimizer == "adamw" else 0
    needs_master = master_weights and trainable_dtype != "fp32"
    adapted = "" if method == "full" else f" r={r} on {'/'.join(targets)}"
    label = f"{shape.name}, {method}{adapted}, weights {weight_dtype}, {optimizer}"
    return MemoryBreakdown(
        weights=weights,
        adapters=0 if method == "full" else tensor_bytes(counts.trainable, adapter_dtype),
        gradients=gradients,
        optimizer_states=moments,
        master_weights=tensor_bytes(counts.trainable, "fp32") if needs_master else 0,
        label=label,
    )


# --- the papers' headline numbers, and which quantity each one is -----------------------------


@dataclass(frozen=True)
class Claim:
    """One headline number from a paper next to our count of the same quantity."""

    quantity: str  # what is compared, e.g. "trainable parameters"
    paper: str  # the paper's words
    before: int  # our count without the method (full fine-tuning)
    after: int  # our count with it
    unit: str  # "parameters" or "bytes"
    note: str = ""

    @property
    def ratio(self) -> float:
        """before / after: how many times smaller."""
        return self.before / self.after

    def __str__(self) -> str:
        show = format_bytes if self.unit == "bytes" else _format_count
        fewer = "fewer" if self.unit == "parameters" else "smaller"
        ratio = f"{self.ratio:,.0f}" if self.ratio >= 100 else f"{self.ratio:.1f}"
        text = (
            f"{self.quantity}: {show(self.before)} -> {show(self.after)} "
            f"({ratio}x {fewer}); paper: {self.paper}"
        )
        return text + (f"\n  {self.note}" if self.note else "")


def lora_paper_claims() -> list[Claim]:
    """The LoRA paper's GPT-3 175B numbers (section 4.2, LoRA r=4 on W_q and W_v) against ours.

    The "10,000x" is trainable parameters and checkpoint size. Training memory falls only
    about 3x (paper) to 6x (our accounting): the frozen 16-bit weights stay on the GPU.
    """
    shape, lora = GPT3_175B, dict(r=4, targets=("q", "v"))
    full_params = param_counts(shape, method="full")
    lora_params = param_counts(shape, method="lora", **lora)
    full_memory = training_memory(shape, method="full", weight_dtype="fp16")
    lora_memory = training_memory(
        shape, method="lora", weight_dtype="fp16", adapter_dtype="fp16", **lora
    )
    return [
        Claim(
            "trainable parameters",
            '"reduce the number of trainable parameters by 10,000 times and the GPU memory '
            'requirement by 3 times" (abstract)',
            full_params.trainable,
            lora_params.trainable,
            "parameters",
        ),
        Claim(
            "checkpoint size (fp16)",
            '"the checkpoint size is reduced by roughly 10,000× (from 350GB to 35MB)"',
            weight_bytes(shape, "fp16"),
            adapter_checkpoint_bytes(shape, dtype="fp16", **lora),
            "bytes",
            "the paper's 35MB is 18,874,368 fp16 parameters = 37.7 MB = 36.0 MiB",
        ),
        Claim(
            "training memory (VRAM), activations excluded",
            '"we reduce the VRAM consumption during training from 1.2TB to 350GB" (about 3.4x)',
            full_memory.total,
            lora_memory.total,
            "bytes",
            "ours: fp16 weights and gradients, fp32 AdamW moments (12 bytes per parameter). "
            "The paper measured 1.2TB without a breakdown and credits the optimizer states "
            "('up to 2/3'). Either way the 350 GB of frozen fp16 weights stay: 3-6x, not 10,000x.",
        ),
    ]


def qlora_paper_claims() -> list[Claim]:
    """The QLoRA paper's LLaMA-65B numbers (section 1) against ours: LoRA r=64 on every linear
    layer of the blocks, as the paper's Guanaco runs; NF4 with double quantization."""
    shape = LLAMA_65B
    qlora = dict(r=64, targets=tuple(shape.linear_shapes()), adapter_dtype="bf16")
    full_memory = training_memory(shape, method="full", weight_dtype="bf16")
    qlora_memory = training_memory(shape, method="qlora", **qlora)
    return [
        Claim(
            "weights",
            "NF4 with double quantization: 4.127 bits per weight (section 3)",
            weight_bytes(shape, "bf16"),
            weight_bytes(shape, "nf4"),
            "bytes",
            "embeddings, output head and norms stay in 16 bits",
        ),
        Claim(
            "training memory, activations excluded",
            '"from >780GB of GPU memory to <48GB" (a measured average, activations included)',
            full_memory.total,
            qlora_memory.total,
            "bytes",
            "ours: full = bf16 weights and gradients + fp32 AdamW moments (12 bytes per "
            "parameter); QLoRA = 4-bit frozen weights + bf16 adapters, their gradients and "
            "fp32 moments",
        ),
    ]


# --- formatting -------------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    """Bytes in decimal units (as the papers write them) with the binary unit beside:
    format_bytes(37_748_736) == '37.7 MB (36.0 MiB)'."""
    decimal = _scaled(n, 1000, ("B", "kB", "MB", "GB", "TB", "PB"))
    binary = _scaled(n, 1024, ("B", "KiB", "MiB", "GiB", "TiB", "PiB"))
    return decimal if n < 1000 else f"{decimal} ({binary})"


def _scaled(n: float, base: int, units: tuple[str, ...]) -> str:
    exponent = 0
    while abs(n) >= base ** (exponent + 1) and exponent < len(units) - 1:
        exponent += 1
    if exponent == 0:
        return f"{n:,.0f} {units[0]}"
    return f"{n / base**exponent:,.1f} {units[exponent]}"


def _format_count(n: int) -> str:
    """18874368 -> '18,874,368 (18.9M)'."""
    return f"{n:,} ({_scaled(n, 1000, ('', 'K', 'M', 'B', 'T')).replace(' ', '')})"

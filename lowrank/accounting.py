"""Parameter, byte and training-memory accounting for full fine-tuning, LoRA and QLoRA.

Framework-free (no numpy, no torch): plain integers from layer shapes or a transformer
description (`lowrank.shapes`), so a plan for GPT-3 175B costs nothing to compute.

What this file makes explicit is WHERE LoRA's savings come from (Hu et al. 2021,
arXiv:2106.09685, section 4.2; QLoRA: Dettmers et al. 2023, arXiv:2305.14314):

- trainable parameters: LoRA trains r * (in + out) numbers per adapted (out, in) matrix instead of
  every weight. GPT-3 175B, r=4 on W_q and W_v: 18.9M instead of 175B, about 10,000x fewer.
- checkpoint size: only the adapters are saved, so the same ~10,000x (350 GB -> ~36 MiB in fp16).
- training memory (VRAM): the frozen weights still sit on the GPU. LoRA saves their gradients
  and optimizer states, so memory falls by a factor of about 3-6 (the paper: 1.2 TB -> 350 GB),
  NOT 10,000. QLoRA then shrinks the frozen weights themselves to ~4.127 bits each.

`lowrank.claims` puts the papers' headline numbers next to these counts; `lowrank.memory` adds
activations to `training_memory` for a whole training step.

Units: bytes are plain integers. `format_bytes` prints decimal units (GB = 10^9 bytes, as the
papers write them) with the binary unit (GiB = 2^30 bytes) beside it; "35MB" in the LoRA paper
is 37.7e6 bytes = 36.0 MiB.

Constants: `DTYPE_BITS` maps each storage dtype ("fp32", "fp16", "bf16", "int8", "nf4", "fp4")
to its bits per weight before quantization constants; `QUANTIZED_DTYPES` are the ones applied
to the blocks' linear weights only, `FOUR_BIT_DTYPES` QLoRA's two; `OPTIMIZERS` the optimizers
`training_memory` knows; `DOUBLE_QUANT_BLOCKSIZE` (256) the block scales that share one fp32
scale under double quantization.
"""

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from lowrank._validate import (
    FLOAT_DTYPES,
    METHODS,
    check_blocksize,
    check_bool,
    check_choice,
    check_int,
    check_rank,
)
from lowrank.shapes import TransformerShape

OPTIMIZERS = ("adamw", "sgd")
FOUR_BIT_DTYPES = ("nf4", "fp4")
QUANTIZED_DTYPES = ("int8", *FOUR_BIT_DTYPES)  # applied to the blocks' linear weights only
DTYPE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "nf4": 4, "fp4": 4}

# bitsandbytes' double quantization quantizes the fp32 absmax values in blocks of 256.
DOUBLE_QUANT_BLOCKSIZE = 256

__all__ = [
    "DOUBLE_QUANT_BLOCKSIZE",
    "DTYPE_BITS",
    "FOUR_BIT_DTYPES",
    "OPTIMIZERS",
    "QUANTIZED_DTYPES",
    "MemoryBreakdown",
    "ParamCounts",
    "adapter_checkpoint_bytes",
    "bits_per_weight",
    "format_bytes",
    "format_count",
    "lora_parameters",
    "lora_target_shapes",
    "param_counts",
    "tensor_bytes",
    "training_memory",
    "weight_bytes",
]


def _as_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """A target name or names as a tuple: "q" -> ("q",)."""
    return (targets,) if isinstance(targets, str) else tuple(targets)


# --- parameter counts -------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    """How many parameters train, of how many (what `param_counts` returns).

    Attributes:
        trainable: parameters the optimizer updates.
        total: every parameter the model holds (a 4-bit weight counts as one parameter).

    Examples:
        >>> from lowrank.accounting import param_counts
        >>> from lowrank.shapes import GPT3_175B
        >>> counts = param_counts(GPT3_175B, method="lora", r=4)  # W_q and W_v (Hu et al. 2021)
        >>> counts
        ParamCounts(trainable=18874368, total=174623133696)
        >>> f"{counts.trainable_share:.2e}"
        '1.08e-04'
    """

    trainable: int
    total: int

    @property
    def trainable_share(self) -> float:
        """trainable / total, e.g. 1.08e-4 for GPT-3 175B with LoRA r=4 on W_q and W_v."""
        return self.trainable / self.total


def lora_parameters(shapes: Iterable[tuple[int, int]], r: int, *, dora: bool = False) -> int:
    """Trainable parameters of LoRA adapters on weights of the given (out, in) shapes:
    A [r, in] plus B [out, r], so r * (in + out) per matrix. An r above min(out, in) is
    counted as it is stored, with a warning (`_validate.check_rank`). Hu et al. 2021,
    arXiv:2106.09685. DoRA (Liu et al. 2024, arXiv:2402.09353) also trains a magnitude per
    output feature (PEFT's `lora_magnitude_vector`, [out]): r * (in + out) + out per matrix.

    Examples:
        >>> from lowrank.accounting import lora_parameters
        >>> lora_parameters([(768, 768), (768, 768)], r=8)  # 2 * 8 * (768 + 768)
        24576
        >>> lora_parameters([(768, 768), (768, 768)], r=8, dora=True)  # + 2 * 768 magnitudes
        26112
    """
    check_int("r", r)
    check_bool("dora", dora)
    total = 0
    for out, in_ in shapes:
        check_rank(r, in_, out)
        total += r * (in_ + out) + (out if dora else 0)
    return total


def lora_target_shapes(shape: TransformerShape, targets: Iterable[str]) -> list[tuple[int, int]]:
    """(out, in) of every adapted matrix in the model: each target once per layer.

    `targets` are keys of `shape.linear_shapes()` ("q", "v", ...), or one such key.

    Examples:
        >>> from lowrank.accounting import lora_target_shapes
        >>> from lowrank.shapes import ROBERTA_BASE
        >>> shapes = lora_target_shapes(ROBERTA_BASE, ("q", "v"))
        >>> len(shapes), shapes[0]  # 12 layers x 2 targets
        (24, (768, 768))
    """
    targets = _as_targets(targets)
    per_layer = shape.linear_shapes()
    unknown = [t for t in targets if t not in per_layer]
    if unknown or not targets:
        raise ValueError(
            f"targets must be a non-empty selection of {list(per_layer)}, got {list(targets)}"
        )
    return [per_layer[t] for t in targets] * shape.n_layers


def param_counts(
    shape: TransformerShape,
    *,
    method: str,
    r: int = 8,
    targets: Iterable[str] = ("q", "v"),
    dora: bool = False,
) -> ParamCounts:
    """Trainable and total parameters for a fine-tuning method.

    full: everything trains. lora / qlora: only the adapters on `targets` (names from
    `shape.linear_shapes()`) train, with DoRA's magnitudes if `dora` (`lora_parameters`); the
    total is the model plus the adapters. QLoRA stores the frozen weights in 4 bits but has the
    same counts as LoRA. LoRA: Hu et al. 2021, arXiv:2106.09685; QLoRA: Dettmers et al. 2023,
    arXiv:2305.14314.

    Examples:
        >>> from lowrank.accounting import param_counts
        >>> from lowrank.shapes import LLAMA_7B
        >>> param_counts(LLAMA_7B, method="full")
        ParamCounts(trainable=6738415616, total=6738415616)
        >>> param_counts(LLAMA_7B, method="qlora", r=8, targets=("q", "v")).trainable
        4194304
    """
    check_choice("method", method, METHODS)
    if method == "full":
        if dora:
            raise ValueError(
                "dora=True needs method 'lora' or 'qlora': full fine-tuning has no adapter"
            )
        return ParamCounts(trainable=shape.n_params(), total=shape.n_params())
    adapters = lora_parameters(lora_target_shapes(shape, targets), r, dora=dora)
    return ParamCounts(trainable=adapters, total=shape.n_params() + adapters)


# --- bytes ------------------------------------------------------------------------------------


def bits_per_weight(dtype: str, *, blocksize: int = 64, double_quant: bool = True) -> float:
    """Storage cost of one weight in bits, quantization constants included, on large tensors.

    fp32 32, fp16/bf16 16, int8 8 (a scheme's scales, such as LLM.int8's one fp32 per row, are
    not counted). 4-bit nf4/fp4 (QLoRA, section 3): 4 bits per weight plus one fp32 absmax per
    block, 4 + 32/blocksize = 4.5 at blocksize 64; double quantization stores that absmax as one
    byte and adds one fp32 per 256 blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits.
    Dettmers et al. 2023 (QLoRA), arXiv:2305.14314.

    Examples:
        >>> from lowrank.accounting import bits_per_weight
        >>> bits_per_weight("bf16"), bits_per_weight("nf4", double_quant=False)
        (16.0, 4.5)
        >>> bits_per_weight("nf4")
        4.126953125
    """
    check_choice("dtype", dtype, DTYPE_BITS)
    if dtype not in FOUR_BIT_DTYPES:
        return float(DTYPE_BITS[dtype])
    check_blocksize(blocksize)
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * DOUBLE_QUANT_BLOCKSIZE)
    return 4 + 32 / blocksize


def tensor_bytes(n: int, dtype: str, *, blocksize: int = 64, double_quant: bool = True) -> int:
    """Exact bytes to store a tensor of n elements.

    4-bit: ceil(n/2) bytes of packed codes plus, per block of `blocksize` elements, an fp32
    absmax, or with double quantization a uint8 absmax code, one fp32 scale per 256 blocks and
    one fp32 offset (the layout of bitsandbytes.functional.quantize_4bit).

    Examples:
        >>> from lowrank.accounting import tensor_bytes
        >>> tensor_bytes(4096 * 4096, "bf16")
        33554432
        >>> tensor_bytes(4096 * 4096, "nf4")  # codes + uint8 scales + fp32 scales + offset
        8654852
    """
    check_int("n", n, low=0)
    check_choice("dtype", dtype, DTYPE_BITS)
    if dtype not in FOUR_BIT_DTYPES:
        return n * DTYPE_BITS[dtype] // 8
    check_blocksize(blocksize)
    packed = math.ceil(n / 2)
    n_blocks = math.ceil(n / blocksize)
    if not double_quant:
        return packed + 4 * n_blocks
    return packed + n_blocks + 4 * math.ceil(n_blocks / DOUBLE_QUANT_BLOCKSIZE) + 4


def weight_bytes(
    shape: TransformerShape,
    dtype: str,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    unquantized_dtype: str = "bf16",
) -> int:
    """Bytes of the model's weights stored in `dtype`.

    For the quantized dtypes (int8, nf4, fp4) only the blocks' linear weights are quantized, each
    matrix on its own, as bitsandbytes does when Hugging Face loads a model in 8 or 4 bits;
    biases, norms, embeddings and the output head stay in `unquantized_dtype` (a float dtype,
    unused when `dtype` is one).

    Examples:
        >>> from lowrank.accounting import format_bytes, weight_bytes
        >>> from lowrank.shapes import LLAMA_7B
        >>> format_bytes(weight_bytes(LLAMA_7B, "bf16"))
        '13.5 GB (12.6 GiB)'
        >>> format_bytes(weight_bytes(LLAMA_7B, "nf4"))  # QLoRA's 4-bit linears, the rest bf16
        '3.9 GB (3.6 GiB)'
    """
    check_choice("dtype", dtype, DTYPE_BITS)
    check_choice("unquantized_dtype", unquantized_dtype, FLOAT_DTYPES)
    if dtype not in QUANTIZED_DTYPES:
        return tensor_bytes(shape.n_params(), dtype)
    linears = shape.linear_shapes().values()
    quantized = shape.n_layers * sum(
        tensor_bytes(out * in_, dtype, blocksize=blocksize, double_quant=double_quant)
        for out, in_ in linears
    )
    rest = shape.n_params() - shape.param_groups()["linear weights"]
    return quantized + tensor_bytes(rest, unquantized_dtype)


def adapter_checkpoint_bytes(
    shape: TransformerShape,
    *,
    r: int = 8,
    targets: Iterable[str] = ("q", "v"),
    dtype: str = "fp16",
    dora: bool = False,
    plain_lora_copy: bool = False,
) -> int:
    """Bytes of a saved LoRA adapter (A and B of every target; the file's small header aside).
    The full fine-tuning checkpoint to compare with is weight_bytes(shape, dtype).

    dora: DoRA's magnitude vectors are saved too, one number per output feature (Liu et al.
    2024, arXiv:2402.09353). plain_lora_copy: a PiSSA or OLoRA adapter saved as a plain LoRA
    against the original base (`lowrank.torch.pissa.plain_lora_copy`, PEFT's
    `path_initial_model_for_weight_conversion`): B' A' = B A - B0 A0 has rank 2r, so A' and B'
    hold twice the numbers (Meng et al. 2024, arXiv:2404.02948).

    Examples:
        >>> from lowrank.accounting import adapter_checkpoint_bytes, format_bytes
        >>> from lowrank.shapes import GPT3_175B
        >>> format_bytes(adapter_checkpoint_bytes(GPT3_175B, r=4))  # the LoRA paper's "35MB"
        '37.7 MB (36.0 MiB)'
        >>> format_bytes(adapter_checkpoint_bytes(GPT3_175B, r=4, plain_lora_copy=True))
        '75.5 MB (72.0 MiB)'
    """
    check_choice("dtype", dtype, FLOAT_DTYPES)
    check_bool("plain_lora_copy", plain_lora_copy)
    if dora and plain_lora_copy:
        raise ValueError("a plain LoRA copy has no DoRA magnitude: pass dora or plain_lora_copy")
    rank = 2 * r if plain_lora_copy else r
    return tensor_bytes(lora_parameters(lora_target_shapes(shape, targets), rank, dora=dora), dtype)


# --- training memory --------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBreakdown:
    """GPU memory of training, in bytes, by what it holds (what `training_memory` returns).

    Attributes:
        weights: the model's own weights (frozen under LoRA; 4-bit linears under QLoRA).
        adapters: LoRA's A and B.
        gradients: one per trainable parameter.
        optimizer_states: AdamW's two fp32 moments per trainable parameter (0 for plain SGD).
        master_weights: fp32 copies of 16-bit trainable parameters in mixed-precision training.
        activations: what the forward pass keeps for the backward; 0 here (it depends on batch
            and sequence length; `dataclasses.replace(breakdown, activations=...)` fills it in).
        label: what was estimated, for printing.

    Examples:
        >>> from lowrank.accounting import MemoryBreakdown, format_bytes
        >>> breakdown = MemoryBreakdown(weights=2_000, adapters=0, gradients=2_000,
        ...                             optimizer_states=8_000, label="1,000 parameters, bf16")
        >>> breakdown.total
        12000
        >>> print(breakdown)
        1,000 parameters, bf16
        weights                      2.0 kB (2.0 KiB)
        adapters                                  0 B
        gradients                    2.0 kB (2.0 KiB)
        optimizer_states             8.0 kB (7.8 KiB)
        master_weights                            0 B
        activations                               0 B
        total                      12.0 kB (11.7 KiB)
        (activations not counted)
    """

    weights: int
    adapters: int
    gradients: int
    optimizer_states: int
    master_weights: int = 0
    activations: int = 0
    label: str = field(default="", compare=False)  # what was estimated, for printing

    def as_dict(self) -> dict[str, int]:
        """Name -> bytes of every part, with the total last.

        Examples:
            >>> from lowrank.accounting import MemoryBreakdown
            >>> MemoryBreakdown(weights=2, adapters=1, gradients=1, optimizer_states=8).as_dict()
            {'weights': 2, 'adapters': 1, 'gradients': 1, 'optimizer_states': 8,
             'master_weights': 0, 'activations': 0, 'total': 12}
        """
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
    unquantized_dtype: str = "bf16",
    dora: bool = False,
) -> MemoryBreakdown:
    """Bytes of GPU memory to fine-tune `shape`, activations excluded.

    weight_dtype: storage of the model's weights; default bf16 for full and lora, nf4 for qlora
    (which needs nf4 or fp4; 4-bit weights belong to qlora only).
    unquantized_dtype: with int8/nf4/fp4 weights, the storage of what stays unquantized
    (embeddings, norms, biases, output head); see `weight_bytes`.
    adapter_dtype: LoRA's A and B and their gradients; fp32 by default, as PEFT upcasts them.
    optimizer: "adamw" keeps two fp32 moments per trainable parameter (8 bytes), "sgd" none.
    master_weights: keep an fp32 copy of 16-bit trainable parameters (mixed precision as in ZeRO,
    Rajbhandari et al. 2020: 2 + 2 + 12 = 16 bytes per parameter for full fine-tuning).
    dora: DoRA adapters, whose magnitudes train with A and B (`lora_parameters`).

    Full fine-tuning in bf16 with AdamW and no master copy costs 2 + 2 + 8 = 12 bytes per
    parameter: LLaMA-65B -> 783 GB, the QLoRA paper's ">780GB". LoRA keeps the 2-byte frozen
    weights and drops the other 10 bytes for all but the adapters, so it saves at most 6x.
    LoRA: Hu et al. 2021, arXiv:2106.09685, section 4.2; QLoRA: Dettmers et al. 2023,
    arXiv:2305.14314.

    Examples:
        >>> from lowrank.accounting import format_bytes, training_memory
        >>> from lowrank.shapes import LLAMA_7B, LLAMA_65B
        >>> format_bytes(training_memory(LLAMA_65B, method="full").total)  # QLoRA's ">780GB"
        '783.4 GB (729.6 GiB)'
        >>> print(training_memory(LLAMA_7B, method="qlora", r=8))
        LLaMA-7B, qlora r=8 on q/v, weights nf4, adamw
        weights                   3.9 GB (3.6 GiB)
        adapters                16.8 MB (16.0 MiB)
        gradients               16.8 MB (16.0 MiB)
        optimizer_states        33.6 MB (32.0 MiB)
        master_weights                         0 B
        activations                            0 B
        total                     3.9 GB (3.7 GiB)
        (activations not counted)
    """
    check_choice("method", method, METHODS)
    targets = _as_targets(targets)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_choice("adapter_dtype", adapter_dtype, FLOAT_DTYPES)
    if weight_dtype is None:
        weight_dtype = "nf4" if method == "qlora" else "bf16"
    allowed = {"full": FLOAT_DTYPES, "lora": (*FLOAT_DTYPES, "int8"), "qlora": FOUR_BIT_DTYPES}
    check_choice(f"weight_dtype for method={method!r}", weight_dtype, allowed[method])

    weights = weight_bytes(
        shape,
        weight_dtype,
        blocksize=blocksize,
        double_quant=double_quant,
        unquantized_dtype=unquantized_dtype,
    )
    counts = param_counts(shape, method=method, r=r, targets=targets, dora=dora)
    trainable_dtype = weight_dtype if method == "full" else adapter_dtype
    gradients = tensor_bytes(counts.trainable, trainable_dtype)
    moments = 2 * tensor_bytes(counts.trainable, "fp32") if optimizer == "adamw" else 0
    needs_master = master_weights and trainable_dtype != "fp32"
    kind = " DoRA" if dora else ""
    adapted = "" if method == "full" else f"{kind} r={r} on {'/'.join(targets)}"
    label = f"{shape.name}, {method}{adapted}, weights {weight_dtype}, {optimizer}"
    return MemoryBreakdown(
        weights=weights,
        adapters=0 if method == "full" else tensor_bytes(counts.trainable, adapter_dtype),
        gradients=gradients,
        optimizer_states=moments,
        master_weights=tensor_bytes(counts.trainable, "fp32") if needs_master else 0,
        label=label,
    )


# --- formatting -------------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    """Bytes in decimal units (as the papers write them) with the binary unit beside:
    format_bytes(37_748_736) == '37.7 MB (36.0 MiB)'. Below 1000 bytes only the count.

    Examples:
        >>> from lowrank.accounting import format_bytes
        >>> format_bytes(37_748_736)
        '37.7 MB (36.0 MiB)'
        >>> format_bytes(999)
        '999 B'
    """
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


def format_count(n: int) -> str:
    """A count with its short form: format_count(18_874_368) == '18,874,368 (18.9M)'.

    Examples:
        >>> from lowrank.accounting import format_count
        >>> format_count(18_874_368)
        '18,874,368 (18.9M)'
    """
    return f"{n:,} ({_scaled(n, 1000, ('', 'K', 'M', 'B', 'T')).replace(' ', '')})"

"""The LoRA and QLoRA papers' headline numbers next to what lowrank computes for the same models.

"10,000x fewer trainable parameters" (Hu et al. 2021, arXiv:2106.09685, section 4.2) and
"from >780GB to <48GB" (Dettmers et al. 2023, arXiv:2305.14314, section 1) each count one
particular quantity. A `Claim` names that quantity, quotes the paper, and shows our count before
and after the method from `lowrank.accounting`, so the ratio can be read next to the words.
Framework-free, like the accounting it uses.
"""

from dataclasses import dataclass

from lowrank.accounting import (
    adapter_checkpoint_bytes,
    format_bytes,
    format_count,
    param_counts,
    training_memory,
    weight_bytes,
)
from lowrank.shapes import GPT3_175B, LLAMA_65B

__all__ = ["Claim", "lora_paper_claims", "qlora_paper_claims"]


@dataclass(frozen=True)
class Claim:
    """One headline number from a paper next to our count of the same quantity.

    Examples:
        >>> claim = Claim("trainable parameters", '"10,000x"', 10_000_000, 1_000, "parameters")
        >>> round(claim.ratio)
        10000
        >>> print(claim)
        trainable parameters: 10,000,000 (10.0M) -> 1,000 (1.0K) (10,000x fewer); paper: "10,000x"
    """

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
        show = format_bytes if self.unit == "bytes" else format_count
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

    Examples:
        >>> params, checkpoint, memory = lora_paper_claims()
        >>> params.after  # r=4 on W_q and W_v of 96 layers: 96 * 2 * 4 * (12288 + 12288)
        18874368
        >>> round(params.ratio), round(memory.ratio, 1)
        (9251, 6.0)
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
    layer of the blocks, as the paper's Guanaco runs; NF4 with double quantization.

    Examples:
        >>> weights, memory = qlora_paper_claims()
        >>> weights.after < 48 * 2**30, memory.after < 48 * 2**30
        (True, True)
    """
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

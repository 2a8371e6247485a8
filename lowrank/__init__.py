"""lowrank: learn and verify LoRA and QLoRA.

- `lowrank.numpy`: the readable reference (NumPy only, float64, hand-written backward passes).
- `lowrank.torch`: the same maths as PyTorch modules (CPU and CUDA), checked against the reference.
- framework-free helpers live here: parameter/byte accounting and the training-memory estimator.

Papers: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685);
Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
"""

__version__ = "0.1.0"

from lowrank.accounting import (
    GPT3_175B,
    LLAMA_7B,
    LLAMA_65B,
    ROBERTA_BASE,
    ROBERTA_LARGE,
    Claim,
    MemoryBreakdown,
    ParamCounts,
    TransformerShape,
    adapter_checkpoint_bytes,
    bits_per_weight,
    format_bytes,
    lora_paper_claims,
    lora_parameters,
    lora_target_shapes,
    param_counts,
    qlora_paper_claims,
    tensor_bytes,
    training_memory,
    weight_bytes,
)
from lowrank.memory import MemoryEstimate, estimate_memory

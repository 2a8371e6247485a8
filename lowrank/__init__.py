"""lowrank: learn and verify LoRA and QLoRA.

- `lowrank.numpy`: the readable reference (NumPy only, float64, hand-written backward passes).
- `lowrank.torch`: the same maths as PyTorch modules (CPU and CUDA), checked against the reference.
- framework-free helpers live here: transformer shapes (`lowrank.shapes`), parameter/byte
  accounting (`lowrank.accounting`), the papers' claims (`lowrank.claims`) and the
  training-memory estimator (`lowrank.memory`).

Papers: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685);
Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
"""

__version__ = "0.1.0"

from lowrank.accounting import (
    MemoryBreakdown,
    ParamCounts,
    adapter_checkpoint_bytes,
    bits_per_weight,
    format_bytes,
    lora_parameters,
    lora_target_shapes,
    param_counts,
    tensor_bytes,
    training_memory,
    weight_bytes,
)
from lowrank.claims import Claim, lora_paper_claims, qlora_paper_claims
from lowrank.memory import MemoryEstimate, estimate_memory
from lowrank.shapes import (
    GPT3_175B,
    LLAMA_7B,
    LLAMA_65B,
    ROBERTA_BASE,
    ROBERTA_LARGE,
    TransformerShape,
    config_to_shape,
)

"""lowrank: learn and verify LoRA and QLoRA.

- `lowrank.numpy`: the readable reference (NumPy only, float64, hand-written backward passes).
- `lowrank.torch`: the same maths as PyTorch modules (CPU and CUDA), checked against the reference.
- framework-free helpers live here: parameter/byte accounting and the training-memory estimator.

Papers: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685);
Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
"""

__version__ = "0.1.0"

"""Gradients and AdamW states counted for every parameter, frozen ones included.

Full fine-tuning's 16 bytes per parameter applied to a LoRA run: the estimate then shows no
saving at all, when the saving is exactly the gradients and moments frozen weights never have.
"""

QUESTION = "q2"
MESSAGE = "you counted gradients and AdamW states for every parameter"


def training_memory_bytes(n_params, n_trainable, weight_bytes=4):
    return n_params * weight_bytes + n_params * (4 + 8)

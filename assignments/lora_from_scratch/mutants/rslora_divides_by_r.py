"""rsLoRA ignored: use_rslora=True still divides by r instead of sqrt(r).

The flag is accepted and then forgotten, so a high-rank rsLoRA adapter gets the small alpha / r
scale rsLoRA exists to replace.
"""

QUESTION = "q1"
MESSAGE = "rsLoRA divides by sqrt(r), not r"


def lora_scale(alpha, r, use_rslora=False):
    return alpha / r

"""alpha instead of alpha / r: the update is never divided by the rank.

Read "the update is scaled by alpha" and LoRA's division by r is gone: every rank then needs an
alpha of its own, and doubling r doubles the update's size.
"""

QUESTION = "q1"
MESSAGE = "you returned alpha itself, not alpha / r"


def lora_scale(alpha, r, use_rslora=False):
    return alpha

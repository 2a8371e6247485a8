"""The scale is forgotten in the forward pass: y = x W^T + b + x A^T B^T.

The adapter then trains with an effective learning rate alpha / r times off, and the merged
weight (which does apply the scale) no longer matches the trained layer.
"""

QUESTION = "q2"
MESSAGE = "the scale is missing"


def lora_forward(x, W, b, A, B, scale):
    return x @ W.T + b + (x @ A.T) @ B.T

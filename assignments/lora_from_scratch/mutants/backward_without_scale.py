"""The scale forgotten in the backward pass of B.

The forward pass multiplies the LoRA path by scale, so every gradient through it carries the
factor too; without it B learns alpha / r times too fast or too slow.
"""

QUESTION = "q4"
MESSAGE = "dB is missing the factor scale"


def lora_backward(dy, x, W, A, B, scale):
    r, in_features = A.shape
    h = x @ A.T
    dy2 = dy.reshape(-1, dy.shape[-1])
    dB = dy2.T @ h.reshape(-1, r)
    dh = scale * dy @ B
    dA = dh.reshape(-1, r).T @ x.reshape(-1, in_features)
    dx = dy @ W + dh @ A
    return dx, dA, dB

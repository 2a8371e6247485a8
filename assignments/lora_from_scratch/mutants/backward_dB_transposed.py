"""A gradient off by a transpose: dB computed as h^T dy, shape (r, out) instead of (out, r).

The classic slip of writing the chain rule in the wrong order; an optimizer step B -= lr * dB
would then fail, or, for a square B, silently train the wrong matrix.
"""

QUESTION = "q4"
MESSAGE = "dB is off by a transpose"


def lora_backward(dy, x, W, A, B, scale):
    r, in_features = A.shape
    h = x @ A.T
    dy2 = dy.reshape(-1, dy.shape[-1])
    dB = scale * h.reshape(-1, r).T @ dy2
    dh = scale * dy @ B
    dA = dh.reshape(-1, r).T @ x.reshape(-1, in_features)
    dx = dy @ W + dh @ A
    return dx, dA, dB

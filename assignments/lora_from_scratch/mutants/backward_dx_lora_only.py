"""dx without the frozen path: only LoRA's contribution is back-propagated.

"W is frozen, so it has no gradient" is right for dW and wrong for dx: the input still reaches
the output through W, and the layers below need dy W.
"""

QUESTION = "q4"
MESSAGE = "dx misses the frozen path"


def lora_backward(dy, x, W, A, B, scale):
    r, in_features = A.shape
    h = x @ A.T
    dy2 = dy.reshape(-1, dy.shape[-1])
    dB = scale * dy2.T @ h.reshape(-1, r)
    dh = scale * dy @ B
    dA = dh.reshape(-1, r).T @ x.reshape(-1, in_features)
    dx = dh @ A
    return dx, dA, dB

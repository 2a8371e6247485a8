"""The paper's column-vector convention (W x) applied to a batch whose rows are examples.

The paper writes h = W0 x + B A x for one column vector x; typed as is for a batch x (batch, in)
it gives an (out, batch) result: the wrong shape.
"""

QUESTION = "q2"
MESSAGE = "you computed with column vectors (W x)"


def lora_forward(x, W, b, A, B, scale):
    return W @ x.T + b[:, None] + scale * B @ (A @ x.T)

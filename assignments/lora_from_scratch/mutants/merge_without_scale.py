"""The merge adds B A without the scale.

The layer computed x W^T + scale x A^T B^T while training; merging W + B A changes its outputs
whenever alpha != r.
"""

QUESTION = "q5"
MESSAGE = "the scale is missing"


def merge_lora(W, A, B, scale):
    return W + B @ A

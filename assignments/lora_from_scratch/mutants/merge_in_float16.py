"""A merge done in low precision: W + scale B A computed in float16 and cast back.

Models are often stored in 16 bits, and merging there rounds the small update (here ~1e-3 of
|W|) to a few bits: the merged model is no longer the trained one.
"""

import numpy as np

QUESTION = "q5"
MESSAGE = "a merge done in low precision (float16)"


def merge_lora(W, A, B, scale):
    return (W.astype(np.float16) + (scale * (B @ A)).astype(np.float16)).astype(W.dtype)

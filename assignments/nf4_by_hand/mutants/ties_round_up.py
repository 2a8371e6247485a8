"""Ties broken the wrong way: a value exactly on a midpoint takes the upper code.

np.searchsorted(..., side="right") (or a `>=` comparison) sends exact ties up where
bitsandbytes' torch.bucketize sends them down: the codes are no longer bitsandbytes'.
"""

import numpy as np

QUESTION = "q2"
MESSAGE = "ties broken the wrong way"


def quantize_blockwise(w, levels, blocksize):
    x = np.asarray(w, dtype=np.float32).reshape(-1)
    n = x.size
    n_blocks = -(-n // blocksize)
    padded = np.zeros(n_blocks * blocksize, np.float32)
    padded[:n] = x
    blocks = padded.reshape(n_blocks, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    safe = np.maximum(absmax, np.float32(1e-38))
    scaled = (blocks * (np.float32(1) / safe)[:, None]).reshape(-1)[:n]
    full = n - n % blocksize
    scaled[full:] = x[full:] / safe[-1]
    midpoints = (levels[:-1] + levels[1:]) / np.float32(2)
    codes = np.searchsorted(midpoints, scaled, side="right").astype(np.uint8)
    return codes, absmax

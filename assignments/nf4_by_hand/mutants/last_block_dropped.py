"""The short last block dropped: n // blocksize blocks instead of ceil(n / blocksize).

Reshaping to (n // blocksize, blocksize) silently discards the tail of every tensor whose size
is not a multiple of the block size.
"""

import numpy as np

QUESTION = "q2"
MESSAGE = "the last, short block"


def quantize_blockwise(w, levels, blocksize):
    x = np.asarray(w, dtype=np.float32).reshape(-1)
    n_blocks = x.size // blocksize
    blocks = x[: n_blocks * blocksize].reshape(n_blocks, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    safe = np.maximum(absmax, np.float32(1e-38))
    scaled = (blocks * (np.float32(1) / safe)[:, None]).reshape(-1)
    midpoints = (levels[:-1] + levels[1:]) / np.float32(2)
    codes = np.searchsorted(midpoints, scaled, side="left").astype(np.uint8)
    return codes, absmax

"""An all-zero block divided by its absmax of 0: NaN, which lands on the top code.

w / absmax is right for every block but one whose values are all zero (pruned rows, padding);
0 / 0 is NaN, and np.searchsorted puts NaN after every midpoint: code 15, decoded as +absmax.
"""

import numpy as np

QUESTION = "q2"
MESSAGE = "an all-zero block"


def quantize_blockwise(w, levels, blocksize):
    x = np.asarray(w, dtype=np.float32).reshape(-1)
    n = x.size
    n_blocks = -(-n // blocksize)
    padded = np.zeros(n_blocks * blocksize, np.float32)
    padded[:n] = x
    blocks = padded.reshape(n_blocks, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = (blocks * (np.float32(1) / absmax)[:, None]).reshape(-1)[:n]
        full = n - n % blocksize
        scaled[full:] = x[full:] / absmax[-1]
    midpoints = (levels[:-1] + levels[1:]) / np.float32(2)
    codes = np.searchsorted(midpoints, scaled, side="left").astype(np.uint8)
    return codes, absmax

"""Double quantization without the offset: the positive absmax values quantized as they are.

Skipping the mean subtraction still "works", but every absmax is positive, so half of the
signed dynamic map's levels are never used and the scales come back coarser.
"""

import numpy as np

QUESTION = "q4"
MESSAGE = "without the offset"


def double_quantize(absmax, dmap, blocksize=256):
    values = np.asarray(absmax, dtype=np.float32)
    n = values.size
    n_groups = -(-n // blocksize)
    padded = np.zeros(n_groups * blocksize, np.float32)
    padded[:n] = values
    groups = padded.reshape(n_groups, blocksize)
    absmax2 = np.abs(groups).max(axis=1)
    scaled = (groups * (np.float32(1) / absmax2)[:, None]).reshape(-1)[:n]
    midpoints = (dmap[:-1] + dmap[1:]) / np.float32(2)
    codes = np.searchsorted(midpoints, scaled, side="left").astype(np.uint8)
    return codes, absmax2, np.float32(0)

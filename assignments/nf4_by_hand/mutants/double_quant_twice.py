"""Double quantization applied twice: the second-level scales quantized in turn.

"Quantize the quantization constants" read as a recursion: absmax2 goes through another round
of 8-bit quantization, which saves a few bytes per 16,384 weights and loses precision on every
block scale it governs.
"""

import numpy as np

QUESTION = "q4"
MESSAGE = "double quantization applied twice"


def double_quantize(absmax, dmap, blocksize=256):
    def one_round(values):
        offset = np.float32(values.mean(dtype=np.float64))
        centred = (values - offset).astype(np.float32)
        n = centred.size
        n_groups = -(-n // blocksize)
        padded = np.zeros(n_groups * blocksize, np.float32)
        padded[:n] = centred
        groups = padded.reshape(n_groups, blocksize)
        scales = np.abs(groups).max(axis=1)
        safe = np.maximum(scales, np.float32(1e-38))
        scaled = (groups * (np.float32(1) / safe)[:, None]).reshape(-1)[:n]
        full = n - n % blocksize
        scaled[full:] = centred[full:] / safe[-1]
        midpoints = (dmap[:-1] + dmap[1:]) / np.float32(2)
        return np.searchsorted(midpoints, scaled, side="left").astype(np.uint8), scales, offset

    codes, absmax2, offset = one_round(absmax)
    codes2, absmax3, offset2 = one_round(absmax2)  # ... and once more
    absmax2 = dmap[codes2] * np.repeat(absmax3, blocksize)[: absmax2.size] + offset2
    return codes, absmax2.astype(np.float32), offset

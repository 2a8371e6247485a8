"""Nibbles in the wrong order: element 2j in the low nibble, 2j+1 in the high one.

Both orders are self-consistent, so a round trip through one's own unpack looks fine; only the
bytes bitsandbytes writes (and reads) tell them apart.
"""

import numpy as np

QUESTION = "q3"
MESSAGE = "nibbles in the wrong order"


def pack_nibbles(codes, pad_code):
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(pad_code))
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)

"""An odd tensor padded with code 0 (the level -1.0) instead of the code of 0.0.

np.zeros for the padding is the reflex, but code 0 is NF4's -1.0: the padding nibble no longer
matches bitsandbytes' byte, and would decode to -absmax.
"""

import numpy as np

QUESTION = "q3"
MESSAGE = "the last byte: n is odd"


def pack_nibbles(codes, pad_code):
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)

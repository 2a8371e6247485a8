"""The table typed in instead of derived: bitsandbytes' 16 numbers, whatever the offset.

Copying the levels from the library (or from the cell below the question) reproduces the
default table and nothing else; asked for the levels at another offset, it returns the same
numbers.
"""

import numpy as np

QUESTION = "q1"
MESSAGE = "your levels ignore `offset`"


def nf4_levels(offset=0.9677083):
    return np.array(
        [
            -1.0,
            -0.6961928009986877,
            -0.5250730514526367,
            -0.39491748809814453,
            -0.28444138169288635,
            -0.18477343022823334,
            -0.09105003625154495,
            0.0,
            0.07958029955625534,
            0.16093020141124725,
            0.24611230194568634,
            0.33791524171829224,
            0.44070982933044434,
            0.5626170039176941,
            0.7229568362236023,
            1.0,
        ]
    )

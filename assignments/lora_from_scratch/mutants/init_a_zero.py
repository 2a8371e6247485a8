"""A zero as well as B: "start from no update" taken one factor too far.

With A = 0 and B = 0 both gradients vanish (dL/dB needs x A^T, dL/dA needs dy B): the adapter
never leaves zero, however long it trains.
"""

import numpy as np

QUESTION = "q3"
MESSAGE = "A is all zeros"


def init_lora(in_features, out_features, r, rng):
    return np.zeros((r, in_features)), np.zeros((out_features, r))

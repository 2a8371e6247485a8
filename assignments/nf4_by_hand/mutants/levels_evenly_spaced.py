"""Evenly spaced levels instead of normal quantiles (int4's grid, not NF4's).

Sixteen levels from -1 to 1 in equal steps look natural, but normally distributed weights
crowd the middle ones and leave the outer ones almost unused: the information-theoretic point
of NF4 is lost.
"""

import numpy as np

QUESTION = "q1"
MESSAGE = "evenly spaced levels"


def nf4_levels(offset=0.9677083):
    return np.linspace(-1.0, 1.0, 16)

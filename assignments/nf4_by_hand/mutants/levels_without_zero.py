"""Sixteen symmetric quantiles and no exact zero.

Taking 16 quantiles of N(0, 1) straight across misses the construction's point: zero is not a
level, so padding and weights that are exactly 0 come back as +-0.04.
"""

import statistics

import numpy as np

QUESTION = "q1"
MESSAGE = "no exact zero at code 7"


def nf4_levels(offset=0.9677083):
    normal = statistics.NormalDist()
    levels = np.array([normal.inv_cdf(p) for p in np.linspace(1 - offset, offset, 16)])
    return levels / levels.max()

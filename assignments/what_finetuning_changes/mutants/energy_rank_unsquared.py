"""Energy measured with the singular values themselves instead of their squares.

||M||_F^2 is the sum of s_i^2; shares of sum s_i spread more evenly, so the update looks
higher-rank than it is.
"""

import numpy as np

QUESTION = "q5"
MESSAGE = "energy is the squared Frobenius norm"


def energy_rank(M, energy=0.9):
    s = np.linalg.svd(M, compute_uv=False)
    if np.sum(s) == 0:
        return 0
    share = np.cumsum(s) / np.sum(s)
    return int(np.sum(share < energy - 1e-12)) + 1

"""Subspace similarity from the left singular vectors (U) instead of the right ones (Vh).

U of an [r, in] matrix lives in R^r, a space the two adapters do not share (their rows are
in no particular order); the paper's phi compares directions in the input space: rows of Vh.
"""

import numpy as np

QUESTION = "q6"
MESSAGE = "you used the LEFT singular vectors"


def subspace_similarity(A1, A2, i, j):
    U1 = np.linalg.svd(A1)[0][:, :i]
    U2 = np.linalg.svd(A2)[0][:, :j]
    return float(np.sum((U1.T @ U2) ** 2) / min(i, j))

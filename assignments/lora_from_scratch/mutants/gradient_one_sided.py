"""One-sided finite differences: (f(x + h) - f(x)) / h.

Half the evaluations, but an error of order h (~1e-6) instead of h^2: too coarse to tell a
right backward pass from one that is slightly wrong.
"""

import numpy as np

QUESTION = "q6"
MESSAGE = "one-sided differences"


def numerical_gradient(f, x, h=1e-6):
    grad = np.zeros_like(x)
    f_x = f(x)
    for index in np.ndindex(x.shape):
        original = x[index]
        x[index] = original + h
        grad[index] = (f(x) - f_x) / h
        x[index] = original
    return grad

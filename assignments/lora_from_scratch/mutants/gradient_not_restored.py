"""x not restored after perturbing it: x[i] += h, x[i] -= 2h, and never back.

Every later element is then differentiated at a point shifted by -h in all earlier coordinates,
and the caller's x (a layer's weights) is left damaged.
"""

import numpy as np

QUESTION = "q6"
MESSAGE = "x was not restored"


def numerical_gradient(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        x[index] += h
        f_plus = f(x)
        x[index] -= 2 * h
        f_minus = f(x)
        grad[index] = (f_plus - f_minus) / (2 * h)
    return grad

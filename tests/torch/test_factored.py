"""lowrank.torch.factored against the NumPy reference (float64: agreement to 1e-10 relative to
s_1, round-off of two QR + SVD routes in LAPACK vs torch) and against the dense product."""

import numpy as np
import pytest
import torch

from lowrank.numpy import factored as numpy_factored
from lowrank.torch.factored import factored_best_rank_r, factored_core, factored_svd


@pytest.mark.parametrize("shape", [(40, 30, 4), (5, 50, 8), (50, 3, 6), (1, 1, 1)])
def test_matches_numpy(shape):
    out, inp, r = shape
    rng = np.random.default_rng(sum(shape))
    B, A = rng.normal(size=(out, r)), rng.normal(size=(r, inp))
    U, s, Vh = factored_svd(torch.tensor(B), torch.tensor(A))
    U_n, s_n, Vh_n = numpy_factored.factored_svd(B, A)
    np.testing.assert_allclose(s.numpy(), s_n, rtol=1e-10, atol=1e-12 * s_n[0])
    np.testing.assert_allclose((U * s) @ Vh, B @ A, atol=1e-10 * s_n[0])
    Q_B, core, Q_A = factored_core(torch.tensor(B), torch.tensor(A))
    np.testing.assert_allclose((Q_B @ core @ Q_A.T).numpy(), B @ A, atol=1e-10 * s_n[0])
    k = min(shape)
    for rank in range(1, k + 1):
        B_r, A_r = factored_best_rank_r(torch.tensor(B), torch.tensor(A), rank)
        B_n, A_n = numpy_factored.factored_best_rank_r(B, A, rank)
        np.testing.assert_allclose((B_r @ A_r).numpy(), B_n @ A_n, atol=1e-9 * s_n[0])


def test_float32_parameters_are_detached_and_promoted():
    B = torch.nn.Parameter(torch.randn(8, 2))
    A = torch.nn.Parameter(torch.randn(2, 6))
    _, s, _ = factored_svd(B, A)
    assert s.dtype == torch.float64 and not s.requires_grad


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="B's columns must equal A's rows"):
        factored_svd(torch.ones(4, 2), torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"r must be in \[1, 2\]"):
        factored_best_rank_r(torch.ones(4, 2), torch.eye(2, 5), 3)

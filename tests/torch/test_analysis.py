"""lowrank.torch.analysis against the NumPy reference (itself tested against eigenvalue oracles
in tests/numpy/test_analysis.py), on the same float64 matrices, on CPU and on CUDA."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank.numpy.analysis as ref

torch = pytest.importorskip("torch")
import lowrank.torch.analysis as tan  # noqa: E402

# Both sides call LAPACK's float64 SVD on identical inputs; results agree to ~1e-14 relative.
# 1e-11 leaves room for a different driver (cuSOLVER on CUDA) without hiding a real difference.
TOL = 1e-11

shapes = st.tuples(st.integers(1, 10), st.integers(1, 10))
seeds = st.integers(0, 2**32 - 1)


def check_same(M: np.ndarray, device: str = "cpu", energy: float = 0.9) -> None:
    """Every analysis function gives the same answer on M as a NumPy array and as a tensor."""
    T = torch.from_numpy(M).to(device)
    scale = max(1.0, float(np.abs(M).max()))
    s = tan.singular_values(T)
    assert s.dtype == torch.float64 and s.device.type == device
    np.testing.assert_allclose(s.cpu().numpy(), ref.singular_values(M), atol=TOL * scale)
    for r in range(min(M.shape) + 1):
        best = tan.best_rank_r(T, r)
        assert best.dtype == torch.float64 and best.device.type == device
        np.testing.assert_allclose(best.cpu().numpy(), ref.best_rank_r(M, r), atol=TOL * scale)
        assert tan.energy_captured(T, r) == pytest.approx(ref.energy_captured(M, r), abs=TOL)
    got = tan.energy_rank(T, energy)
    assert isinstance(got, int) and got == ref.energy_rank(M, energy)
    for name in ("effective_rank", "stable_rank"):
        got = getattr(tan, name)(T)
        assert isinstance(got, float)
        assert got == pytest.approx(getattr(ref, name)(M), rel=TOL, abs=TOL)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=seeds)
def test_torch_matches_numpy_on_random_matrices(shape, seed):
    M = np.random.default_rng(seed).normal(size=shape)
    check_same(M)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, rank=st.integers(1, 5))
def test_torch_matches_numpy_on_low_rank_plus_noise(seed, rank):
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(20, rank)) @ rng.normal(size=(rank, 16)) + 1e-4 * rng.normal(size=(20, 16))
    check_same(M, energy=0.99)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, r1=st.integers(1, 8), r2=st.integers(1, 8), d=st.integers(8, 24))
def test_subspace_similarity_matches_numpy(seed, r1, r2, d):
    rng = np.random.default_rng(seed)
    A1, A2 = rng.normal(size=(r1, d)), rng.normal(size=(r2, d))
    grid = tan.subspace_similarity_grid(torch.from_numpy(A1), torch.from_numpy(A2))
    assert grid.dtype == torch.float64
    np.testing.assert_allclose(grid.numpy(), ref.subspace_similarity_grid(A1, A2), atol=1e-10)
    i, j = int(rng.integers(1, r1 + 1)), int(rng.integers(1, r2 + 1))
    phi = tan.subspace_similarity(torch.from_numpy(A1), torch.from_numpy(A2), i, j)
    assert isinstance(phi, float)
    assert phi == pytest.approx(ref.subspace_similarity(A1, A2, i, j), abs=1e-10)


def test_identity_and_rank_one():
    assert tan.effective_rank(torch.eye(6)) == pytest.approx(6.0, rel=1e-12)
    assert tan.energy_rank(torch.eye(10), 0.9) == 9
    u, v = torch.randn(7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert tan.effective_rank(torch.outer(u, v)) == pytest.approx(1.0, abs=1e-12)


def test_low_precision_and_grad_tensors_are_analysed_in_float64():
    weight = torch.nn.Linear(12, 9).weight  # float32, requires_grad
    as_float64 = weight.detach().double().numpy()  # the same values, exactly
    check_same(as_float64)
    np.testing.assert_allclose(
        tan.singular_values(weight).numpy(), ref.singular_values(as_float64), atol=1e-12
    )
    out = tan.best_rank_r(weight, 3)
    assert out.dtype == torch.float64 and not out.requires_grad
    assert tan.stable_rank(weight.to(torch.bfloat16)) == pytest.approx(
        ref.stable_rank(weight.detach().to(torch.bfloat16).double().numpy()), rel=1e-12
    )


def test_zero_matrix_edge_cases_match_numpy():
    Z = torch.zeros(4, 6, dtype=torch.float64)
    assert tan.energy_rank(Z) == ref.energy_rank(Z.numpy()) == 0
    assert tan.energy_captured(Z, 0) == 1.0
    assert tan.effective_rank(Z) == 0.0 and tan.stable_rank(Z) == 0.0
    assert torch.equal(tan.best_rank_r(Z, 2), Z)
    with pytest.raises(ValueError, match="numerical rank 0"):
        tan.subspace_similarity(Z, torch.ones(2, 6), 1, 1)
    with pytest.raises(ValueError, match="non-zero"):
        tan.subspace_similarity_grid(torch.ones(2, 6), Z)


@pytest.mark.parametrize(
    "M, error, match",
    [
        (torch.ones(5), ValueError, "2-D"),
        (torch.ones(2, 2, 2), ValueError, "2-D"),
        (torch.ones(0, 3), ValueError, "empty"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN or inf"),
        (torch.tensor([[1.0, float("inf")]]), ValueError, "NaN or inf"),
        (torch.ones(2, 2, dtype=torch.complex64), TypeError, "real numbers"),
    ],
)
def test_bad_matrices_raise_like_numpy(M, error, match):
    for fn in (tan.singular_values, tan.effective_rank, tan.stable_rank, tan.energy_rank):
        with pytest.raises(error, match=match):
            fn(M)
    with pytest.raises(error, match=match):
        ref.singular_values(M.numpy())


def test_bad_arguments_raise():
    M = torch.ones(3, 5)
    with pytest.raises(ValueError, match=r"r must be in \[0, 3\]"):
        tan.best_rank_r(M, 4)
    with pytest.raises(TypeError, match="r must be an int"):
        tan.energy_captured(M, 1.0)
    with pytest.raises(ValueError, match=r"energy must be a share in \(0, 1\]"):
        tan.energy_rank(M, 0.0)
    A1, A2 = torch.randn(3, 10), torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"i must be in \[1, 3\]"):
        tan.subspace_similarity(A1, A2, 4, 1)
    with pytest.raises(ValueError, match="same number of columns"):
        tan.subspace_similarity(A1, torch.randn(3, 11), 1, 1)


def test_package_exports_the_same_analysis_names():
    import lowrank.numpy
    import lowrank.torch

    for name in ref.__dict__:
        if callable(getattr(ref, name)) and not name.startswith("_") and name != "np":
            assert hasattr(lowrank.numpy, name) and hasattr(lowrank.torch, name), name


@pytest.mark.cuda
def test_cuda_matches_numpy():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (5, 3), (16, 40), (64, 64)]:
        check_same(rng.normal(size=shape), device="cuda")
    A1, A2 = rng.normal(size=(8, 128)), rng.normal(size=(64, 128))
    grid = tan.subspace_similarity_grid(torch.from_numpy(A1).cuda(), torch.from_numpy(A2).cuda())
    assert grid.device.type == "cuda"
    np.testing.assert_allclose(grid.cpu().numpy(), ref.subspace_similarity_grid(A1, A2), atol=1e-10)

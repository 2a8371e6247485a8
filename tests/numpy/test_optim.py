"""Tests for lowrank.numpy.optim: SGD and AdamW against torch.optim and the papers' formulas."""

import numpy as np
import pytest

from lowrank.numpy import SGD, AdamW, LoRALinear, relative_error

# Same operations in the same order in float64. Not bit-identical: torch's CPU kernels fuse
# multiply-adds (FMA) in lerp/addcmul/addcdiv, so a few ulps differ per step; measured ~2e-13
# relative after 200 AdamW steps. 1e-12 over 50 steps keeps a margin; a real slip is far off
# (decaying after the Adam update instead of before: measured 2.6e-8 with the defaults).
SAME_MATH_TOL = 1e-12


def random_params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"layers.0.A": rng.normal(size=(3, 7)), "layers.0.B": rng.normal(size=(5, 3))}


def run_against_torch(make_ours, make_theirs, steps: int = 50, seed: int = 0) -> None:
    torch = pytest.importorskip("torch")
    params = random_params(seed)
    torch_params = {n: torch.tensor(p, requires_grad=True) for n, p in params.items()}
    ours = make_ours(params)
    theirs = make_theirs(list(torch_params.values()))
    rng = np.random.default_rng(seed + 100)
    for _ in range(steps):
        # Gradients that change sign and scale from step to step, as real ones do.
        grads = {n: rng.normal(size=p.shape) * rng.uniform(0.01, 10) for n, p in params.items()}
        ours.step(grads)
        for name, p in torch_params.items():
            p.grad = torch.tensor(grads[name])
        theirs.step()
    for name, p in params.items():
        expected = torch_params[name].detach().numpy()
        assert relative_error(p, expected) < SAME_MATH_TOL, name


@pytest.mark.parametrize(
    "hyper",
    [
        {},
        {"lr": 0.1, "weight_decay": 0.0},
        {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
    ],
    ids=["defaults", "no-decay", "custom"],
)
def test_adamw_matches_torch_for_50_steps(hyper) -> None:
    torch = pytest.importorskip("torch")
    run_against_torch(
        lambda params: AdamW(params, **hyper),
        lambda params: torch.optim.AdamW(params, foreach=False, **hyper),
    )


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_matches_torch_for_50_steps(momentum) -> None:
    torch = pytest.importorskip("torch")
    run_against_torch(
        lambda params: SGD(params, lr=0.01, momentum=momentum),
        lambda params: torch.optim.SGD(params, lr=0.01, momentum=momentum, foreach=False),
    )


def test_adamw_first_step_follows_the_paper() -> None:
    # Step 1 (Loshchilov & Hutter, Algorithm 2): m_hat = g, v_hat = g^2, so
    # p1 = p0 * (1 - lr * wd) - lr * g / (|g| + eps).
    p0 = np.array([1.0, -2.0, 0.5])
    g = np.array([0.3, -4.0, 1e-9])
    lr, wd, eps = 0.1, 0.01, 1e-8
    p = p0.copy()
    AdamW({"p": p}, lr=lr, weight_decay=wd, eps=eps).step({"p": g})
    expected = p0 * (1 - lr * wd) - lr * g / (np.abs(g) + eps)
    assert np.allclose(p, expected, rtol=1e-12, atol=0)


def test_sgd_momentum_by_hand() -> None:
    # buf1 = g1, p1 = p0 - lr g1 ; buf2 = m g1 + g2, p2 = p1 - lr buf2
    p = np.array([1.0, 2.0])
    g1, g2 = np.array([0.5, -1.0]), np.array([2.0, 0.25])
    sgd = SGD({"p": p}, lr=0.1, momentum=0.9)
    sgd.step({"p": g1})
    sgd.step({"p": g2})
    expected = np.array([1.0, 2.0]) - 0.1 * g1 - 0.1 * (0.9 * g1 + g2)
    assert np.allclose(p, expected, rtol=1e-15)


def test_updates_are_in_place_so_the_layer_sees_them() -> None:
    layer = LoRALinear(np.eye(4), r=2)
    A_before = layer.A.copy()
    optimizer = AdamW(layer.params(), lr=0.1)
    layer.forward(np.ones((3, 4)))
    layer.backward(np.ones((3, 4)))
    optimizer.step(layer.grads())
    assert optimizer.params["A"] is layer.A
    assert not np.array_equal(layer.B, 0.0)  # B's gradient is non-zero on the first step
    assert not np.array_equal(layer.A, A_before)  # only weight decay moves A (grad_A = 0)


@pytest.mark.parametrize("make", [lambda p: SGD(p, lr=0.1), lambda p: AdamW(p)])
def test_step_rejects_mismatched_grads(make) -> None:
    params = {"A": np.zeros((2, 3)), "B": np.zeros((3, 2))}
    optimizer = make(params)
    with pytest.raises(ValueError, match=r"missing \['B'\]"):
        optimizer.step({"A": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="backward"):
        optimizer.step({"A": np.zeros((2, 3)), "B": None})
    with pytest.raises(ValueError, match="shape"):
        optimizer.step({"A": np.zeros((2, 3)), "B": np.zeros((2, 3))})


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: SGD({}, lr=0.1), ValueError, "non-empty"),
        (lambda: SGD({"p": np.zeros(2, dtype=int)}, lr=0.1), TypeError, "float"),
        (lambda: SGD({"p": np.zeros(2)}, lr=0.0), ValueError, "lr"),
        (lambda: SGD({"p": np.zeros(2)}, lr=0.1, momentum=1.0), ValueError, "momentum"),
        (lambda: AdamW({"p": np.zeros(2)}, lr=-1.0), ValueError, "lr"),
        (lambda: AdamW({"p": np.zeros(2)}, betas=(1.0, 0.9)), ValueError, "betas"),
        (lambda: AdamW({"p": np.zeros(2)}, eps=0.0), ValueError, "eps"),
        (lambda: AdamW({"p": np.zeros(2)}, weight_decay=-0.1), ValueError, "weight_decay"),
    ],
)
def test_constructors_reject_bad_arguments(make, error, message) -> None:
    with pytest.raises(error, match=message):
        make()

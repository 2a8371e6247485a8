"""Optimizers written out: SGD with momentum, and AdamW (decoupled weight decay).

AdamW: Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization" (arXiv:1711.05101),
on top of Adam: Kingma & Ba 2015 (arXiv:1412.6980). LoRA trains A and B with AdamW, and the
optimizer's two moments per trainable number are a large part of why full fine-tuning needs so
much memory (Hu et al. 2021, arXiv:2106.09685, section 4.2): with LoRA they exist only for A, B.

Both optimizers take a dict name -> array (a layer's or a model's `params()`) and update those
arrays IN PLACE in `step(grads)`, where `grads` has the same names; the layers see the new
values without any copying back. Each step follows torch.optim's order of operations exactly,
so in float64 the two agree to rounding (torch.optim.AdamW / SGD are the tests' oracles).

`lr_scales` (name -> multiplier, default 1) gives some parameters their own learning rate
lr * multiplier, as a torch parameter group with its own lr does; LoRA+ (B at a larger rate
than A: Hayou et al. 2024, arXiv:2402.12354) is `train.loraplus_lr_scales`.
"""

import numpy as np

__all__ = ["SGD", "AdamW"]


def _check_params(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(params, dict) or not params:
        raise ValueError("params must be a non-empty dict name -> array (e.g. model.parameters())")
    for name, p in params.items():
        if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
            raise TypeError(f"parameter {name!r} must be a float NumPy array (updated in place)")
    return params


def _check_grads(params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
    if grads.keys() != params.keys():
        missing = sorted(params.keys() - grads.keys())
        extra = sorted(grads.keys() - params.keys())
        raise ValueError(f"grads must have the params' names; missing {missing}, unknown {extra}")
    for name, g in grads.items():
        if g is None:
            raise ValueError(f"no gradient for {name!r}: run backward() before step()")
        if np.shape(g) != params[name].shape:
            raise ValueError(f"grad {name!r} has shape {np.shape(g)}, param {params[name].shape}")


def _check_lr_scales(
    params: dict[str, np.ndarray], lr_scales: dict[str, float] | None
) -> dict[str, float]:
    lr_scales = {} if lr_scales is None else dict(lr_scales)
    unknown = sorted(lr_scales.keys() - params.keys())
    if unknown:
        raise ValueError(f"lr_scales name parameters the optimizer does not have: {unknown}")
    for name, value in lr_scales.items():
        _check_positive(f"lr_scales[{name!r}]", value)
    return lr_scales


def _check_positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return float(value)


class SGD:
    """Stochastic gradient descent with (heavy-ball) momentum, as torch.optim.SGD (dampening 0).

    buf = momentum * buf + g        (buf = g on the first step)
    p  -= lr * lr_scales.get(name, 1) * buf

    `params` and the `grads` given to `step` map the same names to arrays of the same shapes;
    each parameter array is updated in place.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import SGD
        >>> w = np.array([1.0, -2.0])
        >>> optimizer = SGD({"w": w}, lr=0.1, momentum=0.9)
        >>> optimizer.step({"w": np.array([1.0, 1.0])})
        >>> w  # updated in place: w - 0.1 * g
        array([ 0.9, -2.1])
        >>> optimizer.step({"w": np.array([1.0, 1.0])})
        >>> w  # the momentum buffer is now 0.9 * g + g = 1.9 g
        array([ 0.71, -2.29])
        >>> a, b = np.ones(2), np.ones(2)
        >>> SGD({"a": a, "b": b}, lr=0.1, lr_scales={"b": 4}).step({"a": a, "b": b})
        >>> a, b  # b at 4 times the learning rate (LoRA+'s B)
        (array([0.9, 0.9]), array([0.6, 0.6]))
    """

    def __init__(
        self,
        params: dict[str, np.ndarray],
        lr: float,
        momentum: float = 0.0,
        lr_scales: dict[str, float] | None = None,
    ) -> None:
        self.params = _check_params(params)
        self.lr = _check_positive("lr", lr)
        self.lr_scales = _check_lr_scales(params, lr_scales)  # name -> lr multiplier
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.buffers: dict[str, np.ndarray] = {}

    def step(self, grads: dict[str, np.ndarray]) -> None:
        """Update every parameter in place from `grads` (the same names and shapes)."""
        _check_grads(self.params, grads)
        for name, p in self.params.items():
            g = grads[name]
            if self.momentum:
                if name in self.buffers:
                    buf = self.buffers[name]
                    buf *= self.momentum
                    buf += g
                else:
                    buf = self.buffers[name] = np.array(g, dtype=p.dtype)
                g = buf
            p -= self.lr * self.lr_scales.get(name, 1.0) * g


class AdamW:
    """Adam with decoupled weight decay, step for step as torch.optim.AdamW (amsgrad off).

    For each parameter p with gradient g, at step t = 1, 2, ...:

        lr  = lr * lr_scales.get(name, 1)    this parameter's rate (a torch param group's lr)
        p  *= 1 - lr * weight_decay          decay the weight itself, not the gradient
        m   = m + (g - m) * (1 - beta1)      first moment: running mean of g
        v   = beta2 * v + (1 - beta2) * g^2  second moment: running mean of g^2
        m_hat = m / (1 - beta1^t)            bias correction (m, v start at 0)
        v_hat = v / (1 - beta2^t)
        p  -= lr * m_hat / (sqrt(v_hat) + eps)

    The last line is computed in torch's arrangement,
    p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps), which is why `step` looks slightly
    different; the maths is the same.

    Loshchilov & Hutter 2019, arXiv:1711.05101 (Adam: Kingma & Ba 2015, arXiv:1412.6980).
    `params` and the `grads` given to `step` map the same names to arrays of the same shapes;
    each parameter array is updated in place, and `m`, `v` hold one array of its shape each.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import AdamW
        >>> w = np.array([1.0, -2.0])
        >>> optimizer = AdamW({"w": w}, lr=0.1, weight_decay=0.0)
        >>> optimizer.step({"w": np.array([0.5, -3.0])})
        >>> w  # the first step moves every weight by about lr, whatever the gradient's size
        array([ 0.9, -1.9])
        >>> optimizer.t, optimizer.m["w"].shape, optimizer.v["w"].shape
        (1, (2,), (2,))
    """

    def __init__(
        self,
        params: dict[str, np.ndarray],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        lr_scales: dict[str, float] | None = None,
    ) -> None:
        self.params = _check_params(params)
        self.lr = _check_positive("lr", lr)
        self.lr_scales = _check_lr_scales(params, lr_scales)  # name -> lr multiplier
        beta1, beta2 = betas
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.eps = _check_positive("eps", eps)
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.weight_decay = float(weight_decay)
        self.t = 0
        self.m = {name: np.zeros_like(p) for name, p in params.items()}  # first moments
        self.v = {name: np.zeros_like(p) for name, p in params.items()}  # second moments

    def step(self, grads: dict[str, np.ndarray]) -> None:
        """One AdamW step: update every parameter in place from `grads` (same names, shapes)."""
        _check_grads(self.params, grads)
        self.t += 1
        bias_correction1 = 1 - self.beta1**self.t
        bias_correction2 = 1 - self.beta2**self.t
        bias_correction2_sqrt = bias_correction2**0.5
        for name, p in self.params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            lr = self.lr * self.lr_scales.get(name, 1.0)
            step_size = lr / bias_correction1
            p *= 1 - lr * self.weight_decay
            m += (g - m) * (1 - self.beta1)
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            denom = np.sqrt(v) / bias_correction2_sqrt + self.eps
            p -= step_size * (m / denom)

"""LoRA on a 2-D convolution in NumPy, with its backward pass through im2col and col2im.

LoRA (Hu et al. 2021, arXiv:2106.09685) learns the change of a frozen weight as B @ A. A
convolution is a linear map on patches: `im2col` lays every patch the kernel covers out as a
row of in_channels * kh * kw numbers, and the convolution is then one matmul with the weight
flattened to W [out, in_channels * kh * kw] (the im2col of Chellapilla et al. 2006, "High
Performance Convolutional Neural Networks for Document Processing"). So LoRA on a conv is
LoRA on that flattened W, with in = in_channels * kh * kw:

    cols = im2col(dropout(x))                     (batch * out_h * out_w, in)
    y    = conv(x, W) + b + scale * cols A^T B^T   A [r, in], B [out, r]

which is PEFT's layout read as matrices (peft/tuners/lora/layer.py, class _ConvNd): its lora_A
is a conv with the base's kernel (A reshaped to [r, in_channels, kh, kw]) and its lora_B a 1x1
conv (B [out, r]). The backward pass is LoRALinear's on the rows of `cols`; dL/dx comes back
from the patches by `col2im`, which adds each patch's gradient to the pixels it was read from.

Layout NCHW; stride, zero padding and dilation as in torch.nn.Conv2d (int or pair), groups=1.
The PyTorch mirror, on nn.Conv1d and nn.Conv2d, is `lowrank.torch.conv`.
"""

import numpy as np

from lowrank.numpy.lora import LoRALinear, _as_float_array

__all__ = ["im2col", "col2im", "Conv2d", "LoRAConv"]


def _pair(name: str, value: int | tuple[int, int], minimum: int) -> tuple[int, int]:
    """(value, value) for an int, the pair itself for a pair; each an int >= `minimum`."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= minimum for v in pair
    ):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """torch.nn.Conv2d's output length along one spatial dim."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def im2col(
    x: np.ndarray,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> np.ndarray:
    """Every patch of `x` under the kernel as one row: the convolution becomes a matmul.

    Args:
        x: (batch, in_channels, height, width).
        kernel_size: (kh, kw).
        stride: (sh, sw).
        padding: (ph, pw) zeros on each side.
        dilation: (dh, dw) spacing between kernel taps.

    Returns:
        cols: (batch * out_h * out_w, in_channels * kh * kw), rows in (batch, out_h, out_w)
        order, columns in (in_channel, i, j) order, the order of W [out, in, kh, kw] flattened.

    Raises:
        ValueError: x is not 4-D or the kernel does not fit the padded input.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy.conv import im2col
        >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
        >>> cols = im2col(x, (2, 2), stride=(2, 2))  # four 2x2 patches, no overlap
        >>> cols.shape
        (4, 4)
        >>> cols[0].tolist()  # the top-left patch, row by row
        [0.0, 1.0, 4.0, 5.0]
    """
    if x.ndim != 4:
        raise ValueError(f"x must be (batch, channels, height, width), got shape {x.shape}")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    batch, channels, height, width = x.shape
    out_h = _output_size(height, kh, sh, ph, dh)
    out_w = _output_size(width, kw, sw, pw, dw)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"a {kh}x{kw} kernel does not fit input {x.shape} with this padding")
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    patches = np.empty((batch, channels, kh, kw, out_h, out_w), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):  # tap (i, j) of every patch: a strided slice of the input
            rows = slice(i * dh, i * dh + sh * (out_h - 1) + 1, sh)
            columns = slice(j * dw, j * dw + sw * (out_w - 1) + 1, sw)
            patches[:, :, i, j] = padded[:, :, rows, columns]  # (batch, channels, out_h, out_w)
    # (batch, channels, kh, kw, out_h, out_w) -> (batch, out_h, out_w, channels, kh, kw)
    return patches.transpose(0, 4, 5, 1, 2, 3).reshape(batch * out_h * out_w, -1)


def col2im(
    cols: np.ndarray,
    x_shape: tuple[int, int, int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> np.ndarray:
    """The adjoint of `im2col`: each row's numbers added back to the pixels they came from.

    The backward pass of im2col: dL/dx = col2im(dL/dcols), where a pixel read by several
    patches gets the sum of their gradients and padding gets none.

    Args:
        cols: (batch * out_h * out_w, in_channels * kh * kw), laid out as `im2col` returns.
        x_shape: (batch, in_channels, height, width) of the input im2col read.
        kernel_size: (kh, kw).
        stride: (sh, sw).
        padding: (ph, pw).
        dilation: (dh, dw).

    Returns:
        (batch, in_channels, height, width).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy.conv import col2im, im2col
        >>> ones = np.ones((1, 1, 3, 3))
        >>> counts = col2im(im2col(ones, (2, 2)), ones.shape, (2, 2))  # patches per pixel
        >>> counts[0, 0].tolist()
        [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    batch, channels, height, width = x_shape
    out_h = _output_size(height, kh, sh, ph, dh)
    out_w = _output_size(width, kw, sw, pw, dw)
    # (batch * out_h * out_w, channels * kh * kw) -> (batch, channels, kh, kw, out_h, out_w)
    patches = cols.reshape(batch, out_h, out_w, channels, kh, kw).transpose(0, 3, 4, 5, 1, 2)
    padded = np.zeros((batch, channels, height + 2 * ph, width + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):  # taps (i, j) of different patches never share a pixel: += is safe
            rows = slice(i * dh, i * dh + sh * (out_h - 1) + 1, sh)
            columns = slice(j * dw, j * dw + sw * (out_w - 1) + 1, sw)
            padded[:, :, rows, columns] += patches[:, :, i, j]
    return padded[:, :, ph : ph + height, pw : pw + width]


class Conv2d:
    """A frozen 2-D convolution y = conv(x, W) + b, with the backward pass to its input.

    W [out, in_channels, kh, kw] and b [out] as torch.nn.Conv2d holds them (copied; float32
    stays float32, the rest becomes float64); stride, zero padding and dilation as there,
    groups=1. It is the base layer `LoRAConv` wraps, so it has no parameters to train: its
    backward returns dL/dx only. x (batch, in_channels, h, w) -> (batch, out, out_h, out_w).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy.conv import Conv2d
        >>> conv = Conv2d(np.ones((4, 3, 3, 3)), stride=2, padding=1)
        >>> x = np.ones((2, 3, 8, 8))  # (batch, in_channels, height, width)
        >>> y = conv.forward(x)
        >>> y.shape, float(y[0, 0, 1, 1])  # an inner patch sums 3 * 3 * 3 ones
        ((2, 4, 4, 4), 27.0)
        >>> conv.backward(np.ones_like(y)).shape  # dL/dy -> dL/dx
        (2, 3, 8, 8)
    """

    def __init__(
        self,
        weight: np.ndarray,
        bias: np.ndarray | None = None,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
    ) -> None:
        self.weight = _as_float_array("weight", weight, ndim=4)  # (out, in, kh, kw)
        self.bias = None if bias is None else _as_float_array("bias", bias, ndim=1)  # (out,)
        if self.bias is not None and self.bias.shape != (self.weight.shape[0],):
            raise ValueError(
                f"bias must have shape ({self.weight.shape[0]},), got {self.bias.shape}"
            )
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        self.dilation = _pair("dilation", dilation, 1)
        self._x_shape: tuple[int, ...] | None = None

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.weight.shape[2], self.weight.shape[3]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def im2col(self, x: np.ndarray) -> np.ndarray:
        """x (batch, in_channels, h, w) -> its patches (batch * out_h * out_w, in * kh * kw)."""
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1] != self.in_channels:
            got = x.shape if isinstance(x, np.ndarray) else type(x).__name__
            raise ValueError(f"x must be (batch, {self.in_channels}, height, width), got {got}")
        return im2col(x, self.kernel_size, self.stride, self.padding, self.dilation)

    def col2im(self, cols: np.ndarray, x_shape: tuple[int, ...]) -> np.ndarray:
        """The patches' gradient (batch * out_h * out_w, in * kh * kw) -> dL/dx of x_shape."""
        return col2im(cols, x_shape, self.kernel_size, self.stride, self.padding, self.dilation)

    def output_shape(self, x_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(batch, out, out_h, out_w) for an input of x_shape."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
        )
        out_h = _output_size(x_shape[2], kh, sh, ph, dh)
        out_w = _output_size(x_shape[3], kw, sw, pw, dw)
        return x_shape[0], self.out_channels, out_h, out_w

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """x (batch, in, h, w) -> y (batch, out, out_h, out_w). `training` is accepted for a
        uniform layer interface."""
        cols = self.im2col(x)  # (n, in * kh * kw), n = batch * out_h * out_w
        self._x_shape = x.shape
        W = self.weight.reshape(self.out_channels, -1)  # (out, in * kh * kw)
        y = cols @ W.T  # (n, in * kh * kw) @ (in * kh * kw, out) -> (n, out)
        if self.bias is not None:
            y = y + self.bias
        return _to_nchw(y, self.output_shape(x.shape))

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dL/dy (batch, out, out_h, out_w) -> dL/dx (batch, in, h, w): col2im(dy W)."""
        if self._x_shape is None:
            raise RuntimeError("backward() called before forward()")
        if dy.shape != self.output_shape(self._x_shape):
            raise ValueError(
                f"dy must have shape {self.output_shape(self._x_shape)}, got {dy.shape}"
            )
        W = self.weight.reshape(self.out_channels, -1)  # (out, in * kh * kw)
        dcols = _to_rows(dy) @ W  # (n, out) @ (out, in * kh * kw): each patch's gradient
        return self.col2im(dcols, self._x_shape)


def _to_rows(y: np.ndarray) -> np.ndarray:
    """(batch, channels, h, w) -> (batch * h * w, channels): one row per output position."""
    return y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])


def _to_nchw(rows: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """(batch * h * w, channels) -> (batch, channels, h, w) of `shape`: the inverse of `to_rows`."""
    batch, channels, height, width = shape
    return rows.reshape(batch, height, width, channels).transpose(0, 3, 1, 2)


class LoRAConv(LoRALinear):
    """A frozen Conv2d (W, b) plus a trainable LoRA update scale * B @ A on its patches.

    LoRA: Hu et al. 2021, arXiv:2106.09685. x (batch, in_channels, h, w) -> y (batch, out,
    out_h, out_w), with A (r, in) and B (out, r) for in = in_channels * kh * kw (see the module
    docstring). Everything that treats the update as a matrix is LoRALinear's: `scale`,
    `delta_weight` [out, in], `merge` / `unmerge` (on W flattened to [out, in]), `params`,
    `grads`; `forward` and `backward` go through the patches.

    Args:
        weight: W [out, in_channels, kh, kw], frozen (copied).
        bias: b [out] or None, frozen.
        stride: int or (sh, sw), as torch.nn.Conv2d.
        padding: int or (ph, pw) zeros on each side.
        dilation: int or (dh, dw).
        r: the rank, a positive int (above min(in, out) it warns).
        alpha: scale = alpha / r (or alpha / sqrt(r) with use_rslora).
        dropout: probability of zeroing an input element of the LoRA path while training.
        use_rslora: scale by alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023, arXiv:2312.03732).
        init: "kaiming" (uniform(+-1/sqrt(in)), PEFT's conv lora_A init) or "gaussian".
        rng: a np.random.Generator for A's init and the dropout masks; default seeded 0.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy.conv import LoRAConv
        >>> rng = np.random.default_rng(0)
        >>> layer = LoRAConv(rng.normal(size=(8, 3, 3, 3)), stride=2, padding=1, r=2, alpha=4)
        >>> layer.A.shape, layer.B.shape  # (r, in_channels * kh * kw), (out, r)
        ((2, 27), (8, 2))
        >>> x = rng.normal(size=(5, 3, 16, 16))  # (batch, in_channels, height, width)
        >>> y = layer.forward(x)
        >>> y.shape  # (batch, out, height / 2, width / 2)
        (5, 8, 8, 8)
        >>> dx = layer.backward(np.ones_like(y))  # dL/dy -> dL/dx
        >>> dx.shape, layer.grad_A.shape, layer.grad_B.shape
        ((5, 3, 16, 16), (2, 27), (8, 2))
        >>> layer.B[...] = rng.normal(size=(8, 2))  # as if trained
        >>> y = layer.forward(x, training=False)
        >>> layer.merge()  # W [8, 3, 3, 3] += (scale * B @ A) reshaped
        >>> bool(np.allclose(layer.forward(x), y))
        True
    """

    def __init__(
        self,
        weight: np.ndarray,
        bias: np.ndarray | None = None,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        rng: np.random.Generator | None = None,
    ) -> None:
        self.base_layer = Conv2d(weight, bias, stride=stride, padding=padding, dilation=dilation)
        kh, kw = self.base_layer.kernel_size
        in_features = self.base_layer.in_channels * kh * kw  # numbers in one patch
        out_features = self.base_layer.out_channels
        self._start_adapter(in_features, out_features, r, alpha, dropout, use_rslora, init, rng)

    def base_weight(self) -> np.ndarray:
        """The frozen W [out, in_channels, kh, kw] flattened to [out, in] (a view)."""
        return self.base_layer.weight.reshape(self.out_features, -1)

    def set_base_weight(self, weight: np.ndarray) -> None:
        """Overwrite the frozen W with `weight` [out, in], reshaped to the kernel's shape."""
        self.base_layer.weight[...] = weight.reshape(self.base_layer.weight.shape)

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """x (batch, in_channels, h, w) -> y (batch, out, out_h, out_w); dropout on the LoRA
        path only when `training`. While merged the layer is its base conv (no backward)."""
        y = self.base_layer.forward(x)  # conv(x, W) + b
        if self.merged:
            self._cache = None
            return y
        mask = None
        x_lora = x
        if training and self.dropout > 0:
            keep = self.rng.random(x.shape) >= self.dropout
            mask = (keep / (1.0 - self.dropout)).astype(self.A.dtype)  # inverted: E[mask] = 1
            x_lora = x * mask
        cols = self.base_layer.im2col(x_lora)  # (n, in), n = batch * out_h * out_w
        h = cols @ self.A.T  # (n, in) @ (in, r) -> (n, r): A as a conv
        self._cache = (cols, mask, h, x.shape)
        update = self.scale * (h @ self.B.T)  # (n, r) @ (r, out) -> (n, out): B as a 1x1 conv
        return y + _to_nchw(update, y.shape)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dL/dy (batch, out, out_h, out_w) -> dL/dx (batch, in_channels, h, w); sets grad_A
        [r, in] and grad_B [out, r]. LoRALinear's backward on the rows of the patches:

            dL/dB     = scale * dy^T h                  dy as rows (n, out), h (n, r)
            dL/dh     = scale * dy B
            dL/dA     = (dL/dh)^T cols
            dL/dx     = base.backward(dy) + col2im(dL/dh A) * mask
        """
        if self.merged:
            raise RuntimeError("the adapter is merged into the weight; unmerge() before training")
        if self._cache is None:
            raise RuntimeError("backward() called before forward()")
        cols, mask, h, x_shape = self._cache
        dx = self.base_layer.backward(dy)  # checks dy's shape: (batch, out, out_h, out_w)
        dy_rows = _to_rows(dy)  # (n, out)
        self.grad_B = self.scale * (dy_rows.T @ h)  # (out, n) @ (n, r) -> (out, r)
        dh = self.scale * (dy_rows @ self.B)  # (n, out) @ (out, r) -> (n, r)
        self.grad_A = dh.T @ cols  # (r, n) @ (n, in) -> (r, in)
        dx_lora = self.base_layer.col2im(dh @ self.A, x_shape)  # (n, r) @ (r, in) -> patches
        if mask is not None:
            dx_lora = dx_lora * mask
        return dx + dx_lora

"""QLoRA's frozen base in NumPy: a linear layer whose weight lives only in 4 bits, with its
hand-written backward pass; and `QLoRALinear`, LoRA on top of it.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) trains LoRA adapters (Hu et al. 2021,
arXiv:2106.09685) on a base model stored as 4-bit NF4 codes plus double-quantized block
scales (`quant.py`). The base layer keeps nothing but the packed codes and their scales:

    forward:   weight = decode(packed)          y = x weight^T + b      (weight then dropped)
    backward:  weight = decode(packed)          grad_x = grad_y weight  (decoded again)

The weight gets no gradient (it is frozen, and a 4-bit code could not take a small step
anyway), so x need not be kept either: decoding again in backward instead of keeping the
decoded copy alive is what lets QLoRA hold just the 4-bit copy in memory. This is the mirror,
name for name, of `lowrank.torch.qlora.Linear4bit` and its autograd Function.

`QLoRALinear` is `lora.LoRALinear` with this layer as its `base_layer`: LoRA's maths is
unchanged, and merging re-quantizes W_q + scale * B A (a lossy step).
"""

import numpy as np

from lowrank._validate import check_blocksize, check_bool, check_int, check_quant_type

from .lora import Linear, LoRALinear
from .quant import dequantize_4bit, quantize_4bit
from .quantized import DOUBLE_QUANT_BLOCKSIZE, Quantized4bit

__all__ = ["Linear4bit", "QLoRALinear"]


class Linear4bit:
    """A frozen linear layer stored in 4 bits: y = x @ W^T + b, W [out, in] decoded on the fly.

    QLoRA's frozen base (Dettmers et al. 2023, arXiv:2305.14314). x (..., in) -> y (..., out).
    The quantized weight's fields are those of `quantized.Quantized4bit`.

    Attributes:
        weight_packed: uint8 (ceil(out * in / 2),), two codes per byte.
        weight_absmax: float32 (n_blocks,), or uint8 codes with double quantization.
        weight_offset: float32 (double quantization) or None.
        weight_absmax2: float32 (ceil(n_blocks / 256),) (double quantization) or None.
        bias: (out,) in full precision, frozen, or None.

    There is deliberately no `.weight`: no full-precision copy exists; `dequantize_weight()`
    decodes one on demand.

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import Linear, Linear4bit
        >>> base = Linear(64, 8, rng=np.random.default_rng(0))
        >>> layer = Linear4bit.from_linear(base)  # NF4, blocksize 64, double quantization
        >>> layer.weight_packed.shape, layer.weight_absmax.shape, hasattr(layer, "weight")
        ((256,), (8,), False)
        >>> x = np.ones((2, 64))
        >>> y = layer.forward(x)  # (batch, in) -> (batch, out)
        >>> y.shape, bool(np.allclose(y, x @ layer.dequantize_weight().T + base.bias))
        ((2, 8), True)
        >>> layer.backward(np.ones((2, 8))).shape  # dL/dy -> dL/dx, W decoded again
        (2, 64)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        dtype: np.dtype = np.float32,
    ) -> None:
        """An all-zero 4-bit layer of the given size (use `from_linear` to quantize a layer)."""
        self.in_features = check_int("in_features", in_features)
        self.out_features = check_int("out_features", out_features)
        self.quant_type = check_quant_type(quant_type)
        self.blocksize = check_blocksize(blocksize)
        self.double_quant = check_bool("double_quant", double_quant)
        self.weight_dtype = np.dtype(dtype)  # the weight's dtype, what dequantize_weight returns
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.weight_packed = np.zeros((n + 1) // 2, dtype=np.uint8)
        self.weight_absmax = np.zeros(n_blocks, dtype=np.uint8 if double_quant else np.float32)
        self.weight_offset = np.float32(0.0) if double_quant else None
        n_blocks2 = -(-n_blocks // DOUBLE_QUANT_BLOCKSIZE)
        self.weight_absmax2 = np.zeros(n_blocks2, np.float32) if double_quant else None
        self.bias = np.zeros(out_features, dtype=dtype) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: Linear,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
    ) -> "Linear4bit":
        """Quantize `linear`'s weight (its bias is copied, frozen)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            quant_type=quant_type,
            blocksize=blocksize,
            double_quant=double_quant,
            dtype=linear.weight.dtype,
        )
        layer.set_weight(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.copy()
        return layer

    def quantized(self) -> Quantized4bit:
        """The weight's quantized state."""
        return Quantized4bit(
            packed=self.weight_packed,
            absmax=self.weight_absmax,
            offset=self.weight_offset,
            absmax2=self.weight_absmax2,
            shape=(self.out_features, self.in_features),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            double_quant=self.double_quant,
        )

    def dequantize_weight(self) -> np.ndarray:
        """W [out, in] decoded from 4 bits, in the dtype the quantized weight had."""
        return dequantize_4bit(self.quantized()).astype(self.weight_dtype)

    def set_weight(self, weight: np.ndarray) -> None:
        """Quantize `weight` [out, in] into this layer (e.g. after merging an adapter)."""
        weight = np.asarray(weight)
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"weight must be [{self.out_features}, {self.in_features}], got "
                f"{list(weight.shape)}"
            )
        if not np.all(np.isfinite(weight)):
            raise ValueError("weight contains NaN or inf; the layer is left unchanged")
        q = quantize_4bit(
            weight,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            double_quant=self.double_quant,
        )
        self.weight_packed = q.packed
        self.weight_absmax = q.absmax
        self.weight_offset = q.offset
        self.weight_absmax2 = q.absmax2
        self.weight_dtype = weight.dtype

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """x (..., in) -> (..., out) in x's dtype; the weight is decoded, used and dropped.
        `training` is accepted for a uniform layer interface."""
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x must have shape (..., {self.in_features}), got {x.shape}")
        weight = self.dequantize_weight().astype(x.dtype)  # (out, in)
        y = x @ weight.T  # (..., in) @ (in, out) -> (..., out)
        return y if self.bias is None else y + self.bias.astype(x.dtype)

    def backward(self, grad_y: np.ndarray) -> np.ndarray:
        """dL/dy (..., out) -> dL/dx (..., in) = grad_y @ W, W decoded again from 4 bits."""
        weight = self.dequantize_weight().astype(grad_y.dtype)  # (out, in)
        grad_x = grad_y @ weight  # (..., out) @ (out, in) -> (..., in)
        return grad_x

    def params(self) -> dict[str, np.ndarray]:
        """Nothing trains: the 4-bit weight and the bias are frozen."""
        return {}

    def grads(self) -> dict[str, np.ndarray]:
        return {}


class QLoRALinear(LoRALinear):
    """A frozen 4-bit linear layer plus a trainable LoRA update: `LoRALinear` whose
    `base_layer` is a `Linear4bit`.

    Arguments are LoRALinear's, plus the quantization: `quant_type` ("nf4", "fp4", "int4"),
    `blocksize` and `double_quant` (see `quant.quantize_4bit`). The full-precision `weight` is
    quantized at construction and not kept. A and B take the dtype LoRALinear gives them
    (float64 for float64 input).

    QLoRA: Dettmers et al. 2023, arXiv:2305.14314; LoRA: Hu et al. 2021, arXiv:2106.09685.
    x (..., in) -> y (..., out), with A (r, in) and B (out, r).

    Examples:
        >>> import numpy as np
        >>> from lowrank.numpy import QLoRALinear
        >>> W = np.random.default_rng(0).normal(size=(8, 64))  # (out, in)
        >>> layer = QLoRALinear(W, r=4, alpha=8)
        >>> type(layer.base_layer).__name__, layer.A.shape, layer.B.shape
        ('Linear4bit', (4, 64), (8, 4))
        >>> x = np.ones((2, 64))
        >>> bool(np.allclose(layer.forward(x), x @ layer.base_weight().T))  # B = 0
        True
        >>> layer.backward(np.ones((2, 8))).shape
        (2, 64)
        >>> sorted(layer.params())  # only the adapter trains
        ['A', 'B']
    """

    def __init__(
        self,
        weight: np.ndarray,
        bias: np.ndarray | None = None,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        **lora,
    ) -> None:
        super().__init__(weight, bias, **lora)
        self.base_layer = Linear4bit.from_linear(
            self.base_layer, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant
        )

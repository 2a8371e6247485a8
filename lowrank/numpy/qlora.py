"""QLoRA in NumPy: LoRA on a frozen base weight that is stored only in 4 bits.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) is LoRA (Hu et al. 2021, arXiv:2106.09685)
with the frozen W kept as 4-bit NF4 codes plus double-quantized block scales (`quant.py`).
The maths of forward and backward is LoRA's, with W replaced by its decoded copy W_q:

    y     = x W_q^T + b + scale * dropout(x) A^T B^T
    dL/dx = dy W_q + (scale * dy B A) * mask        dL/dA, dL/dB as in LoRA

W_q gets no gradient (it is frozen, and a 4-bit code could not take a small step anyway), so
the only thing the base contributes to backward is dy W_q: it is decoded again there rather
than kept from forward, which is what lets QLoRA hold just the 4-bit copy in memory.
`QLoRALinear` is `lora.LoRALinear` whose `base_weight()` decodes the 4-bit copy; merging
re-quantizes W_q + scale * B A (a lossy step, so outputs move by the quantization rounding).
"""

import numpy as np

from .lora import LoRALinear
from .quant import Quantized4bit, dequantize_4bit, quantize_4bit


class QLoRALinear(LoRALinear):
    """A frozen 4-bit linear layer plus a trainable LoRA update (see `lora.LoRALinear`).

    Arguments are LoRALinear's, plus the quantization: `quant_type` ("nf4", "fp4", "int4"),
    `blocksize` and `double_quant` (see `quant.quantize_4bit`). The full-precision `weight`
    is quantized at construction and not kept (`self.weight` is None); `self.quantized` holds
    the 4-bit copy. A and B take the dtype LoRALinear gives them (float64 for float64 input).
    """

    def __init__(
        self,
        weight: np.ndarray,
        bias: np.ndarray | None = None,
        *,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        rng: np.random.Generator | None = None,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
    ) -> None:
        super().__init__(
            weight,
            bias,
            r=r,
            alpha=alpha,
            dropout=dropout,
            use_rslora=use_rslora,
            init=init,
            rng=rng,
        )
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.quantized: Quantized4bit = self._quantize(self.weight)
        self.weight = None  # only the 4-bit copy is kept

    def base_weight(self) -> np.ndarray:
        """W_q [out, in]: the 4-bit weight decoded (float32 values) in the adapter's dtype."""
        return dequantize_4bit(self.quantized).astype(self.A.dtype)

    def merge(self) -> None:
        """Re-quantize W_q + scale * B @ A into the 4-bit base (lossy: 4-bit rounding)."""
        if self.merged:
            raise RuntimeError("the adapter is already merged; merging twice would add it twice")
        with np.errstate(over="ignore", invalid="ignore"):  # reported by _requantize
            merged = self.base_weight() + self.delta_weight()
        self._requantize(merged)
        self.merged = True

    def unmerge(self) -> None:
        """Re-quantize W_q - scale * B @ A (not an exact inverse of `merge`: both round)."""
        if not self.merged:
            raise RuntimeError("the adapter is not merged; nothing to unmerge")
        self._requantize(self.base_weight() - self.delta_weight())
        self.merged = False

    def _requantize(self, weight: np.ndarray) -> None:
        if not np.all(np.isfinite(weight)):
            raise ValueError("merging would produce NaN or inf weights; W left unchanged")
        self.quantized = self._quantize(weight)

    def _quantize(self, weight: np.ndarray) -> Quantized4bit:
        return quantize_4bit(
            weight,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            double_quant=self.double_quant,
        )

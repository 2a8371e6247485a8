"""QLoRA's frozen base: a linear layer whose weight lives only in 4 bits.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) trains LoRA adapters (Hu et al. 2021,
arXiv:2106.09685) on top of a base model stored as 4-bit NF4 with double quantization. The
base layer here keeps nothing but the packed codes and their scales; every forward decodes the
weight to the input's dtype, multiplies, and lets the decoded copy go. Backward needs
dL/dx = dL/dy @ W, so it decodes W again from the packed data instead of keeping the
full-size copy alive between forward and backward: the memory saving that makes QLoRA fit.
The weight itself gets no gradient (it is frozen; only the adapters train), so x need not be
saved either.

`lowrank.torch.lora.add_lora(..., quant_type="nf4")` puts a `Linear4bit` under each LoRA
wrapper; on its own it is a frozen `nn.Linear` that costs ~4.13 bits per weight.

    layer = Linear4bit.from_linear(linear)  # y = layer(x): (..., in) -> (..., out)

Sharding the 4-bit base (FSDP-QLoRA, Answer.AI 2024; bitsandbytes' `quant_storage`): FSDP
shards parameters, never buffers, so by default (`quant_storage=None`, the codes in a uint8
buffer) every rank holds the whole 4-bit base. With `quant_storage` set to a dtype, the same
bytes are kept as a frozen `nn.Parameter` of that dtype (uint8, or a float16/bfloat16/float32
view of the bytes, as bitsandbytes does), which `fully_shard` splits across ranks and gathers
before each forward; decoding views the bytes as uint8 again, so the weight is bit-identical.
The block scales (`weight_absmax`, `weight_offset`, `weight_absmax2`) stay buffers and are
replicated: 1/32 of the codes' bytes with double quantization. uint8 is the safe choice for
FSDP2 (its mixed precision casts only floating parameters); a float storage is what FSDP1's
flat parameters need (one dtype per group), and under a `MixedPrecisionPolicy` its
`param_dtype` must equal the storage dtype, or the bytes would be cast as numbers.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lowrank._validate import check_blocksize, check_bool, check_int, check_quant_type
from lowrank.torch.quant import dequantize_4bit, quantize_4bit
from lowrank.torch.quantized import DOUBLE_QUANT_BLOCKSIZE, Quantized4bit

__all__ = ["QUANT_STORAGE_DTYPES", "Linear4bit"]

# the dtypes the packed codes may be stored in as a parameter (`Linear4bit.quant_storage`)
QUANT_STORAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)


class _Linear4bitFunction(torch.autograd.Function):
    """y = x @ W^T (+ b) with W decoded from 4 bits; saves only the packed state."""

    @staticmethod
    def forward(ctx, x, bias, packed, absmax, offset, absmax2, layout):
        # layout: (shape, dtype, blocksize, quant_type, double_quant) of the quantized weight,
        # and whether the codes are a parameter's (quant_storage), which FSDP frees and refills
        ctx.layout = layout
        ctx.has_bias = bias is not None
        ctx.save_for_backward(packed, absmax, offset, absmax2)  # a few bytes per weight
        weight = _decode(layout, packed, absmax, offset, absmax2).to(x.dtype)  # [out, in]
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        packed, absmax, offset, absmax2 = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _decode(ctx.layout, packed, absmax, offset, absmax2).to(grad_y.dtype)
            grad_x = grad_y @ weight  # (..., out) @ (out, in) -> (..., in)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None, None, None, None


def _check_quant_storage(quant_storage) -> torch.dtype | None:
    if quant_storage is not None and quant_storage not in QUANT_STORAGE_DTYPES:
        names = ["None"] + [str(dtype) for dtype in QUANT_STORAGE_DTYPES]
        raise ValueError(f"quant_storage must be one of {names}, got {quant_storage!r}")
    return quant_storage


def _decode(layout, packed, absmax, offset, absmax2) -> torch.Tensor:
    shape, dtype, blocksize, quant_type, double_quant, in_parameter = layout
    if in_parameter and packed.device.type == "cpu":  # the CPU kernels read codes through
        packed = packed.clone()  # .numpy(), which would make the storage FSDP frees after
        # forward non-resizable: they decode a copy (CUDA decodes the parameter itself)
    q = Quantized4bit(
        packed, absmax, offset, absmax2, shape, dtype, blocksize, quant_type, double_quant
    )
    return dequantize_4bit(q)


class Linear4bit(nn.Module):
    """A frozen linear layer stored in 4 bits: y = x @ W^T + b, W [out, in] decoded on the fly.

    QLoRA's frozen base layer (Dettmers et al. 2023, arXiv:2305.14314): NF4 with double
    quantization by default, the LoRA adapters (Hu et al. 2021, arXiv:2106.09685) go on top.
    The buffers below are the quantized weight (see `lowrank.torch.quantized.Quantized4bit`).
    There is deliberately no `.weight`: no full-precision copy exists. `dequantize_weight()`
    decodes one on demand. `bias` is a frozen nn.Parameter (or None), kept in full precision.
    The output has the input's dtype. `.to(dtype)` / `.half()` leave the quantization state as
    it is (it only follows the device), so the decoded weight never changes.

    With `quant_storage` (a dtype of `QUANT_STORAGE_DTYPES`) the packed codes are a frozen
    `nn.Parameter` of that dtype instead of a buffer, so that FSDP can shard them (see the
    module doc); `packed_codes()` is always the uint8 view. Under `fully_shard` the codes are
    whole only inside forward and backward: read `quantized()` after `unshard()`.

    Attributes:
        weight_packed: uint8 [ceil(out * in / 2)], two codes per byte; with `quant_storage`, a
            frozen parameter of that dtype holding the same bytes (zero-padded to whole elements).
        weight_absmax: float32 [n_blocks], or uint8 codes with double quantization.
        weight_offset: float32 [] (double quantization) or None.
        weight_absmax2: float32 [ceil(n_blocks / 256)] (double quantization) or None.
        bias: the frozen bias [out], or None.
        weight_dtype: the dtype the weight had, which `dequantize_weight` returns.
        quant_storage: None (codes in a uint8 buffer) or the dtype of the codes' parameter.

    Examples:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> linear = nn.Linear(64, 32)
        >>> layer = Linear4bit.from_linear(linear)
        >>> layer
        Linear4bit(in_features=64, out_features=32, bias=True, quant_type=nf4, blocksize=64,
                   double_quant=True)
        >>> x = torch.randn(4, 64)
        >>> layer(x).shape  # (batch, in) -> (batch, out)
        torch.Size([4, 32])
        >>> 8 * sum(b.numel() * b.element_size() for b in layer.buffers()) / (64 * 32)
        4.15625
        >>> layer.half().weight_absmax2.dtype  # the scales stay float32; the bias is float16
        torch.float32
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
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        quant_storage: torch.dtype | None = None,
    ) -> None:
        """An all-zero 4-bit layer of the given size (use `from_linear` to quantize a layer).

        `quant_storage`: None keeps the codes in a uint8 buffer; a dtype of
        `QUANT_STORAGE_DTYPES` keeps them in a frozen parameter of that dtype (for FSDP).

        Examples:
            >>> layer = Linear4bit(8, 4)
            >>> layer.weight_packed.shape, layer.weight_absmax.dtype
            (torch.Size([16]), torch.uint8)
            >>> float(layer.dequantize_weight().abs().max())
            0.0
            >>> Linear4bit(8, 4, quant_storage=torch.bfloat16).weight_packed.shape  # 16 bytes
            torch.Size([8])
        """
        super().__init__()
        self.in_features = check_int("in_features", in_features)
        self.out_features = check_int("out_features", out_features)
        self.quant_type = check_quant_type(quant_type)
        self.blocksize = check_blocksize(blocksize)
        self.double_quant = check_bool("double_quant", double_quant)
        self.quant_storage = _check_quant_storage(quant_storage)
        self.weight_dtype = dtype  # the dtype the weight had, what dequantize_weight returns
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        absmax_dtype = torch.uint8 if double_quant else torch.float32
        packed = torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device)
        absmax = torch.zeros(n_blocks, dtype=absmax_dtype, device=device)
        self._store_codes(packed)
        self.register_buffer("weight_absmax", absmax)
        if double_quant:
            n_blocks2 = -(-n_blocks // DOUBLE_QUANT_BLOCKSIZE)
            self.register_buffer("weight_offset", torch.zeros((), device=device))
            self.register_buffer("weight_absmax2", torch.zeros(n_blocks2, device=device))
        else:
            self.register_buffer("weight_offset", None)
            self.register_buffer("weight_absmax2", None)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        quant_storage: torch.dtype | None = None,
    ) -> "Linear4bit":
        """Quantize `linear`'s weight (its bias is copied, frozen). On the `meta` device only the
        buffers' sizes are made, so parameter and byte counts can be planned without memory.
        `quant_storage`: where the codes live, as in `Linear4bit` (None: a uint8 buffer).

        Examples:
            >>> layer = Linear4bit.from_linear(nn.Linear(4096, 4096, device="meta"))
            >>> layer.weight_packed.shape, layer.weight_packed.device
            (torch.Size([8388608]), device(type='meta'))
            >>> round(8 * layer.quantized().nbytes / 4096**2, 3)  # QLoRA's 4.127 bits a weight
            4.127
        """
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            quant_type=quant_type,
            blocksize=blocksize,
            double_quant=double_quant,
            dtype=weight.dtype,
            device=weight.device,
            quant_storage=quant_storage,
        )
        if weight.is_meta:
            return layer
        layer.set_weight(weight)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def quantized(self) -> Quantized4bit:
        """The weight's quantized state (views of the buffers).

        Examples:
            >>> q = Linear4bit(8, 4, double_quant=False).quantized()
            >>> q.shape, q.quant_type, q.absmax.shape
            ((4, 8), 'nf4', torch.Size([1]))
        """
        return Quantized4bit(
            packed=self.packed_codes(),
            absmax=self.weight_absmax,
            offset=self.weight_offset,
            absmax2=self.weight_absmax2,
            shape=(self.out_features, self.in_features),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            double_quant=self.double_quant,
        )

    def packed_codes(self) -> torch.Tensor:
        """The packed 4-bit codes as uint8 [ceil(out * in / 2)], whatever `quant_storage` is:
        a view of the stored bytes (no copy), two codes per byte.

        Examples:
            >>> layer = Linear4bit(3, 3, quant_storage=torch.float32)  # 5 bytes in 2 floats
            >>> layer.weight_packed.shape, layer.packed_codes().shape, layer.packed_codes().dtype
            (torch.Size([2]), torch.Size([5]), torch.uint8)
        """
        if self.quant_storage is None:
            return self.weight_packed
        n_bytes = (self.in_features * self.out_features + 1) // 2
        return self.weight_packed.detach().view(torch.uint8)[:n_bytes]

    @torch.no_grad()
    def set_quant_storage(self, quant_storage: torch.dtype | None) -> None:
        """Keep the packed codes in a uint8 buffer (None) or a frozen parameter of
        `quant_storage` (for FSDP); the bytes, and so the decoded weight, do not change.

        Examples:
            >>> layer = Linear4bit.from_linear(nn.Linear(8, 4))
            >>> before = layer.dequantize_weight()
            >>> layer.set_quant_storage(torch.bfloat16)
            >>> type(layer.weight_packed).__name__, layer.weight_packed.dtype
            ('Parameter', torch.bfloat16)
            >>> torch.equal(layer.dequantize_weight(), before)
            True
            >>> layer.set_quant_storage(torch.int8)
            Traceback (most recent call last):
            ...
            ValueError: quant_storage must be one of ['None', 'torch.uint8', ...], got torch.int8
        """
        quant_storage = _check_quant_storage(quant_storage)
        codes = self.packed_codes().clone()
        self.quant_storage = quant_storage
        self._store_codes(codes)

    def _store_codes(self, codes: torch.Tensor) -> None:
        # codes: uint8 [n_bytes] -> a buffer, or a frozen parameter of quant_storage whose
        # bytes are the codes followed by zeros up to a whole number of elements
        self._buffers.pop("weight_packed", None)
        self._parameters.pop("weight_packed", None)
        if self.quant_storage is None:
            self.register_buffer("weight_packed", codes)
            return
        width = torch.empty((), dtype=self.quant_storage).element_size()
        padded = torch.zeros(
            -(-codes.numel() // width) * width, dtype=torch.uint8, device=codes.device
        )
        padded[: codes.numel()] = codes
        stored = padded.view(self.quant_storage)  # the same bytes, read as quant_storage
        self.weight_packed = nn.Parameter(stored, requires_grad=False)

    def dequantize_weight(self) -> torch.Tensor:
        """W [out, in] decoded from 4 bits, in the dtype the quantized weight had.

        Examples:
            >>> torch.manual_seed(0)
            <torch._C.Generator object at ...>
            >>> linear = nn.Linear(64, 32)
            >>> w = Linear4bit.from_linear(linear).dequantize_weight()
            >>> w.shape, w.dtype
            (torch.Size([32, 64]), torch.float32)
            >>> bool((w - linear.weight).abs().max() < 0.2 * linear.weight.abs().max())
            True
        """
        return dequantize_4bit(self.quantized())

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` [out, in] into this layer (e.g. after merging an adapter).

        Checks shape and finiteness before anything changes (one host sync on CUDA; a layer is
        set rarely enough to afford it), so a bad weight leaves the layer as it was.

        Examples:
            >>> layer = Linear4bit(8, 4)
            >>> layer.set_weight(torch.ones(4, 8))
            >>> layer.dequantize_weight()[0]
            tensor([1., 1., 1., 1., 1., 1., 1., 1.])
            >>> layer.set_weight(torch.ones(8, 4))
            Traceback (most recent call last):
            ...
            ValueError: weight must be [4, 8], got [8, 4]
        """
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight must be [{self.out_features}, {self.in_features}], got "
                f"{list(weight.shape)}"
            )
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("weight contains NaN or inf; the layer is left unchanged")
        q = quantize_4bit(
            weight.to(self.weight_packed.device),
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            double_quant=self.double_quant,
        )
        self._store_codes(q.packed)
        self.weight_absmax = q.absmax
        self.weight_offset = q.offset
        self.weight_absmax2 = q.absmax2
        self.weight_dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype; the weight is decoded, used and dropped.

        Gradients flow to x (the weight is decoded again in backward), never to the frozen
        weight or bias.

        Examples:
            >>> layer = Linear4bit(8, 4)
            >>> layer.set_weight(torch.ones(4, 8))
            >>> x = torch.ones(2, 3, 8, requires_grad=True)
            >>> y = layer(x)
            >>> y.shape, y[0, 0]
            (torch.Size([2, 3, 4]), tensor([8., 8., 8., 8.], grad_fn=<SelectBackward0>))
            >>> y.sum().backward()
            >>> x.grad.shape, x.grad[0, 0, 0].item()  # dL/dx = dL/dy @ W: four ones
            (torch.Size([2, 3, 8]), 4.0)
            >>> layer(x.detach().bfloat16()).dtype
            torch.bfloat16
        """
        layout = (
            (self.out_features, self.in_features),
            self.weight_dtype,
            self.blocksize,
            self.quant_type,
            self.double_quant,
            self.quant_storage is not None,
        )
        return _Linear4bitFunction.apply(
            x,
            self.bias,
            self.packed_codes(),
            self.weight_absmax,
            self.weight_offset,
            self.weight_absmax2,
            layout,
        )

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) / .half() would pass the float32 scales (and codes stored as
        # floats) through `fn` and cast them; the quantization state only follows the device
        # (`fn` applied to an empty float32 tensor tells where to).
        names = ("weight_packed", "weight_absmax", "weight_offset", "weight_absmax2")
        state = {name: self._buffers.pop(name) for name in names if name in self._buffers}
        stored = self._parameters.pop("weight_packed", None)  # with quant_storage
        try:
            super()._apply(fn, recurse)
        finally:
            packed = state.get("weight_packed", stored)
            device = fn(torch.empty(0, device=packed.device)).device
            for name, tensor in state.items():
                self._buffers[name] = _to_device(tensor, device)
            if stored is not None:
                moved = _to_device(stored.detach(), device)
                self._parameters["weight_packed"] = nn.Parameter(moved, requires_grad=False)
        return self

    def extra_repr(self) -> str:
        storage = "" if self.quant_storage is None else f", quant_storage={self.quant_storage}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quant_type={self.quant_type}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}{storage}"
        )


def _to_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """`tensor` on `device`; a meta tensor going to a real device becomes uninitialised
    memory of its size (what `to_empty()` asks for)."""
    if tensor is not None and tensor.is_meta and device.type != "meta":
        return torch.empty_like(tensor, device=device)
    return None if tensor is None else tensor.to(device)

"""LoRA on convolutions in PyTorch: `LoRAConv` wraps nn.Conv1d and nn.Conv2d.

LoRA (Hu et al. 2021, arXiv:2106.09685) learns the change of a frozen weight as B @ A. A
convolution is a linear map on patches: every output position takes the patch of the input
under the kernel, in_channels * prod(kernel) numbers, and multiplies it by the weight flattened
to W [out, in_channels * prod(kernel)]. So LoRA applies to the flattened W unchanged:

    in  = in_channels * prod(kernel_size)      out = out_channels
    A [r, in], B [out, r], delta_weight = scale * B @ A  reshaped to [out, in_channels, *kernel]

and everything that reasons about B @ A as a matrix (merging, `factored`, resize, inspect)
works on a conv layer as on a linear one. The forward pass never builds the patches: A,
reshaped to [r, in_channels, *kernel], is a convolution with the base's kernel size, stride,
padding (string padding and padding_mode included) and dilation, from in_channels to r
channels, and B is a 1x1 convolution from r to out channels, i.e. a matmul over the channel
dim. That is PEFT's layout (peft/tuners/lora/layer.py, class _ConvNd): its lora_A is a conv with
the base's kernel, its lora_B a 1x1 conv, and its files hold lora_A.weight [r, in_channels,
*kernel] and lora_B.weight [out, r, 1(, 1)] (`peft_factor_shapes`; `lowrank.torch.peft_format`
reshapes between those and the flattened A and B held here).

Parameters: r * (in_channels * k * k + out) for a k x k Conv2d, against out * in_channels * k * k
for the full weight. The NumPy mirror, with a hand-written backward through im2col and col2im,
is `lowrank.numpy.conv`.
"""

import math

import torch
from torch import nn

from lowrank.torch.lora import LoRALayer

__all__ = ["CONV_TYPES", "LoRAConv", "peft_factor_shapes"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d)  # the convolutions `LoRAConv` wraps


def _check_conv(conv: nn.Module) -> None:
    """TypeError for anything but nn.Conv1d / nn.Conv2d, ValueError for groups != 1."""
    if not isinstance(conv, CONV_TYPES):
        raise TypeError(f"LoRAConv wraps nn.Conv1d or nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(
            f"{type(conv).__name__} has groups={conv.groups}; LoRA on grouped (and depthwise) "
            "convolutions is not supported here: only groups=1"
        )


def peft_factor_shapes(conv: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """PEFT's shapes of a conv layer's lora_A.weight and lora_B.weight at rank r.

    Args:
        conv: an nn.Conv1d or nn.Conv2d (groups=1).
        r: the adapter's rank.

    Returns:
        (r, in_channels, *kernel_size) for A (a conv with the base's kernel) and
        (out_channels, r, 1, ...) for B (a 1x1 conv).

    Raises:
        TypeError: `conv` is no nn.Conv1d / nn.Conv2d.
        ValueError: `conv` has groups != 1.

    Examples:
        >>> from torch import nn
        >>> from lowrank.torch.conv import peft_factor_shapes
        >>> peft_factor_shapes(nn.Conv2d(3, 8, kernel_size=3), r=2)
        ((2, 3, 3, 3), (8, 2, 1, 1))
        >>> peft_factor_shapes(nn.Conv1d(4, 6, kernel_size=5), r=2)
        ((2, 4, 5), (6, 2, 1))
    """
    _check_conv(conv)
    ones = (1,) * len(conv.kernel_size)
    return (r, conv.in_channels, *conv.kernel_size), (conv.out_channels, r, *ones)


class LoRAConv(LoRALayer):
    """LoRA on an nn.Conv1d or nn.Conv2d: base(x) + scale * B_1x1(A_conv(dropout(x))).

    x (batch, in_channels, *spatial) -> (batch, out, *spatial_out). A is held flattened as
    [r, in_channels * prod(kernel)] and B as [out, r] (see the module docstring), so
    `delta_weight` is [out, in_channels * prod(kernel)] and `base_weight` is the base's weight
    flattened the same way (a view). A starts as PEFT's conv lora_A starts: kaiming-uniform
    with a=sqrt(5), whose fan-in in_channels * prod(kernel) is the flattened A's too, so the
    same seed draws the same numbers; B starts at zero.

    Where lowrank differs from PEFT (peft 0.21, `_ConvNd`), on purpose:
    - A takes the base's dilation and padding_mode as well as its kernel, stride and padding.
      PEFT's lora_A takes neither: its unmerged forward fails on a dilated conv (the two
      paths' outputs differ in size) and pads a reflect- or circular-padded conv with zeros,
      so its unmerged output differs from its own merged one. Here merged and unmerged agree
      for every conv; the factors and the file layout are PEFT's either way.
    - groups != 1 is refused (ValueError). PEFT warns, requires r divisible by groups, gives
      its lora_B the base's groups and cannot merge such a layer: its update is then no
      single low-rank B @ A of the flattened weight.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.conv import LoRAConv
        >>> _ = torch.manual_seed(0)
        >>> layer = LoRAConv(nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1))
        >>> layer.in_features, layer.out_features  # 3 * 3 * 3 numbers per patch
        (27, 8)
        >>> layer.add_adapter("default", r=2, alpha=4)
        >>> layer.active_adapter = "default"
        >>> layer.A["default"].shape, layer.B["default"].shape  # (r, in * k * k), (out, r)
        (torch.Size([2, 27]), torch.Size([8, 2]))
        >>> _ = nn.init.normal_(layer.B["default"])  # as if trained
        >>> x = torch.randn(5, 3, 16, 16)  # (batch, in_channels, height, width)
        >>> y = layer(x)
        >>> y.shape  # (batch, out, height / 2, width / 2)
        torch.Size([5, 8, 8, 8])
        >>> layer.merge()  # W [8, 3, 3, 3] += (scale * B @ A) reshaped
        >>> torch.allclose(layer(x), y, atol=1e-5)
        True
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, *self.features(base_layer))

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        """(in_channels * prod(kernel_size), out_channels): the conv as a map on patches."""
        _check_conv(base_layer)
        return base_layer.in_channels * math.prod(base_layer.kernel_size), base_layer.out_channels

    def base_weight(self) -> torch.Tensor:
        """The frozen weight [out, in_channels, *kernel] flattened to [out, in] (a view)."""
        return self.base_layer.weight.flatten(1)

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Overwrite the frozen weight with `weight` [out, in], reshaped to the kernel's shape."""
        with torch.no_grad():
            target = self.base_layer.weight
            target.copy_(weight.reshape(target.shape))

    def conv_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter `name`'s A and B in PEFT's conv layout: A [r, in_channels, *kernel] and
        B [out, r, 1, ...] (views of the flattened parameters where they are contiguous;
        `peft_factor_shapes`)."""
        shape_A, shape_B = peft_factor_shapes(self.base_layer, self.r[name])
        return self.A[name].reshape(shape_A), self.B[name].reshape(shape_B)

    def project_down(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """h = A_conv(dropout(x)): (batch, in_channels, *spatial) -> (batch, r, *spatial_out),
        with the base's stride, padding, padding_mode and dilation (its own `_conv_forward`)."""
        conv_A, _ = self.conv_factors(name)
        return self.base_layer._conv_forward(self.dropout[name](x.to(conv_A.dtype)), conv_A, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + scale * B_1x1(A_conv(dropout(x))) for the active adapter:
        (batch, in_channels, *spatial) -> (batch, out, *spatial_out)."""
        y = self.base_layer(x)
        name = self.active_adapter
        if self.disabled or self.merged or name not in self.A:
            return y  # a merged layer is just its base: no extra convolution
        channels = -1 - len(self.base_layer.kernel_size)  # the channel dim (input may be unbatched)
        h = self.project_down(x, name).movedim(channels, -1)  # (batch, *spatial_out, r)
        # B as a 1x1 conv: (batch, *spatial_out, r) @ (r, out) -> (batch, *spatial_out, out)
        update = (h @ self.B[name].T).movedim(-1, channels) * self.scale[name]
        return (y + update).to(y.dtype)  # PEFT's order of operations

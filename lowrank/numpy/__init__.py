"""lowrank.numpy: the reference implementation, written to be read (NumPy only, no torch)."""

from .analysis import (
    best_rank_r,
    effective_rank,
    energy_captured,
    energy_rank,
    singular_values,
    stable_rank,
    subspace_similarity,
    subspace_similarity_grid,
)
from .codebooks import dynamic_map, fp4_code, int4_code, nf4_code
from .conv import Conv2d, LoRAConv
from .dora import DoRALinear
from .factored import factored_best_rank_r, factored_core, factored_svd
from .gradcheck import numerical_gradient, numerical_gradient_of_output, relative_error
from .lora import Linear, LoRALinear, kaiming_uniform_A
from .model import MLP, ReLU, add_lora, lora_layers, merge_lora, unmerge_lora
from .optim import SGD, AdamW
from .pissa import olora_init, pissa_init, plain_lora_copy
from .qlora import Linear4bit, QLoRALinear
from .quant import dequantize_4bit, quantize_4bit
from .quantized import Quantized4bit
from .train import accuracy, softmax_cross_entropy, train, train_step

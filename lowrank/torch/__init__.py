"""lowrank.torch: LoRA and QLoRA as PyTorch modules, on CPU and CUDA."""

"""Write the example files docs/how-to/inspect-and-convert.md runs its commands on (seconds).

    python docs/scripts/adapter_examples.py build/docs-examples

writes FOLDER/tiny-llama/config.json (a 2-block Llama, hidden size 16) and FOLDER/mlx-adapter/
(adapters.safetensors + adapter_config.json in mlx-lm's layout: lora_a (in, r), lora_b (r, out),
scale 20, the q and v projections of the last block only), then prints what it wrote.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

folder = Path(sys.argv[1])
config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2, vocab_size=40,
                     max_position_embeddings=16, architectures=["LlamaForCausalLM"])  # fmt: skip
config.save_pretrained(folder / "tiny-llama")
(folder / "tiny-llama" / "generation_config.json").unlink(missing_ok=True)
generator = torch.Generator().manual_seed(0)
tensors = {}
for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
    tensors[f"{name}.lora_a"] = torch.randn(16, 4, generator=generator) * 0.1  # (in, r)
    tensors[f"{name}.lora_b"] = torch.randn(4, 16, generator=generator) * 0.1  # (r, out)
(folder / "mlx-adapter").mkdir(parents=True, exist_ok=True)
save_file(tensors, folder / "mlx-adapter" / "adapters.safetensors")
keys = ["self_attn.q_proj", "self_attn.v_proj"]
parameters = {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": keys}
mlx_config = {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": parameters}
(folder / "mlx-adapter" / "adapter_config.json").write_text(json.dumps(mlx_config, indent=2))
print(f"wrote {folder / 'tiny-llama' / 'config.json'} and {folder / 'mlx-adapter'}/")

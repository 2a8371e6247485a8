"""The folders docs/how-to/merge-audit.md runs `lowrank merge-audit` on (seconds, offline).

OUT/tiny-llama      a tiny random Llama (hidden 64, 2 layers, 100 tokens), `save_pretrained`
OUT/qlora-adapter   a QLoRA adapter on it (NF4 base, r = 8 on every linear layer), its B
                    factors random (std 0.01) as if trained, written by `save_trainable`

Usage: python docs/scripts/merge_audit_example.py OUT
"""

import copy
import shutil
import sys
from pathlib import Path

import torch
import transformers

from lowrank.torch import add_lora, all_linear_targets, lora_layers, save_trainable

out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
torch.manual_seed(0)
config = transformers.LlamaConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    vocab_size=100,
)  # fmt: skip
base = transformers.LlamaForCausalLM(config).eval()
base.save_pretrained(out / "tiny-llama")
trained = add_lora(copy.deepcopy(base), all_linear_targets(base), r=8, quant_type="nf4")
with torch.no_grad():
    for _, layer in lora_layers(trained):
        layer.B["default"].normal_(std=0.01)  # as if trained
save_trainable(trained, out / "qlora-adapter")
print(f"wrote {out / 'tiny-llama'} and {out / 'qlora-adapter'}")

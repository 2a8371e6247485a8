"""The folders docs/how-to/resize-and-extract.md runs its commands on (about 30 s, offline).

OUT/base      a tiny random BERT encoder (hidden 64, 2 layers) with all-MiniLM's tokenizer
OUT/adapter   a LoRA adapter, r = 8 on every linear layer, trained on 600 VADER words
              (`lowrank finetune --method lora`), with its classifier head (modules_to_save)
OUT/tuned     that adapter merged into the base (`merged_copy`) and saved as a from_pretrained
              classifier: a "fine-tune" whose update has rank 8 in every layer
OUT/train.jsonl, OUT/test.jsonl   the words, {"text", "label"}

Usage: python docs/scripts/resize_extract_example.py OUT
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import transformers

from lowrank.commands.finetune import finetune
from lowrank.data import vader_word_sentiment
from lowrank.torch import load_adapter, merged_copy
from lowrank.torch.hf import load_model, minilm_path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)

out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
config = transformers.BertConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    vocab_size=30522,
)  # fmt: skip
torch.manual_seed(0)
transformers.BertModel(config).save_pretrained(out / "base")
for name in TOKENIZER_FILES:
    shutil.copy(minilm_path() / name, out / "base" / name)
split = vader_word_sentiment(n_train=600, n_test=300)
for part, texts, labels in (
    ("train", split.train_texts, split.train_labels),
    ("test", split.test_texts, split.test_labels),
):
    rows = [{"text": t, "label": split.label_names[y]} for t, y in zip(texts, labels, strict=True)]
    (out / f"{part}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
finetune(
    out / "base", out / "train.jsonl", method="lora", r=8, targets="all-linear", lr=5e-3,
    epochs=5, batch_size=32, out_dir=out / "adapter", progress=False,
)  # fmt: skip
model = load_model(out / "base", task="classification", num_labels=2)
tuned = merged_copy(load_adapter(model, out / "adapter"))
tuned.config.id2label = dict(enumerate(split.label_names))
tuned.config.label2id = {name: i for i, name in enumerate(split.label_names)}
tuned.save_pretrained(out / "tuned")
for name in TOKENIZER_FILES:
    shutil.copy(minilm_path() / name, out / "tuned" / name)
print(f"wrote {out}: base/, adapter/, tuned/, train.jsonl, test.jsonl")

"""`lowrank finetune` on tiny local models: QLoRA on a causal LM, LoRA on a classifier, and a bad
data file named by line."""

import json
import shutil

import pytest
import torch
import transformers

from lowrank.cli import main
from lowrank.torch.hf import minilm_path


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """A tiny random Llama and a tiny random BERT, each with all-MiniLM's (BERT) tokenizer."""
    folders = {}
    vocab = 30522
    configs = {
        "llama": transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=vocab,
        ),
        "bert": transformers.BertConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=vocab,
        ),
    }
    for kind, config in configs.items():
        folder = tmp_path_factory.mktemp(kind)
        torch.manual_seed(0)
        model = (
            transformers.LlamaForCausalLM(config)
            if kind == "llama"
            else transformers.BertForSequenceClassification(config)
        )
        model.save_pretrained(folder)
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
            "special_tokens_map.json",
        ):
            shutil.copy(minilm_path() / name, folder / name)
        folders[kind] = folder
    return folders


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_finetune_qlora_causal_lm(tiny_folders, tmp_path, capsys):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(12)]
    data = _jsonl(tmp_path / "pc.jsonl", rows)
    out = tmp_path / "run"
    argv = ["finetune", str(tiny_folders["llama"]), str(data), "--method", "qlora", "--r", "4"]
    assert main([*argv, "--batch-size", "4", "--out", str(out)]) == 0
    assert "3 steps" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and (out / "adapter_model.safetensors").is_file()
    assert sum(1 for _ in open(out / "log.jsonl")) == 1 + 3  # config line + one per step


def test_finetune_lora_classification(tiny_folders, tmp_path):
    rows = [{"text": w, "label": "pos" if i % 2 else "neg"} for i, w in enumerate("abcdefgh")]
    data = _jsonl(tmp_path / "cls.jsonl", rows)
    out = tmp_path / "run"
    argv = ["finetune", str(tiny_folders["bert"]), str(data), "--targets", "query,value"]
    assert main([*argv, "--batch-size", "4", "--epochs", "2", "--out", str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert (out / "trainable.safetensors").is_file()  # the new classification head


def test_finetune_bad_data_names_the_line(tiny_folders, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": "broken"\n')
    assert main(["finetune", str(tiny_folders["llama"]), str(data)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("lowrank: error: ")
    assert "bad.jsonl:3: not valid JSON" in err[0]

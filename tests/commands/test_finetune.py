"""`lowrank finetune` on tiny local models: what it saves loads where it should (PEFT for LoRA and
QLoRA with the trained head, transformers' from_pretrained for full fine-tuning), the seed makes
runs repeat bit for bit, a resumed run ends where an uninterrupted one does, the metric per
epoch is what the model scores, and the last line says what was saved.

Oracles: PEFT's `PeftModel.from_pretrained` and transformers' `from_pretrained` reading the
folders; the trained model itself; the saved files' bytes; the metric recomputed row by row
from the model's own outputs. Models are tiny random BERT and Llama folders with all-MiniLM's
tokenizer (no downloads).
"""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

from lowrank.cli import main
from lowrank.commands.finetune import finetune
from lowrank.torch.hf import minilm_path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
WORDS = "good bad fine nice awful great ok meh wow sad glad mad".split()


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


def _labelled(path, classes=3):
    """12 words, labels a, b, c in turn: 3 classes, so the 2-class head of the saved BERT is
    replaced by a new, randomly initialised one (what a user's classifier gets)."""
    return _jsonl(path, [{"text": w, "label": "abc"[i % classes]} for i, w in enumerate(WORDS)])


def _ids(tokenizer_folder, texts):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    return tokenizer(texts, return_tensors="pt", padding=True)


QUIET = {"progress": False}


def test_finetune_qlora_causal_lm(tiny_folders, tmp_path, capsys):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(12)]
    data = _jsonl(tmp_path / "pc.jsonl", rows)
    out = tmp_path / "run"
    argv = ["finetune", str(tiny_folders["llama"]), str(data), "--method", "qlora", "--r", "4"]
    assert main([*argv, "--batch-size", "4", "--out", str(out)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert "saved a QLoRA adapter (PEFT layout" in last and "3 steps" in last
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and (out / "adapter_model.safetensors").is_file()
    assert config["base_model_name_or_path"] == str(tiny_folders["llama"])
    assert sum(1 for _ in open(out / "log.jsonl")) == 1 + 3  # config line + one per step
    # PEFT loads the folder; onto a full-precision base it computes what lowrank's loader does
    # there (the NF4 base of training is lowrank's own: own-jsonl.md loads onto that)
    peft = pytest.importorskip("peft")
    from lowrank.torch import load_adapter

    def base():
        return transformers.AutoModelForCausalLM.from_pretrained(tiny_folders["llama"]).eval()

    theirs = peft.PeftModel.from_pretrained(base(), out).eval()
    ours = load_adapter(base(), out)
    ids = _ids(tiny_folders["llama"], ["question 3"])["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-6, atol=1e-6)
        assert not torch.equal(theirs(ids).logits, base()(ids).logits)  # the adapter acts


def test_a_classifier_saves_its_trained_head_with_the_adapter_and_peft_loads_it(
    tiny_folders, tmp_path
):
    # Oracle: PEFT reading the folder into a fresh classifier must compute what the trained
    # model computes, with the trained head, not the random one the base model gets.
    peft = pytest.importorskip("peft")
    data = _labelled(tmp_path / "cls.jsonl")
    out = tmp_path / "run"
    result = finetune(
        tiny_folders["bert"],
        data,
        targets=["query", "value"],
        epochs=2,
        batch_size=4,
        lr=1e-2,
        out_dir=out,
        **QUIET,
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    assert not (out / "trainable.safetensors").exists()  # the head is in the adapter file
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors["base_model.model.classifier.weight"].shape == (3, 32)
    batch = _ids(tiny_folders["bert"], WORDS)
    torch.manual_seed(123)  # another random head than the run's
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        tiny_folders["bert"], num_labels=3, ignore_mismatched_sizes=True
    ).eval()
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    head = theirs.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(head.weight, tensors["base_model.model.classifier.weight"])
    assert not torch.equal(head.weight, theirs.base_model.model.classifier.original_module.weight)
    with torch.no_grad():
        expected = result.model(**batch).logits
        torch.testing.assert_close(theirs(**batch).logits, expected, rtol=1e-6, atol=1e-6)


def test_the_cli_prints_each_epochs_metric_and_what_it_saved(tiny_folders, tmp_path):
    # Through the real entry point, as a user runs it.
    data = _labelled(tmp_path / "cls.jsonl")
    out = tmp_path / "run"
    argv = [str(tiny_folders["bert"]), str(data), "--epochs", "2", "--batch-size", "4"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowrank",
            "finetune",
            *argv,
            "--eval-split",
            "0.25",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-3].startswith("epoch 1/2: eval accuracy ") and ", loss " in lines[-3]
    assert lines[-2].startswith("epoch 2/2: eval accuracy ")
    size = sum(
        (out / name).stat().st_size for name in ("adapter_config.json", "adapter_model.safetensors")
    )
    assert lines[-1].startswith(
        "saved a LoRA adapter (PEFT layout) with the trained classifier (modules_to_save) "
        f"to {out} ("
    )
    assert f"{size / 1000:.1f} kB" in lines[-1]
    assert lines[-1].endswith(f"; 6 steps, {lines[-2].split(': ')[1]} (epoch 2)")  # 9 rows / 4


def test_the_seed_makes_two_runs_write_the_same_bytes(tiny_folders, tmp_path):
    # With dropout and a new random head, so that every random draw is covered: the head's
    # init, A's init, dropout masks, the data order.
    data = _labelled(tmp_path / "cls.jsonl")
    options = {"epochs": 2, "batch_size": 4, "dropout": 0.3, "eval_split": 0.25, **QUIET}
    written = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        finetune(tiny_folders["bert"], data, seed=seed, out_dir=tmp_path / name, **options)
        written[name] = (tmp_path / name / "adapter_model.safetensors").read_bytes()
    assert written["a"] == written["b"]
    assert written["a"] != written["c"]


@pytest.mark.parametrize("step", [2, 3, 5], ids=["mid-epoch", "epoch-end", "last-epoch"])
def test_a_resumed_run_ends_with_the_uninterrupted_runs_adapter(tiny_folders, tmp_path, step):
    # Oracle: the uninterrupted run. 12 rows, 3 held out, 9 / 4 = 3 steps per epoch, 2 epochs;
    # the checkpoint at `step` is resumed into another folder and must end with the same bytes
    # (adapter and head), the same losses and the same metrics. Dropout and a linear schedule
    # with warmup: the RNG and the schedule must continue too.
    data = _labelled(tmp_path / "cls.jsonl")
    options = {
        "epochs": 2,
        "batch_size": 4,
        "dropout": 0.2,
        "eval_split": 0.25,
        "lr": 5e-3,
        "schedule": "linear",
        "warmup_steps": 2,
        "save_steps": 1,
        **QUIET,
    }
    whole = finetune(tiny_folders["bert"], data, out_dir=tmp_path / "whole", **options)
    resumed = finetune(
        tiny_folders["bert"],
        data,
        out_dir=tmp_path / "resumed",
        resume=tmp_path / "whole" / f"checkpoint-{step}",
        **options,
    )
    name = "adapter_model.safetensors"
    assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert resumed.run.losses == whole.run.losses and resumed.run.evals == whole.run.evals
    log = [json.loads(line) for line in open(tmp_path / "resumed" / "log.jsonl")]
    assert [entry["step"] for entry in log if entry["event"] == "step"] == list(range(step + 1, 7))


def test_resuming_with_other_settings_is_refused(tiny_folders, tmp_path):
    data = _labelled(tmp_path / "cls.jsonl")
    finetune(
        tiny_folders["bert"], data, batch_size=4, save_steps=1, out_dir=tmp_path / "a", **QUIET
    )
    with pytest.raises(ValueError, match=r"cannot resume .* batch_size 4 -> 3"):
        finetune(
            tiny_folders["bert"],
            data,
            batch_size=3,
            out_dir=tmp_path / "b",
            resume=tmp_path / "a" / "checkpoint-1",
            **QUIET,
        )
    with pytest.raises(ValueError, match="other trainable parameters"):
        finetune(
            tiny_folders["bert"],
            data,
            batch_size=4,
            targets=["query"],
            out_dir=tmp_path / "b",
            resume=tmp_path / "a" / "checkpoint-1",
            **QUIET,
        )


def test_full_fine_tuning_saves_a_folder_from_pretrained_loads(tiny_folders, tmp_path):
    # Oracle: transformers' from_pretrained on the folder, against the trained model.
    rows = [{"text": f"the word {w} again"} for w in WORDS]
    data = _jsonl(tmp_path / "text.jsonl", rows)
    out = tmp_path / "full"
    (out).mkdir()
    (out / "adapter_config.json").write_text("{}")  # an earlier LoRA run's: must go
    result = finetune(
        tiny_folders["llama"], data, method="full", batch_size=4, lr=1e-3, out_dir=out, **QUIET
    )
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "log.jsonl"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "trainable.safetensors"}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    batch = tokenizer(WORDS[:4], return_tensors="pt", padding=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_folders["llama"]).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, result.model(**batch).logits)
        assert not torch.allclose(base(**batch).logits, loaded(**batch).logits)  # it trained
    assert result.saved.startswith("the full model and tokenizer")
    assert result.size_bytes == sum((out / n).stat().st_size for n in result.files)


@pytest.mark.parametrize("kind", ["text", "classification"])
def test_the_metric_per_epoch_is_what_the_model_scores_row_by_row(tiny_folders, tmp_path, kind):
    # Oracle: the returned model's loss (and class) on each evaluation row alone; the loss per
    # token weights each row by its predicted tokens, so batching must not change it. 1e-5:
    # float32 sums in another order.
    if kind == "text":
        train_rows = [{"text": f"a {w} day"} for w in WORDS]
        eval_rows = [{"text": "a good day"}, {"text": "a very very long and windy day"}]
        folder = tiny_folders["llama"]
    else:
        train_rows = [{"text": w, "label": "ab"[i % 2]} for i, w in enumerate(WORDS)]
        eval_rows = [
            {"text": "good", "label": "a"},
            {"text": "mad", "label": "b"},
            {"text": "fine", "label": "b"},
        ]
        folder = tiny_folders["bert"]
    data = _jsonl(tmp_path / "train.jsonl", train_rows)
    held_out = _jsonl(tmp_path / "eval.jsonl", eval_rows)
    result = finetune(
        folder,
        data,
        eval_file=held_out,
        epochs=2,
        batch_size=4,
        lr=1e-2,
        out_dir=tmp_path / "run",
        **QUIET,
    )
    assert len(result.run.evals) == 2
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [e["epoch"] for e in log if e["event"] == "eval"] == [1, 2]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    total, weight, correct = 0.0, 0, 0
    with torch.no_grad():
        for row in eval_rows:
            ids = tokenizer(row["text"], return_tensors="pt")["input_ids"]
            if kind == "text":
                if tokenizer.eos_token_id is not None:  # the job appends it (MiniLM's has none)
                    ids = torch.cat([ids, torch.tensor([[tokenizer.eos_token_id]])], 1)
                out = result.model(input_ids=ids, labels=ids)
                total += out.loss.item() * (ids.shape[1] - 1)
                weight += ids.shape[1] - 1
            else:
                label = "ab".index(row["label"])
                out = result.model(input_ids=ids, labels=torch.tensor([label]))
                total, weight = total + out.loss.item(), weight + 1
                correct += int(out.logits.argmax(-1).item() == label)
    last = result.run.evals[-1]
    assert last["loss"] == pytest.approx(total / weight, rel=1e-5)
    if kind == "text":
        assert last["perplexity"] == pytest.approx(math.exp(total / weight), rel=1e-5)
    else:
        assert last["accuracy"] == correct / len(eval_rows)


def test_an_eval_file_with_a_label_training_lacks_is_named_by_line(tiny_folders, tmp_path):
    data = _labelled(tmp_path / "cls.jsonl", classes=2)
    held_out = _jsonl(
        tmp_path / "eval.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "z"}]
    )
    with pytest.raises(ValueError, match=r"eval.jsonl:2: label 'z' is not among"):
        finetune(tiny_folders["bert"], data, eval_file=held_out, out_dir=tmp_path / "r", **QUIET)


def test_finetune_bad_data_names_the_line(tiny_folders, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": "broken"\n')
    assert main(["finetune", str(tiny_folders["llama"]), str(data)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("lowrank: error: ")
    assert "bad.jsonl:3: not valid JSON" in err[0]


@pytest.mark.cuda
def test_bf16_qlora_on_cuda(tiny_folders, tmp_path):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(8)]
    data = _jsonl(tmp_path / "pc.jsonl", rows)
    result = finetune(
        tiny_folders["llama"],
        data,
        method="qlora",
        bf16=True,
        batch_size=4,
        eval_split=0.25,
        out_dir=tmp_path / "run",
        **QUIET,
    )
    assert all(math.isfinite(loss) for loss in result.run.losses)
    assert next(result.model.parameters()).device.type == "cuda"
    assert math.isfinite(result.run.evals[-1]["perplexity"])


def test_loraplus_ratio_reaches_the_trainer(tiny_folders, tmp_path, capsys):
    """--loraplus-ratio: the run's logged config has it, and B moves 16x as fast as in the
    same run without it (AdamW's first step moves every entry with a gradient by about lr,
    and B starts at 0, so after one step |B| is lr, resp. 16 lr, wherever it moved)."""
    data = _labelled(tmp_path / "cls.jsonl")
    largest = {}
    for name, extra in (("plain", []), ("plus", ["--loraplus-ratio", "16"])):
        out = tmp_path / name
        argv = ["finetune", str(tiny_folders["bert"]), str(data), "--batch-size", "12"]
        argv += ["--lr", "1e-3", "--warmup-steps", "0", "--out", str(out), *extra]
        assert main(argv) == 0
        config = json.loads((out / "log.jsonl").read_text().splitlines()[0])
        assert config["loraplus_lr_ratio"] == (16.0 if extra else None)
        tensors = load_file(out / "adapter_model.safetensors")
        largest[name] = max(t.abs().max().item() for k, t in tensors.items() if "lora_B" in k)
    assert largest["plain"] == pytest.approx(1e-3, rel=1e-3)
    assert largest["plus"] == pytest.approx(16e-3, rel=1e-3)
    capsys.readouterr()
    argv = ["finetune", str(tiny_folders["bert"]), str(data), "--method", "full"]
    assert main([*argv, "--loraplus-ratio", "4", "--out", str(tmp_path / "full")]) == 2
    assert "loraplus_ratio applies to lora and qlora" in capsys.readouterr().err

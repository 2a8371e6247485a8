"""`lowrank extract` through `lowrank.cli.main` on tiny Hugging Face folders made here: a plain
BERT encoder as the base and a "full fine-tune" of it (rank-2 updates on two layers and a
trained head) as a `from_pretrained` classifier folder with all-MiniLM's tokenizer.

Oracles: PEFT's `PeftModel.from_pretrained` on each written folder computes the tuned model's
logits (to 1e-5: float32 weights) at the rank of the updates; the evaluation's loss of that
adapter equals the tuned model's (same tolerance, a continuous function of the logits; the
accuracy is not compared, a near-tie could flip it); errors never grow with the rank
(Eckart-Young). Bad inputs: one line, exit status 2.
"""

import copy
import json
import shutil

import pytest
import torch
import transformers

from lowrank.cli import main
from lowrank.torch.hf import minilm_path

peft = pytest.importorskip("peft")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
WORDS = "good bad fine nice awful great ok meh wow sad glad mad".split()
LAYERS = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    config = transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=30522, num_labels=2, id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
    )  # fmt: skip
    torch.manual_seed(0)
    tuned = transformers.BertForSequenceClassification(config).eval()
    tuned.bert.save_pretrained(root / "base")  # the pretrained encoder
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in LAYERS:
            weight = tuned.get_submodule(name).weight
            weight += torch.randn(weight.shape[0], 2, generator=generator) @ torch.randn(
                2, weight.shape[1], generator=generator
            )  # a rank-2 update
        tuned.classifier.weight.normal_(generator=generator)  # the trained head
    tuned.save_pretrained(root / "tuned")
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, root / "base" / name)
        shutil.copy(minilm_path() / name, root / "tuned" / name)
    rows = [{"text": word, "label": "neg" if i % 2 else "pos"} for i, word in enumerate(WORDS)]
    (root / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def _ids(folder):
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return tokenizer(WORDS[:4], return_tensors="pt", padding=True)


def test_one_folder_per_rank_and_peft_loads_the_exact_one(folders, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["extract", str(folders / "base"), str(folders / "tuned"), "--rank", "1,2"]
    assert main([*argv, "--out", str(out), "--eval-file", str(folders / "test.jsonl")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("rank 1: r'=1 on 2 layers") and lines[0].endswith(str(out / "r1"))
    assert lines[1].startswith("rank 2: r'=2 on 2 layers")
    assert "saved whole (modules_to_save): classifier" in lines
    assert "not captured (changed, not a LoRA factor): 0 tensors" in lines
    table = lines[lines.index(f"evaluation on {folders / 'test.jsonl'}:") + 1 :]
    assert table[0].split() == ["model", "accuracy", "loss"]
    assert [row.rsplit(None, 2)[0].strip() for row in table[1:]] == [
        "tuned",
        "base + tuned head",
        "extracted, rank 1",
        "extracted, rank 2",
    ]
    tuned = transformers.AutoModelForSequenceClassification.from_pretrained(folders / "tuned")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        folders / "base", num_labels=2
    )
    batch = _ids(folders / "tuned")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out / "r2").eval()
    with torch.no_grad():
        expected = tuned.eval()(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=1e-5)
        rank_1 = peft.PeftModel.from_pretrained(copy.deepcopy(base), out / "r1").eval()
        assert not torch.allclose(rank_1(**batch).logits, expected, atol=1e-4)


def test_json_reports_errors_bounds_and_scores(folders, tmp_path, capsys):
    argv = ["extract", str(folders / "base"), str(folders / "tuned"), "--rank", "1,2,4"]
    argv += ["--out", str(tmp_path / "o"), "--eval-file", str(folders / "test.jsonl"), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    adapters = report["adapters"]
    assert [a["rank"] for a in adapters] == [1, 2, 4]
    for name in LAYERS:
        errors = [next(r for r in a["layers"] if r["name"] == name)["error"] for a in adapters]
        assert errors[0] > errors[1] - 1e-6 and errors[1] >= errors[2] - 1e-6  # Eckart-Young
        for adapter in adapters:
            row = next(r for r in adapter["layers"] if r["name"] == name)
            assert row["error"] == pytest.approx(row["bound"], abs=1e-5 * row["norm"])
    scores = report["evaluation"]
    tuned_loss = scores["tuned"]["loss"]
    assert scores["extracted, rank 2"]["loss"] == pytest.approx(tuned_loss, abs=1e-5)


def test_one_energy_writes_the_out_folder_itself(folders, tmp_path, capsys):
    argv = ["extract", str(folders / "base"), str(folders / "tuned"), "--energy", "0.5"]
    assert main([*argv, "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("energy 0.5: ") and "Eckart-Young" in out
    config = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--rank", "0"], "--rank: must be positive integers"),
        (["--rank", "1,x"], "--rank: must be positive integers"),
        (["--energy", "2"], "--energy: must be a share in (0, 1]"),
        (["--rank", "2", "--energy", "0.9"], "not allowed with argument"),
        ([], "one of the arguments --rank --energy is required"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(folders, tmp_path, capsys, extra, words):
    with pytest.raises(SystemExit) as done:
        main(["extract", "b", "t", "--out", str(tmp_path / "o"), *extra])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowrank: error: ") and words in err


def test_bad_folders_are_one_line_and_exit_2(folders, tmp_path, capsys):
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4))
    gpt2.save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()  # transformers' progress bar of the save
    cases = [
        ([str(tmp_path / "gpt2"), str(folders / "tuned")], "is a gpt2 model and tuned"),
        ([str(folders / "base"), str(tmp_path / "missing")], "cannot read a model config"),
    ]
    for models, words in cases:
        argv = ["extract", *models, "--rank", "2", "--out", str(tmp_path / "o")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lowrank: error: ") and words in err
    assert not (tmp_path / "o").exists()

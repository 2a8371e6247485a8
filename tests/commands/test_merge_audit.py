"""`lowrank merge-audit` on what `lowrank finetune --method qlora` writes, for tiny random BERT
(classification, head in modules_to_save) and Llama (causal) folders with all-MiniLM's
tokenizer.

Oracles: the model finetune trained (its own NF4 base, built by add_lora) scoring the same rows
gives (a)'s accuracy; the library call on the same model and batches gives the CLI's JSON; bad
inputs end in one `lowrank: error:` line and exit status 2.
"""

import json
import shutil

import pytest
import torch
import transformers

from lowrank.cli import main
from lowrank.commands.finetune import finetune
from lowrank.commands.merge_audit import RANDOM_LENGTH, RANDOM_ROWS, audit
from lowrank.torch.hf import minilm_path

WORDS = "good bad fine nice awful great ok meh wow sad glad mad".split()
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny model folders, data, and a QLoRA adapter trained by finetune on each."""
    root = tmp_path_factory.mktemp("merge-audit")
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 30522}  # fmt: skip
    kinds = {
        "bert": (transformers.BertForSequenceClassification, transformers.BertConfig(**small)),
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**small)),
    }
    rows = {
        "bert": [{"text": w, "label": "abc"[i % 3]} for i, w in enumerate(WORDS)],
        "llama": [{"text": f"the word {w} is here"} for w in WORDS],
    }
    out = {}
    for kind, (model_class, config) in kinds.items():
        folder = root / kind
        torch.manual_seed(0)
        model_class(config).save_pretrained(folder)
        for name in TOKENIZER:
            shutil.copy(minilm_path() / name, folder / name)
        data = root / f"{kind}.jsonl"
        data.write_text("\n".join(json.dumps(row) for row in rows[kind]) + "\n")
        result = finetune(
            folder, data, method="qlora", r=4, epochs=2, batch_size=4, lr=1e-2,
            out_dir=root / f"{kind}-run", progress=False,
        )  # fmt: skip
        out[kind] = {
            "base": folder,
            "data": data,
            "adapter": root / f"{kind}-run",
            "result": result,
        }
    return out


def _trained_accuracy(run) -> float:
    """The accuracy finetune's own trained model scores on the rows, row by row."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(run["base"])
    model = run["result"].model.eval()
    correct = total = 0
    with torch.no_grad():
        for line in run["data"].read_text().splitlines():
            row = json.loads(line)
            ids = tokenizer(row["text"], return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits
            if "label" in row:
                correct += int(logits.argmax(-1).item() == sorted("abc").index(row["label"]))
                total += 1
            else:  # the logits at t predict token t + 1
                correct += int((logits[0, :-1].argmax(-1) == ids[0, 1:]).sum())
                total += ids.shape[1] - 1
    return correct / total


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_the_trained_model_is_choice_a(runs, kind, capsys):
    run = runs[kind]
    argv = ["merge-audit", str(run["adapter"]), "--base", str(run["base"])]
    assert main([*argv, "--data", str(run["data"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    a, b, c, d = report["choices"]
    assert a["kl"] == 0 and a["agreement"] == 1
    assert a["accuracy"] == pytest.approx(_trained_accuracy(run), abs=1e-12)
    assert report["recommended"] in ("b", "c", "d") and report["settings"]["dtype"] == "bfloat16"
    assert len(report["layers"]) == (2 * 6 + 1 if kind == "bert" else 2 * 7)  # + BERT's pooler
    assert main(argv) == 0  # without data: random ids, no accuracy; the table
    table = capsys.readouterr().out
    assert "recommended: (" in table and "accuracy" in table
    assert f"{RANDOM_ROWS * RANDOM_LENGTH if kind == 'llama' else RANDOM_ROWS} outputs" in table


def test_the_cli_is_the_library(runs, capsys):
    run = runs["bert"]
    argv = ["merge-audit", str(run["adapter"]), "--base", str(run["base"]), "--json"]
    options = ["--quant-type", "nf4", "--dtype", "float16", "--data", str(run["data"])]
    assert main([*argv, *options, "--max-rows", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    library = audit(run["adapter"], run["base"], data=run["data"], dtype="float16", max_rows=5)
    assert report == json.loads(json.dumps(library.to_dict()))
    assert report["settings"]["compared"] == 5


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--quant-type", "int4"], "argument --quant-type: invalid choice: 'int4'"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["--blocksize", "48"], "argument --blocksize: must be a power of two, got '48'"),
        (["--data", "EMPTY"], "no data lines"),
        (["--data", "TEXT"], "holds text rows but the adapter has a classification head"),
        (["--base", "LLAMA"], "does not fit the model"),
        (["--base", "NOWHERE"], "no model folder at"),
    ],
)
def test_bad_inputs_are_one_line_and_exit_2(runs, tmp_path, capsys, options, words):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    places = {
        "EMPTY": str(empty),
        "TEXT": str(runs["llama"]["data"]),
        "LLAMA": str(runs["llama"]["base"]),
        "NOWHERE": str(tmp_path / "no" / "model"),
    }
    options = [places.get(option, option) for option in options]
    argv = ["merge-audit", str(runs["bert"]["adapter"]), "--base", str(runs["bert"]["base"])]
    try:
        code = main([*argv, *options])
    except SystemExit as exit_:  # argparse's errors exit from inside the parser
        code = exit_.code
    lines = capsys.readouterr().err.strip().splitlines()  # transformers' loading bar, then ours
    assert code == 2 and [line for line in lines if "error" in line] == lines[-1:]
    assert lines[-1].startswith("lowrank: error:") and words in lines[-1], lines

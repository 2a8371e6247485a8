"""Every user error of every command is one line `lowrank: error: ...` on stderr and exit status
2, never a traceback; a bug still shows its traceback; --help shows every default; --version.

Oracle: the contract's rule for the CLI, checked on the real entry point (`python -m lowrank` in
a fresh interpreter, offline) for every case that does not load torch, and in-process through
`lowrank.cli.main` for all of them (a subprocess that imports torch costs seconds and adds
nothing the in-process run does not see: the same `main` prints the same line). Each case names
the words its message must contain, so a one-line error about the wrong thing fails too.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lowrank
from lowrank.cli import build_parser, main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# (id, argv, words the error must contain). "{d}" is the folder of bad files built below.
PARSE_CASES = [
    ("no-command", [], "required: command"),
    ("unknown-command", ["bogus"], "invalid choice: 'bogus'"),
    ("unknown-option", ["estimate", "{d}/bert.json", "--bogus"], "unrecognized arguments"),
    ("missing-positional", ["finetune", "{d}/model"], "required: data"),
    ("bad-method", ["estimate", "{d}/bert.json", "--method", "dora"], "--method: invalid choice"),
    ("estimate-batch-0", ["estimate", "{d}/bert.json", "--batch-size", "0"], "--batch-size"),
    ("estimate-seq-len-neg", ["estimate", "{d}/bert.json", "--seq-len", "-1"], "--seq-len"),
    ("estimate-seq-len-float", ["estimate", "{d}/bert.json", "--seq-len", "1.5"], "'1.5'"),
    ("estimate-r-0", ["estimate", "{d}/bert.json", "--r", "0"], "--r: must be a positive"),
    ("estimate-empty-target", ["estimate", "{d}/bert.json", "--targets", "query,"], "--targets"),
    ("seed-negative", ["numpy-demo", "--seed", "-1"], "--seed: must be a non-negative"),
    ("seed-text", ["numpy-demo", "--seed", "x"], "--seed"),
    ("finetune-r-0", ["finetune", "m", "d", "--r", "0"], "--r/--lora-r: must be a positive"),
    ("alpha-inf", ["finetune", "m", "d", "--alpha", "inf"], "--alpha: must be a finite number"),
    ("alpha-nan", ["finetune", "m", "d", "--alpha", "nan"], "--alpha: must be a finite number"),
    ("alpha-overflow", ["finetune", "m", "d", "--alpha", "1e999"], "--alpha"),
    ("lr-0", ["finetune", "m", "d", "--lr", "0"], "--lr: must be a finite number > 0"),
    ("lr-negative", ["finetune", "m", "d", "--lr", "-0.001"], "--lr: must be a finite number"),
    ("lr-negative-exp", ["finetune", "m", "d", "--lr=-1e-4"], "--lr: must be a finite number"),
    ("lr-nan", ["finetune", "m", "d", "--lr", "nan"], "--lr"),
    ("epochs-0", ["finetune", "m", "d", "--epochs", "0"], "--epochs: must be a positive"),
    ("finetune-batch-0", ["finetune", "m", "d", "--batch-size", "0"], "--batch-size"),
    ("targets-empty", ["finetune", "m", "d", "--targets", ","], "--targets"),
    ("out-is-file", ["finetune", "m", "d", "--out", "{d}/bert.json"], "is not a folder"),
    ("out-under-file", ["finetune", "m", "d", "--out", "{d}/bert.json/run"], "is not a folder"),
    ("out-empty", ["finetune", "m", "d", "--out", ""], "empty path"),
    ("demo-out-is-file", ["demo", "--out", "{d}/bert.json"], "is not a folder"),
    ("eval-split-1", ["finetune", "m", "d", "--eval-split", "1"], "--eval-split: must be a fra"),
    ("eval-split-neg", ["finetune", "m", "d", "--eval-split=-0.1"], "--eval-split: must be"),
    ("eval-split-text", ["finetune", "m", "d", "--eval-split", "ten"], "got 'ten'"),
    (
        "eval-split-and-file",
        ["finetune", "m", "d", "--eval-split", "0.1", "--eval-file", "e.jsonl"],
        "--eval-file: not allowed with argument --eval-split",
    ),
    ("max-length-0", ["finetune", "m", "d", "--max-length", "0"], "--max-length: must be a pos"),
    ("finetune-seed-neg", ["finetune", "m", "d", "--seed", "-1"], "--seed: must be a non-neg"),
    ("schedule-bogus", ["finetune", "m", "d", "--schedule", "step"], "--schedule: invalid choice"),
    ("warmup-ratio-1", ["finetune", "m", "d", "--warmup-ratio", "1"], "--warmup-ratio: must be"),
    ("warmup-steps-neg", ["finetune", "m", "d", "--warmup-steps", "-2"], "--warmup-steps: must"),
    ("save-steps-0", ["finetune", "m", "d", "--save-steps", "0"], "--save-steps: must be a pos"),
    ("dropout-1", ["finetune", "m", "d", "--dropout", "1"], "--dropout: must be a fraction"),
    ("grad-accum-0", ["finetune", "m", "d", "--grad-accum-steps", "0"], "--grad-accum-steps"),
]
ESTIMATE_CASES = [
    ("missing-file", ["estimate", "{d}/nope.json"], "no config file at"),
    ("folder-without-config", ["estimate", "{d}/empty"], "folder without a config.json"),
    ("invalid-json", ["estimate", "{d}/invalid.json"], "invalid.json: not valid JSON"),
    ("empty-config", ["estimate", "{d}/empty.json"], "empty.json: not valid JSON"),
    ("json-list", ["estimate", "{d}/list.json"], "expected a JSON object"),
    ("missing-key", ["estimate", "{d}/no_hidden.json"], "missing key 'hidden_size'"),
    ("wrong-type", ["estimate", "{d}/big.json"], "'hidden_size' must be a positive int"),
    ("zero-heads", ["estimate", "{d}/zero_heads.json"], "'num_attention_heads' must be"),
    ("no-model-type", ["estimate", "{d}/no_type.json"], "no 'model_type' key"),
    ("model-type-list", ["estimate", "{d}/type_list.json"], "'model_type' must be a string"),
    ("unsupported-model", ["estimate", "{d}/t5.json"], "model_type 't5' is not supported"),
    ("binary-config", ["estimate", "{d}/binary.json"], "binary.json: not UTF-8"),
    ("nested-config", ["estimate", "{d}/nested.json"], "nested more than 100 levels"),
    ("unknown-target", ["estimate", "{d}/bert.json", "--targets", "q_proj"], "unknown targets"),
]
# finetune's job: everything the data reader and the model loader find
FINETUNE_CASES = [
    ("model-missing", ["finetune", "{d}/no-such-model", "{d}/ok.jsonl"], "no model folder at"),
    ("model-not-a-model", ["finetune", "{d}/empty", "{d}/ok.jsonl"], "not a model folder"),
    ("model-is-a-file", ["finetune", "{d}/ok.jsonl", "{d}/ok.jsonl"], "is a file"),
    ("model-no-weights", ["finetune", "{d}/model", "{d}/ok.jsonl"], "cannot load a model"),
    ("data-missing", ["finetune", "{d}/model", "{d}/nope.jsonl"], "no data file at"),
    ("data-is-folder", ["finetune", "{d}/model", "{d}/empty"], "is a folder"),
    ("data-empty", ["finetune", "{d}/model", "{d}/empty.jsonl"], "empty.jsonl: the file has no"),
    (
        "data-bad-json",
        ["finetune", "{d}/model", "{d}/broken.jsonl"],
        "broken.jsonl:3: not valid JSON (Expecting ',' delimiter at column 18)",
    ),
    ("data-nested", ["finetune", "{d}/model", "{d}/nested.jsonl"], "nested.jsonl:2: JSON nested"),
    (
        "data-invalid-utf8",
        ["finetune", "{d}/model", "{d}/latin1.jsonl"],
        "latin1.jsonl:2: not valid",
    ),
    ("data-nul", ["finetune", "{d}/model", "{d}/nul.jsonl"], "nul.jsonl:1: contains a NUL byte"),
    ("data-utf16", ["finetune", "{d}/model", "{d}/utf16.jsonl"], "utf16.jsonl:1: contains a NUL"),
    ("data-not-object", ["finetune", "{d}/model", "{d}/list.jsonl"], "list.jsonl:2: expected a"),
    ("data-mixed-labels", ["finetune", "{d}/model", "{d}/mixed.jsonl"], "mixed.jsonl:2: label 1"),
    ("data-surrogate", ["finetune", "{d}/model", "{d}/surrogate.jsonl"], "unpaired surrogate"),
    (
        "resume-missing",
        ["finetune", "{d}/model", "{d}/ok.jsonl", "--resume", "{d}/empty"],
        "no training checkpoint at",
    ),
    (
        "eval-file-missing",
        ["finetune", "{d}/model", "{d}/ok.jsonl", "--eval-file", "{d}/nope.jsonl"],
        "no data file at",
    ),
    (
        "eval-file-other-format",
        ["finetune", "{d}/model", "{d}/ok.jsonl", "--eval-file", "{d}/mixed-ok.jsonl"],
        "mixed-ok.jsonl is classification but",
    ),
]
# the finetune cases also run in a fresh interpreter (each imports torch: a few seconds)
FINETUNE_SUBPROCESS = {"model-no-weights", "data-nested", "data-invalid-utf8", "resume-missing"}


def _write_bad_files(d: Path) -> None:
    (d / "empty").mkdir()
    bert = {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "vocab_size": 100,
        "max_position_embeddings": 64,
    }
    configs = {
        "bert": bert,
        "list": [bert],
        "no_hidden": {k: v for k, v in bert.items() if k != "hidden_size"},
        "big": {**bert, "hidden_size": "big"},
        "zero_heads": {**bert, "num_attention_heads": 0},
        "no_type": {k: v for k, v in bert.items() if k != "model_type"},
        "type_list": {**bert, "model_type": ["bert"]},
        "t5": {**bert, "model_type": "t5"},
    }
    for name, config in configs.items():
        (d / f"{name}.json").write_text(json.dumps(config))
    (d / "invalid.json").write_text('{"model_type": "bert",\n "hidden_size": }\n')
    (d / "empty.json").write_text("")
    (d / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    deep = "[" * 100_000 + "]" * 100_000  # Python's json would raise RecursionError
    (d / "nested.json").write_text(deep)
    (d / "model").mkdir()  # passes for a model folder (a config.json) but holds no weights
    (d / "model" / "config.json").write_text(json.dumps(bert))

    ok = '{"text": "fine"}\n'
    (d / "ok.jsonl").write_text(ok * 2)
    (d / "empty.jsonl").write_text("")
    (d / "broken.jsonl").write_text(ok * 2 + '{"text": "broken"\n')
    (d / "nested.jsonl").write_text(ok + '{"text": ' + deep + "}\n")
    (d / "latin1.jsonl").write_bytes(ok.encode() + '{"text": "café"}\n'.encode("latin-1"))
    (d / "nul.jsonl").write_bytes(b'{"text": "a\x00b"}\n')
    (d / "utf16.jsonl").write_text(ok * 2, encoding="utf-16")
    (d / "list.jsonl").write_text(ok + '["text", "fine"]\n')
    (d / "mixed.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": 1}\n')
    (d / "mixed-ok.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    (d / "surrogate.jsonl").write_text('{"text": "a \\ud800 b"}\n')


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    _write_bad_files(d)
    return d


def _argv(argv: list[str], d: Path) -> list[str]:
    return [arg.replace("{d}", str(d)) for arg in argv]


def _assert_one_error_line(stderr: str, words: str, case: str = "") -> None:
    assert "Traceback" not in stderr, (case, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1, (case, stderr)
    assert lines[0].startswith("lowrank: error: "), (case, stderr)
    assert words in lines[0], (case, words, lines[0])


def _run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's errors exit from parse_args
        code = exit_.code
    return code, capsys.readouterr().err


def _ids(cases):
    return [case[0] for case in cases]


@pytest.mark.parametrize(
    "name, argv, words", PARSE_CASES + ESTIMATE_CASES, ids=_ids(PARSE_CASES + ESTIMATE_CASES)
)
def test_error_in_process(name, argv, words, bad, capsys):
    code, err = _run_in_process(_argv(argv, bad), capsys)
    assert code == 2
    _assert_one_error_line(err, words)


@pytest.mark.parametrize("name, argv, words", FINETUNE_CASES, ids=_ids(FINETUNE_CASES))
def test_finetune_error_in_process(name, argv, words, bad, capsys):
    code, err = _run_in_process(_argv(argv, bad), capsys)
    assert code == 2
    _assert_one_error_line(err, words)


SUBPROCESS_CASES = [
    *PARSE_CASES,
    *ESTIMATE_CASES,
    *(case for case in FINETUNE_CASES if case[0] in FINETUNE_SUBPROCESS),
]


def test_every_error_through_the_real_entry_point(bad, tmp_path):
    # One test, the cases run side by side: each is a fresh `python -m lowrank`, offline, in an
    # empty folder (so a default --out can only be made there).
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "lowrank", *_argv(argv, bad)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=tmp_path,
        )
        for name, argv, _ in SUBPROCESS_CASES
    }
    for name, _, words in SUBPROCESS_CASES:
        out, err = runs[name].communicate(timeout=120)
        assert runs[name].returncode == 2, (name, err)
        assert "Traceback" not in out, name
        _assert_one_error_line(err, words, name)
    assert not list(tmp_path.iterdir())  # no error left a folder behind


def test_read_only_out_folder(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    if os.access(folder, os.W_OK):  # root: permissions do not bind, so give the kernel's answer
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode: Path(p) != folder and real_access(p, mode)
        )
    code, err = _run_in_process(["finetune", "m", "d", "--out", str(folder / "run")], capsys)
    assert code == 2
    _assert_one_error_line(err, f"cannot write to {folder}: permission denied")


# ----------------------------------------------------------------------------- with a model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models: a Llama with all-MiniLM's tokenizer; the same with a 64-token
    vocabulary (the tokenizer does not fit it); a GPT-2 without tokenizer files."""
    import torch
    import transformers

    from lowrank.torch.hf import minilm_path

    root = tmp_path_factory.mktemp("models")
    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    made = {
        "llama": transformers.LlamaConfig(**sizes, num_attention_heads=2, vocab_size=30522),
        "small-vocab": transformers.LlamaConfig(**sizes, num_attention_heads=2, vocab_size=64),
        "gpt2-no-tokenizer": transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2),
    }
    folders = {}
    for name, config in made.items():
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
        if "no-tokenizer" not in name:
            for file in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
                shutil.copy(minilm_path() / file, root / name / file)
        folders[name] = root / name
    return folders


def _last_line(stderr: str, words: str) -> None:
    # a model that loads may print transformers' own notes first; the error is the last line
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert [line for line in lines if line.startswith("lowrank:")] == lines[-1:], stderr
    assert lines[-1].startswith("lowrank: error: ") and words in lines[-1], lines[-1]


@pytest.mark.parametrize(
    "model, rows, extra, words",
    [
        ("gpt2-no-tokenizer", [{"text": "a b"}], [], "has no vocabulary"),
        ("small-vocab", [{"text": "a b"}, {"text": "c"}], [], "ok.jsonl:1: the tokenizer gives"),
        ("llama", [{"text": "a b"}, {"text": "c"}], ["--targets", "nope"], "target 'nope'"),
        ("llama", [{"text": "a b"}, {"text": "c"}], ["--eval-split", "0.1"], "holds no row"),
        ("llama", [{"text": "a b"}, {"text": "c"}], ["--eval-split", "0.9"], "leaving none"),
    ],
    ids=["no-tokenizer", "tokenizer-mismatch", "unknown-target", "split-empty", "split-all"],
)
def test_finetune_errors_found_after_loading(models, model, rows, extra, words, tmp_path, capsys):
    data = tmp_path / "ok.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["finetune", str(models[model]), str(data), "--out", str(tmp_path / "run"), *extra]
    code, err = _run_in_process(argv, capsys)
    assert code == 2
    _last_line(err, words)


def test_finetune_refuses_rows_with_nothing_to_learn(models, tmp_path):
    # max_length 3 keeps "[CLS] question [SEP]" and cuts every completion token: all labels
    # would be -100 and the loss nan. The library call says which line.
    from lowrank.commands.finetune import finetune

    data = tmp_path / "pc.jsonl"
    data.write_text('\n{"prompt": "question", "completion": "answer"}\n')
    with pytest.raises(ValueError, match=r"pc.jsonl:2: no token to learn from"):
        finetune(models["llama"], data, max_length=3, out_dir=tmp_path / "run", progress=False)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"alpha": float("inf")}, "alpha must be a positive number"),
        ({"alpha": float("nan")}, "alpha must be a positive number"),
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"epochs": 0}, "epochs must be a positive int"),
        ({"r": 0}, "r must be a positive int"),
        ({"method": "dora"}, "method must be one of"),
        ({"schedule": "step"}, "schedule must be one of"),
        ({"eval_split": 1.0}, "eval_split must be a fraction"),
        ({"eval_split": 0.1, "eval_file": "e.jsonl"}, "an evaluation split or an evaluation file"),
        ({"seed": -1}, "seed must be a non-negative int"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"warmup_steps": -1}, "warmup_steps must be a non-negative int"),
        ({"save_steps": 0}, "save_steps must be a positive int"),
        ({"max_length": 0}, "max_length must be a positive int"),
    ],
)
def test_finetune_function_checks_its_arguments(options, words, bad):
    from lowrank.commands.finetune import finetune

    with pytest.raises(ValueError, match=words):  # before the data or a model is read
        finetune(bad / "no-such-model", bad / "nope.jsonl", **options)


def test_a_diverged_run_is_an_error(monkeypatch, bad, capsys):
    # Oracle: a stand-in run whose second step's loss is nan; the command must not print
    # "final loss nan" and exit 0.
    from lowrank.commands import finetune as job
    from lowrank.torch.train import TrainResult

    run = TrainResult(losses=[2.0, float("nan")], steps=2, out_dir="runs/x")
    diverged = job.FinetuneResult(run, None, "an adapter", [], 0)
    monkeypatch.setattr(job, "finetune", lambda *args, **kwargs: diverged)
    code, err = _run_in_process(["finetune", str(bad / "model"), str(bad / "ok.jsonl")], capsys)
    assert code == 2
    _assert_one_error_line(err, "training diverged: the loss was nan at step 2")


# ----------------------------------------------------------------------------- bugs, help


def test_bf16_without_a_gpu_is_refused_by_name(bad, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("--bf16 is refused only where no GPU is")
    argv = ["finetune", str(bad / "model"), str(bad / "ok.jsonl"), "--bf16"]
    code, err = _run_in_process(argv, capsys)
    assert code == 2
    _assert_one_error_line(err, "bf16 needs a CUDA GPU")


def test_a_bug_keeps_its_traceback(monkeypatch, bad):
    # Oracle: an exception that is no user error (here ZeroDivisionError) is not caught.
    from lowrank.commands import estimate

    monkeypatch.setattr(estimate, "main", lambda args: 1 // 0)
    with pytest.raises(ZeroDivisionError):
        main(["estimate", str(bad / "bert.json")])
    code = (
        "import lowrank.commands.estimate as job\n"
        "job.main = lambda args: 1 // 0\n"
        "from lowrank.cli import main\n"
        f"raise SystemExit(main(['estimate', {str(bad / 'bert.json')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ZeroDivisionError" in done.stderr


def test_a_missing_package_is_one_line(monkeypatch, bad, capsys):
    from lowrank.commands import estimate

    def needs_torch(args):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(estimate, "main", needs_torch)
    code, err = _run_in_process(["estimate", str(bad / "bert.json")], capsys)
    assert code == 2
    _assert_one_error_line(err, "needs the 'torch' package")


def _subparsers() -> dict:
    parser = build_parser()
    return {"": parser, **parser._subparsers._group_actions[0].choices}


def test_help_shows_every_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: each option's help on one line
    for name, parser in _subparsers().items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if not action.option_strings or action.default == argparse.SUPPRESS:
                continue  # positionals, --help, --version
            assert action.help, (name, action.option_strings)
            if action.required:  # nothing to default to
                continue
            if action.default is None:  # the help says what happens instead
                assert "default: " in action.help, (name, action.option_strings)
            else:
                assert f"{action.help} (default: {action.default})" in text, (name, action.dest)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"lowrank {lowrank.__version__}\n"
    done = subprocess.run(
        [sys.executable, "-m", "lowrank", "--version"], capture_output=True, text=True, env=ENV
    )
    assert done.returncode == 0 and done.stdout == f"lowrank {lowrank.__version__}\n"

"""The `lowrank` command line: every command exists, runs its job from lowrank.commands, and the
library halves never import a job."""

import argparse
import ast
from pathlib import Path

import pytest

import lowrank
from lowrank.cli import build_parser, main


def test_commands_exist():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"numpy-demo", "demo", "finetune", "estimate"} <= set(commands)


@pytest.mark.parametrize(
    "argv, module",
    [
        (["numpy-demo"], "numpy_demo"),
        (["demo", "--smoke"], "demo"),
        (["finetune", "model", "data.jsonl"], "finetune"),
        (["estimate", "config.json"], "estimate"),
    ],
)
def test_each_command_calls_its_job(argv, module, monkeypatch):
    # Oracle: a stand-in for lowrank.commands.<module>.main records what the CLI passes it.
    import importlib

    job = importlib.import_module(f"lowrank.commands.{module}")
    calls = []
    monkeypatch.setattr(job, "main", lambda args: calls.append(args) or 7)
    assert main(argv) == 7
    assert len(calls) == 1 and isinstance(calls[0], argparse.Namespace)
    assert calls[0].command == argv[0]


def test_library_halves_never_import_a_job():
    # Oracle: every import statement (parsed, lazy ones included) of lowrank.numpy and
    # lowrank.torch; "commands" as a module or a name imported from lowrank is a job.
    root = Path(lowrank.__file__).parent
    for path in [*(root / "numpy").glob("*.py"), *(root / "torch").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                modules = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            assert not any("commands" in module.split(".") for module in modules), path.name

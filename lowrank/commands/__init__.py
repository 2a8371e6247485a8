"""The `lowrank` command line's jobs: each composes the library halves into one command.

- `numpy_demo`: `lowrank numpy-demo`, a tiny MLP adapted with NumPy alone (needs no torch);
- `demo` (and `demo_report`, its report folder): `lowrank demo`, all-MiniLM-L6-v2 fine-tuned
  on VADER words with every method, every claim checked;
- `finetune`: `lowrank finetune`, a Hugging Face model fine-tuned on your JSONL file;
- `estimate`: `lowrank estimate`, training memory from a config alone.

Each module has `main(args: argparse.Namespace) -> int`, which `lowrank.cli` calls after
importing the module lazily. The rule: jobs compose both halves; `lowrank.numpy` and
`lowrank.torch` never import from here.
"""

"""lowrank's benchmark harness: `python benchmarks/run.py` (or `python -m benchmarks.run`).

Not part of the installed library. See docs/benchmarks.md for what each row measures.
"""

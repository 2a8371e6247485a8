"""Repository-wide pytest setup: notebooks run in smoke mode, CUDA tests skip without a GPU."""

import os
import sys
from pathlib import Path

import pytest

# Helpers the tests share (tests/toy_models.py) are imported by name.
sys.path.insert(0, str(Path(__file__).parent / "tests"))

# Notebooks executed by pytest (nbmake) inherit this environment: fast sizes, same code path.
os.environ.setdefault("LOWRANK_SMOKE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# pytest-xdist already runs one worker per core: more threads per worker only oversubscribe
# (measured: 2-thread OpenBLAS SVDs and torch matmuls ran 30-100x slower on 2 busy cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    if not any(item.get_closest_marker("cuda") for item in items):
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)

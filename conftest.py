"""Repository-wide pytest setup: notebooks run in smoke mode, CUDA tests skip without a GPU,
hypothesis is deterministic in CI."""

import os
import sys
from pathlib import Path

import pytest

try:
    from hypothesis import settings
except ImportError:  # hypothesis comes with the dev extra; tests that need it import it
    settings = None

if settings is not None:
    # CI (CI=true): the same examples on every run, chosen from each test's name, and no
    # example database, so a failure found on someone's machine (.hypothesis/, not committed)
    # cannot replay in CI and a run is red or green by the code alone. print_blob shows how
    # to reproduce a failure. Elsewhere ("dev"): random examples and the local database, so
    # every run explores new inputs and replays the ones that failed before.
    # HYPOTHESIS_PROFILE=ci|dev chooses one by name. A test's own @settings(max_examples=...,
    # deadline=None) sets only those two; none may set derandomize or a database.
    settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
    settings.register_profile("dev", print_blob=True, deadline=None)
    in_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if in_ci else "dev"))

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

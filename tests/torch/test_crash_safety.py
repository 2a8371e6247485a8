"""A save killed at any instant leaves the old adapter or the new one, complete.

A child process saves two distinguishable adapters into one folder in a loop (r=2, alpha=3
and r=4, alpha=7 with rsLoRA, different factors) and is SIGKILLed at random instants (seeded),
half of the runs through the exchange swap and half through the portable fallback (rename
aside, rename in). After each kill the folder must load with `load_adapter` into a fresh model
and be exactly one of the two adapters (config values and every factor); the next successful
save must leave no temporary entry behind.

Oracles: the two adapters as built in this process (their tensors and hyperparameters), and
the file system's listing. Children come from a forkserver that has imported torch, so a kill
costs milliseconds, not an interpreter start.
"""

import multiprocessing
import os
import random
import sys
import time

import pytest
import torch

from lowrank.torch import load_adapter, lora_layers, lora_state_dict, save_adapter

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL and a forkserver")

# Run in this process and in each child (exec'd): the two adapters, built identically.
BUILD = """
import torch
from torch import nn
from lowrank.torch import add_lora


def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6)).double()


def build(which):
    r, alpha, rslora = [(2, 3, False), (4, 7, True)][which]
    model = add_lora(base(), ["0", "2"], r=r, alpha=alpha, use_rslora=rslora)
    generator = torch.Generator().manual_seed(100 + which)
    with torch.no_grad():
        for _, layer in model.named_modules():
            if hasattr(layer, "A") and "default" in getattr(layer, "A", {}):
                layer.A["default"].copy_(torch.randn(layer.A["default"].shape, generator=generator))
                layer.B["default"].copy_(torch.randn(layer.B["default"].shape, generator=generator))
    return model
"""

CHILD = (
    BUILD
    + """
import lowrank._folders as folders
from lowrank.torch import save_adapter

if FALLBACK:
    folders._exchange = lambda first, second: False  # the portable swap: rename aside, rename in
models = [build(0), build(1)]
READY.set()
i = START
while True:
    save_adapter(models[i % 2], FOLDER)
    i += 1
"""
)

KILLS = 100
TIME_BUDGET_S = 20.0


def _built():
    namespace = {}
    exec(BUILD, namespace)
    return namespace["base"], namespace["build"]


def _which(folder, base, expected) -> int:
    """Load the folder into a fresh model; return which adapter it is (it must be one, whole)."""
    loaded = load_adapter(base(), folder)
    tensors = lora_state_dict(loaded)
    matches = []
    for which, (state, hyper) in enumerate(expected):
        same_keys = tensors.keys() == state.keys()
        if same_keys and all(torch.equal(tensors[k], state[k]) for k in state):
            layers = [
                (layer.r["default"], layer.alpha["default"], layer.use_rslora["default"])
                for _, layer in lora_layers(loaded)
            ]
            assert layers == hyper, f"factors of adapter {which} with hyperparameters {layers}"
            matches.append(which)
    assert len(matches) == 1, f"the folder holds neither adapter whole: {sorted(tensors)}"
    return matches[0]


def _strays(folder) -> list[str]:
    outside = sorted(e for e in os.listdir(folder.parent) if e != folder.name)
    inside = sorted(os.listdir(folder)) if folder.is_dir() else []
    extra_inside = [
        e for e in inside if e not in ("adapter_config.json", "adapter_model.safetensors")
    ]
    return outside + [f"{folder.name}/{e}" for e in extra_inside]


def test_a_killed_save_leaves_one_whole_adapter(tmp_path):
    base, build = _built()
    models = [build(0), build(1)]
    expected = [
        (
            lora_state_dict(m),
            [
                (l.r["default"], l.alpha["default"], l.use_rslora["default"])
                for _, l in lora_layers(m)
            ],
        )
        for m in models
    ]
    assert expected[0][1] != expected[1][1]
    folder = tmp_path / "runs" / "adapter"
    started = time.perf_counter()
    save_adapter(models[0], folder)
    for _ in range(4):  # how long one save takes here: the kills spread over about 3 of them
        save_adapter(models[0], folder)
    save_s = (time.perf_counter() - started) / 5

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "lowrank.torch"])
    rng = random.Random(1234)
    kills, mid_save, recovered, seen = 0, 0, 0, [0, 0]
    current = _which(folder, base, expected)
    begin = time.perf_counter()
    while kills < KILLS and time.perf_counter() - begin < TIME_BUDGET_S:
        ready = context.Event()
        fallback = kills % 2 == 1
        names = {"FOLDER": str(folder), "START": 1 - current, "FALLBACK": fallback, "READY": ready}
        child = context.Process(target=exec, args=(CHILD, names), daemon=True)
        child.start()
        assert ready.wait(30), "the saving child did not start"
        time.sleep(rng.uniform(0, 3 * save_s))
        child.kill()
        child.join()
        assert child.exitcode == -9, f"the child ended by itself ({child.exitcode})"
        kills += 1
        if _strays(folder):
            mid_save += 1
        if not folder.exists():
            recovered += 1  # killed between the fallback's two renames: the loader renames back
        current = _which(folder, base, expected)
        seen[current] += 1
        # the next successful save clears every temporary entry of the killed one
        current = 1 - current
        save_adapter(models[current], folder)
        assert _strays(folder) == []
        assert _which(folder, base, expected) == current
    elapsed = time.perf_counter() - begin
    print(
        f"\n{kills} kills in {elapsed:.1f} s (one save: {1000 * save_s:.1f} ms): "
        f"{mid_save} left temporaries, {recovered} left the folder aside, "
        f"folder held adapter 0/1: {seen}"
    )
    assert kills >= 40, f"only {kills} kills in {TIME_BUDGET_S} s"
    assert mid_save >= kills // 4, "few kills landed inside a save: the test tests little"
    assert min(seen) > 0  # kills left old and new versions alike


# A child that dies (os._exit: no cleanup, like a kill) just before its K-th file-system
# change: every instant between two steps of a save is tried, not just random ones.
STEP_CHILD = (
    BUILD
    + """
import os
import shutil
import lowrank._folders as folders
from lowrank.torch import save_adapter

if FALLBACK:
    folders._exchange = lambda first, second: False
count = [0]


def dying(function):
    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == K:
            os._exit(3)
        return function(*args, **kwargs)

    return wrapper


for name in ("rename", "replace", "mkdir", "link", "unlink", "rmdir", "fsync", "chmod"):
    setattr(os, name, dying(getattr(os, name)))
folders._exchange = dying(folders._exchange)
save_adapter(build(WHICH), FOLDER)
os._exit(0)
"""
)


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "rename-aside"])
def test_a_save_dying_between_any_two_steps_leaves_one_whole_adapter(tmp_path, fallback):
    base, build = _built()
    models = [build(0), build(1)]
    expected = [
        (
            lora_state_dict(m),
            [
                (l.r["default"], l.alpha["default"], l.use_rslora["default"])
                for _, l in lora_layers(m)
            ],
        )
        for m in models
    ]
    folder = tmp_path / "adapter"
    (tmp_path / "adapter").mkdir()
    (folder / "log.jsonl").write_text("kept\n")  # a file the save does not own
    save_adapter(models[0], folder)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "lowrank.torch"])
    outcomes, missing = [], []
    for step in range(1, 200):
        names = {"FOLDER": str(folder), "WHICH": 1, "FALLBACK": fallback, "K": step}
        child = context.Process(target=exec, args=(STEP_CHILD, names), daemon=True)
        child.start()
        child.join(60)
        assert child.exitcode in (0, 3), child.exitcode
        missing.append(not folder.exists())  # between the fallback's two renames
        outcomes.append(_which(folder, base, expected))
        assert (folder / "log.jsonl").read_text() == "kept\n"
        save_adapter(models[0], folder)  # back to the old adapter, strays cleared
        assert _strays(folder) == ["adapter/log.jsonl"]
        if child.exitcode == 0:  # the save completed: every step before it was tried
            break
    else:
        pytest.fail("the save never completed")
    assert outcomes[-1] == 1 and outcomes[0] == 0
    # old until the swap, new from then on: never back and forth
    assert outcomes == sorted(outcomes), outcomes
    # only the fallback has an instant without the folder; the loader renamed the old one back
    assert any(missing) == fallback and sum(missing) <= 1
    print(f"\n{len(outcomes)} steps, dying before each in turn: {outcomes}")


def test_loads_during_saves_by_another_process_never_mix_two_adapters(tmp_path):
    base, build = _built()
    models = [build(0), build(1)]
    expected = [
        (
            lora_state_dict(m),
            [
                (l.r["default"], l.alpha["default"], l.use_rslora["default"])
                for _, l in lora_layers(m)
            ],
        )
        for m in models
    ]
    folder = tmp_path / "adapter"
    save_adapter(models[0], folder)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "lowrank.torch"])
    ready = context.Event()
    names = {"FOLDER": str(folder), "START": 1, "FALLBACK": False, "READY": ready}
    child = context.Process(target=exec, args=(CHILD, names), daemon=True)
    child.start()
    try:
        assert ready.wait(30)
        seen, end = [0, 0], time.perf_counter() + 1.5
        while time.perf_counter() < end:
            seen[_which(folder, base, expected)] += 1  # raises on a mix
    finally:
        child.kill()
        child.join()
    print(f"\nloads during saves: adapter 0/1 {seen}")
    assert min(seen) > 0  # the saves really ran while loading

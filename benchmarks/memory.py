"""Peak memory of a contender's training step, measured honestly on CPU and on CUDA.

CPU: in a fresh Python process (`python -m benchmarks.memory '<cases as JSON>'`, started by
`peak_bytes`) with MALLOC_MMAP_THRESHOLD_=65536, so glibc returns freed tensors to the OS at
once and resident memory follows what is allocated (as `lowrank.torch.measure` does). The
process first runs the same kind of case at a tiny size (code, libraries, thread pools loaded)
and then the first case itself (the one-time buffers of a first large step), then for each
case: resident memory before building the contender is the baseline; the
contender is built (its full-precision weight made, quantized and freed), the peak is reset
(`lowrank.torch.measure.reset_peak_rss`, VmHWM), one step runs, and the case's number is the
peak resident memory minus the baseline: what the contender holds plus what its step needs.
tracemalloc would miss torch's allocations, and ru_maxrss cannot be reset.

CUDA: in this process, torch.cuda.max_memory_allocated after a reset, minus the memory
allocated before the contender was built.
"""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _build(case: dict, device: torch.device):
    """The contender's step: a callable running one fwd+bwd (layers) or one optimizer step."""
    dtype = getattr(torch, case.get("dtype", "float32"))
    if case["kind"] in ("lora", "qlora"):
        from benchmarks.rows_lora import fwd_bwd, inputs, layer

        model = layer(case["kind"], case["who"], case["width"], case["r"], dtype, device)
        x, dy = inputs(case["width"], case["tokens"], dtype, device)
        return fwd_bwd(model, x, dy), model
    from benchmarks.rows_step import build_step

    return build_step(case, device)


def measure_here(case: dict, device: torch.device) -> int:
    """Peak bytes of building the contender and one step, measured in this process."""
    from lowrank.torch.measure import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss_bytes()
    step, model = _build(case, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        reset_peak_rss()
        step()
        peak = peak_rss_bytes() - before
    del step, model
    gc.collect()
    return int(peak)


def _tiny(case: dict) -> dict:
    tiny = dict(case)
    for key, value in (("width", 64), ("tokens", 8), ("r", 4), ("batch", 1), ("seq", 8)):
        if key in tiny:
            tiny[key] = value
    if "layers" in tiny:
        tiny["layers"] = 1
    return tiny


def peak_bytes(cases: list[dict], device: torch.device, dtype: torch.dtype) -> list[int]:
    """Peak bytes of each case: a fresh process on CPU, this process on CUDA."""
    cases = [dict(c, dtype=str(dtype).removeprefix("torch.")) for c in cases]
    if device.type == "cuda":
        return [measure_here(c, device) for c in cases]
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", json.dumps(cases)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    cases = json.loads(sys.argv[1])
    device = torch.device("cpu")
    # warm-up: code, libraries, thread pools, and the first case at its full size: the first
    # large step in a process holds ~4 MiB more for either contender (MKL's and the allocator's
    # one-time buffers: a 2048-wide QLoRA layer measured 42.1, 38.4, 38.4 MiB in a row)
    measure_here(_tiny(cases[0]), device)
    measure_here(cases[0], device)
    print(json.dumps([measure_here(c, device) for c in cases]))


if __name__ == "__main__":
    main()

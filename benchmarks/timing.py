"""Timing: interleaved repeats after warm-up, medians and spread; CUDA-aware.

`race({"ours": f, "bnb": g, "floor": h}, ...)` runs each callable once or more to warm up,
picks a per-contender inner loop count so one sample lasts at least `min_sample_s` (tiny
operations are otherwise all timer noise), then takes `repeats` samples of every contender
round-robin, rotating the order each round, so that a neighbour's load or a clock change
hits all contenders alike. On CUDA each sample is bracketed by CUDA events and the device is
synchronized before the sample is read; on CPU `time.perf_counter` is used.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Stats:
    """Seconds per call of one contender: median, spread, every sample."""

    median: float
    spread: float  # (p75 - p25) / median with >= 4 samples, else (max - min) / median
    samples: list[float] = field(default_factory=list)
    inner: int = 1  # calls per sample

    def as_dict(self) -> dict:
        return {
            "median_s": self.median,
            "spread": self.spread,
            "samples_s": self.samples,
            "calls_per_sample": self.inner,
        }


def _spread(samples: list[float]) -> float:
    median = statistics.median(samples)
    if median <= 0:
        return 0.0
    if len(samples) >= 4:
        q1, _, q3 = statistics.quantiles(samples, n=4)
        return (q3 - q1) / median
    return (max(samples) - min(samples)) / median


def _sample(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    """Seconds per call over `inner` back-to-back calls."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    start_s = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start_s) / inner


def race(
    contenders: dict[str, Callable[[], object]],
    *,
    repeats: int,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    min_sample_s: float = 0.02,
    max_inner: int = 1000,
) -> dict[str, Stats]:
    """Median seconds per call of each contender, sampled interleaved after warm-up."""
    device = torch.device(device)
    inner = {}
    for name, fn in contenders.items():
        for _ in range(warmup):
            fn()
        one = _sample(fn, 1, device)  # the last warm-up, timed, sizes the inner loop
        inner[name] = max(1, min(max_inner, int(min_sample_s / max(one, 1e-9)) + 1))
        if one >= min_sample_s:
            inner[name] = 1
    samples = {name: [] for name in contenders}
    names = list(contenders)
    for round_ in range(repeats):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            samples[name].append(_sample(contenders[name], inner[name], device))
    return {
        name: Stats(statistics.median(s), _spread(s), s, inner[name]) for name, s in samples.items()
    }

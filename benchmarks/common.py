"""What every row module shares: the settings of a run, the row record, peers' availability."""

import importlib
from dataclasses import dataclass, field

import torch

from benchmarks.timing import Stats

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Settings:
    """One run's options (from the command line)."""

    quick: bool
    device: torch.device
    dtypes: list[str]
    repeats: int
    min_sample_s: float
    out: str

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class Row:
    """One comparison: ours against each peer, with the floor measured in the same race.

    `times` maps contender -> Stats ("lowrank" is ours); `floor_s` is the floor's seconds;
    `targets` lists (against, max_ratio): ours/against <= max_ratio, against a peer or "floor";
    `memory` maps contender -> peak bytes; `check` says how ours and theirs were compared.
    """

    group: str
    name: str
    times: dict[str, Stats] = field(default_factory=dict)
    floor_s: float | None = None
    floor_what: str = ""
    targets: list[tuple[str, float]] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)
    memory_targets: list[tuple[str, float]] = field(default_factory=list)
    check: str = ""
    ours: str = "lowrank"
    notes: list[str] = field(default_factory=list)
    profile_fn: object = None  # our side's callable, profiled when a target is missed

    def ratio(self, against: str) -> float | None:
        if self.ours not in self.times:
            return None
        if against == "floor":
            base = self.floor_s
        else:
            base = self.times[against].median if against in self.times else None
        return None if not base else self.times[self.ours].median / base

    def memory_ratio(self, against: str) -> float | None:
        if self.ours in self.memory and self.memory.get(against):
            return self.memory[self.ours] / self.memory[against]
        return None

    def verdicts(self) -> list[dict]:
        """Each target with its ratio and whether it is met (None: could not be measured)."""
        out = []
        for against, limit in self.targets:
            ratio = self.ratio(against)
            met = None if ratio is None else ratio <= limit
            out.append(
                {"kind": "time", "against": against, "max": limit, "ratio": ratio, "met": met}
            )
        for against, limit in self.memory_targets:
            ratio = self.memory_ratio(against)
            met = None if ratio is None else ratio <= limit
            out.append(
                {"kind": "memory", "against": against, "max": limit, "ratio": ratio, "met": met}
            )
        return out

    def as_dict(self) -> dict:
        return {
            "group": self.group,
            "name": self.name,
            "ours": self.ours,
            "times": {k: v.as_dict() for k, v in self.times.items()},
            "floor_s": self.floor_s,
            "floor_what": self.floor_what,
            "memory_bytes": self.memory,
            "check": self.check,
            "notes": self.notes,
            "targets": self.verdicts(),
        }


_missing: dict[str, str] = {}


def peer(module: str) -> object | None:
    """Import a peer library, or None (and remember why) when it is not installed."""
    try:
        return importlib.import_module(module)
    except Exception as error:  # ImportError, or a broken install (a missing CUDA library)
        _missing[module] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        return None


def missing_peers() -> dict[str, str]:
    """Peers that were skipped, with the reason."""
    return dict(_missing)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

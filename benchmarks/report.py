"""The run's outputs: a Markdown table (latest.md), JSON (latest.json), plots (PNG; the docs
hook copies them into the site, docs/benchmarks.md shows them), and profiles of our side where
a target is missed."""

import cProfile
import io
import json
import os
import platform
import pstats
import re
from pathlib import Path

import torch

from benchmarks.common import Row


def machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for name in ("bitsandbytes", "peft", "loralib", "torchao", "transformers", "triton", "numpy"):
        try:
            from importlib.metadata import version

            info[name] = version(name)
        except Exception:
            info[name] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:.0f}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3g}"


def _target_text(v: dict) -> str:
    limit = v["max"]
    against = "floor" if v["against"] == "floor" else v["against"]
    bound = f"<= {limit:.3g}" if limit >= 0.1 else f"<= 1/{1 / limit:.3g}"
    state = {True: "**met**", False: "**missed**", None: "not measured"}[v["met"]]
    what = "mem " if v["kind"] == "memory" else ""
    return f"{what}/{against} {bound}: {state}"


def table(rows: list[Row]) -> str:
    """One line per row and peer: times (median ms, spread), ratios, floor, targets."""
    head = (
        "| row | lowrank ms | vs | their ms | ours/theirs | floor ms | ours/floor | "
        "theirs/floor | peak MiB ours / theirs | targets |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for row in rows:
        ours = row.times.get(row.ours)
        peers = [n for n in row.times if n != row.ours] or [None]
        verdicts = row.verdicts()
        for i, name in enumerate(peers):
            theirs = row.times.get(name) if name else None
            mem = ""
            if name and row.memory:
                mine, their = row.memory.get(row.ours), row.memory.get(name)
                mem = f"{_mib(mine)} / {_mib(their)}"
            elif row.memory:
                mem = _mib(row.memory.get(row.ours))
            targets = "; ".join(
                _target_text(v) for v in verdicts if v["against"] in (name, "floor")
            )
            if i > 0:  # the floor's target belongs to the row's first line
                targets = "; ".join(_target_text(v) for v in verdicts if v["against"] == name)
            lines.append(
                "| "
                + " | ".join(
                    [
                        row.name if i == 0 else "",
                        _stat(ours) if i == 0 else "",
                        name or "-",
                        _stat(theirs),
                        _x(row.ratio(name)) if name else "-",
                        _ms(row.floor_s) if i == 0 else "",
                        _x(row.ratio("floor")) if i == 0 else "",
                        _x(theirs.median / row.floor_s) if theirs and row.floor_s else "-",
                        mem,
                        targets,
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def _stat(stats) -> str:
    return "-" if stats is None else f"{_ms(stats.median)} ±{100 * stats.spread:.0f}%"


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


def write(out: Path, rows: list[Row], scaling: dict | None, meta: dict) -> None:
    """latest.md, latest.json, plots (*.png)."""
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(out, rows, scaling) if meta.get("plots", True) else []
    (out / "latest.json").write_text(
        json.dumps(
            {"meta": meta, "rows": [r.as_dict() for r in rows], "scaling": scaling}, indent=1
        )
    )
    m = meta["machine"]
    lines = [
        f"Run on {meta['date']}: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch "
        f"threads), {m.get('gpu') or 'no GPU'}; {m['platform']}, Python {m['python']}, "
        f"torch {m['torch']}, bitsandbytes {m['bitsandbytes']}, peft {m['peft']}, "
        f"loralib {m['loralib']}, torchao {m['torchao']}, transformers {m['transformers']}."
        + (f" {meta['note']}" if meta.get("note") else "")
        + (" **Partial: the run has not finished.**" if meta.get("partial") else ""),
        "",
        f"`{meta['command']}` ({meta['wall_s']:.0f} s). Times: median of {meta['repeats']} "
        "interleaved repeats after warm-up, ± the interquartile range (the range with fewer "
        "than 4 repeats) as a share of the median. Ratios < 1: lowrank is faster or closer to "
        "the floor.",
        "",
    ]
    for module, why in sorted(meta["skipped"].items()):
        lines.append(f"- skipped: `{module}` is not installed or does not load ({why})")
    if meta["skipped"]:
        lines.append("")
    lines += [table(rows), ""]
    checks = [f"- {r.name}: {r.check}" for r in rows if r.check]
    floors = [f"- {r.name}: {r.floor_what}" for r in rows if r.floor_what]
    lines += ["**Same work?** What was compared before timing:", "", *checks, ""]
    lines += ["**Floors**, measured in the same race:", "", *floors, ""]
    shares = [
        f"- {r.name}: {100 * r.floor_s / r.times[r.ours].median:.0f}% of the copy's bandwidth"
        for r in rows
        if r.name.startswith("dequantize") and r.floor_s and r.ours in r.times
    ]
    if shares:
        lines += ["**Dequantize bandwidth** (bytes moved / time, against the copy's):", ""]
        lines += [*shares, ""]
    missed = [v for r in rows for v in r.verdicts() if v["met"] is False]
    met = [v for r in rows for v in r.verdicts() if v["met"] is True]
    lines.append(f"Targets: {len(met)} met, {len(missed)} missed.")
    if meta.get("profiles"):
        lines.append(
            "Profiles of lowrank's side of each missed time target: "
            + ", ".join(f"`{p}`" for p in meta["profiles"])
            + "."
        )
    if plots:
        lines.append("Plots: " + ", ".join(f"`{p}`" for p in plots) + ".")
    (out / "latest.md").write_text("\n".join(lines) + "\n")


def _plots(out: Path, rows: list[Row], scaling: dict | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    # ratios: ours / theirs for every row and peer, log scale, 1 marked
    pairs = [(f"{r.name} vs {n}", r.ratio(n)) for r in rows for n in r.times if n != r.ours]
    pairs = [(label, v) for label, v in pairs if v]
    if pairs:
        fig, ax = plt.subplots(figsize=(8, 0.28 * len(pairs) + 1.2))
        ax.barh(range(len(pairs)), [v for _, v in pairs], color="tab:blue")
        ax.set_yticks(range(len(pairs)), [p for p, _ in pairs], fontsize=7)
        ax.set_xscale("log")
        ax.axvline(1, color="black", lw=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("time ratio lowrank / theirs (< 1: lowrank faster)")
        fig.tight_layout()
        fig.savefig(out / "ratios.png", dpi=90)
        plt.close(fig)
        names.append("ratios.png")
    if scaling:
        for key, unit, label in (("time_s", 1e3, "ms"), ("peak_bytes", 2**-20, "MiB")):
            fig, axes = plt.subplots(1, len(scaling), figsize=(4 * len(scaling), 3.2))
            for ax, (axis, data) in zip(axes, scaling.items(), strict=True):
                for who, values in data[key].items():
                    style = {"floor": "k--"}.get(who, "o-")
                    ax.plot(data["values"], [v * unit for v in values], style, label=who)
                ax.set_xscale("log", base=2)
                ax.set_xlabel(axis)
                ax.set_ylabel(label)
                base = ", ".join(f"{k}={v}" for k, v in data["base"].items() if k != axis)
                ax.set_title(f"QLoRA fwd+bwd ({base})", fontsize=8)
                ax.legend(fontsize=7)
            fig.tight_layout()
            name = f"scaling_{'time' if key == 'time_s' else 'memory'}.png"
            fig.savefig(out / name, dpi=90)
            plt.close(fig)
            names.append(name)
    return names


def profile(row: Row, out: Path) -> str | None:
    """torch.profiler and cProfile of our side of `row`; the file name, or None."""
    fn = row.profile_fn
    if fn is None:
        return None
    slug = re.sub(r"[^a-z0-9]+", "_", row.name.lower()).strip("_")[:60]
    path = out / f"profile_{slug}.txt"
    fn()
    with torch.profiler.profile() as prof:
        for _ in range(3):
            fn()
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(3):
        fn()
    pr.disable()
    text = io.StringIO()
    pstats.Stats(pr, stream=text).sort_stats("cumulative").print_stats(25)
    pstats.Stats(pr, stream=text).sort_stats("tottime").print_stats(15)
    path.write_text(
        f"{row.name}: lowrank's side, 3 calls\n\n== torch.profiler (ops) ==\n{ops}\n\n"
        "== cProfile (the calling thread only; work in a thread pool shows as waiting), "
        f"by cumulative then own time ==\n{text.getvalue()}"
    )
    return path.name

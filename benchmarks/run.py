"""lowrank's benchmarks, every comparison in one run: `python benchmarks/run.py [options]`.

Rows (ours / theirs, medians of interleaved repeats after warm-up, with the spread; each with
the floor measured in the same race and the ratio to it):
  quant    NF4 / FP4 quantize and dequantize vs bitsandbytes and torchao (each dtype)
  numpy    the NumPy reference vs the torch path (quantize, dequantize, a LoRA layer)
  lora     LoRA layer fwd+bwd vs PEFT and loralib; merged forward vs nn.Linear
  qlora    QLoRA layer fwd+bwd vs PEFT over bitsandbytes, time and peak memory
  step     one fine-tuning step of MiniLM (LoRA, QLoRA) vs PEFT (+ bitsandbytes)
  llama    (CUDA) one QLoRA / LoRA step of a ~1.1B Llama-shaped model vs PEFT (+ bitsandbytes)
  scaling  QLoRA layer time and memory against rank, width and tokens, floor drawn in
Peers that are not installed are skipped with a line saying so. Writes latest.md, latest.json,
plots (*.png) and, for missed time targets, profile_*.txt to --out.

    python benchmarks/run.py                  # the full CPU run (< 10 minutes on 2 cores)
    python benchmarks/run.py --quick --out /tmp/bench   # tiny sizes, the harness only (CI)
    python benchmarks/run.py --device cuda --dtype bfloat16 --only quant,qlora,llama
"""

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/run.py` as well as `python -m benchmarks.run`
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.common import DTYPES, Settings, missing_peers  # noqa: E402
from benchmarks.memory import measure_here, peak_bytes  # noqa: E402

SECTIONS = ["quant", "numpy", "lora", "qlora", "step", "llama", "scaling"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (CI)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="the layers' and steps' dtype, and the only dtype of the quant rows "
        "(default: quant rows in all three; layers float32 on CPU, bfloat16 on CUDA)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)}"
    )
    parser.add_argument("--repeats", type=int, help="timed repeats per contender")
    parser.add_argument("--note", default="", help="a sentence for the report (the machine's load)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    args.sections = only or [s for s in SECTIONS if s != "llama" or args.device == "cuda"]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    layer_dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    settings = Settings(
        quick=args.quick,
        device=device,
        dtypes=[args.dtype] if args.dtype else list(DTYPES),
        repeats=args.repeats or (2 if args.quick else 5),
        min_sample_s=0.002 if args.quick else 0.05,
        out=args.out,
    )

    def memory(cases):  # a fresh process on CPU (see benchmarks/memory.py)
        return peak_bytes(cases, device, layer_dtype)

    def memory_quick(cases):  # --quick: in this process, except the qlora row (harness only)
        dtype = str(layer_dtype).removeprefix("torch.")
        return [measure_here(dict(c, dtype=dtype), device) for c in cases]

    cheap_memory = memory_quick if args.quick else memory

    def meta() -> dict:
        return {
            "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/run.py "
            + shlex.join(sys.argv[1:] if argv is None else argv),
            "machine": report.machine(device),
            "repeats": settings.repeats,
            "quick": settings.quick,
            "skipped": missing_peers(),
            "note": args.note,
            "profiles": [],
            "plots": not args.no_plots,
            "wall_s": time.perf_counter() - start,
        }

    from benchmarks import rows_lora, rows_quant, rows_step

    rows, scaling = [], None
    for section in args.sections:
        t0 = time.perf_counter()
        print(f"[{section}] ...", file=sys.stderr, flush=True)
        if section == "quant":
            rows += rows_quant.quant_rows(settings)
        elif section == "numpy":
            rows += rows_quant.numpy_rows(settings) + rows_lora.numpy_lora_rows(settings)
        elif section == "lora":
            rows += rows_lora.lora_rows(settings, layer_dtype)
        elif section == "qlora":
            rows += rows_lora.qlora_rows(settings, layer_dtype, memory)
        elif section == "step":
            rows += rows_step.step_rows(settings, layer_dtype, cheap_memory, "minilm")
        elif section == "llama":
            rows += rows_step.step_rows(settings, layer_dtype, cheap_memory, "llama")
        elif section == "scaling":
            scaling = rows_lora.scaling(settings, layer_dtype, cheap_memory)
        print(f"[{section}] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        # what is done so far, in case a time limit stops the run (no plots, no profiles yet)
        report.write(Path(args.out), rows, scaling, dict(meta(), plots=False, partial=True))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profiles = []
    for row in rows:
        if any(v["met"] is False and v["kind"] == "time" for v in row.verdicts()):
            name = report.profile(row, out)
            if name:
                profiles.append(name)
    report.write(out, rows, scaling, dict(meta(), profiles=profiles))
    print((out / "latest.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

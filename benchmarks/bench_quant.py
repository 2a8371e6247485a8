"""Benchmark: lowrank.torch 4-bit quantize/dequantize against bitsandbytes on the same tensors.

Times NF4 with double quantization (QLoRA's setting, blocksize 64) on a 4096 x 4096 weight in
float32 and bfloat16, on CPU (and CUDA when present), best of a few runs each, and prints the
ratio bitsandbytes time / our time (> 1: we are faster). Checks first that both give the same
packed codes, so the two sides do the same work.

    python benchmarks/bench_quant.py [--size 4096] [--repeats 5]
"""

import argparse
import time

import torch

from lowrank.torch.quant import dequantize_4bit, quantize_4bit


def best_time(fn, repeats: int, device: torch.device) -> float:
    """Fastest of `repeats` runs, in seconds (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def compare(w: torch.Tensor, repeats: int) -> None:
    """Time both libraries on `w` and print one row per operation."""
    import bitsandbytes.functional as bnb

    ours = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours.packed, packed.reshape(-1)), "packed codes differ"
    rows = {
        "quantize": (
            lambda: quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True),
            lambda: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
        ),
        "dequantize": (
            lambda: dequantize_4bit(ours),
            lambda: bnb.dequantize_4bit(packed, state),
        ),
    }
    for op, (ours_fn, bnb_fn) in rows.items():
        t_ours = best_time(ours_fn, repeats, w.device)
        t_bnb = best_time(bnb_fn, repeats, w.device)
        print(
            f"{w.device.type:6} {str(w.dtype)[6:]:9} {op:10} {t_ours * 1e3:9.1f} "
            f"{t_bnb * 1e3:9.1f} {t_bnb / t_ours:9.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'device':6} {'dtype':9} {'op':10} {'ours ms':>9} {'bnb ms':>9} {'bnb/ours':>9}")
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
            compare(w.to(device=device, dtype=dtype), args.repeats)


if __name__ == "__main__":
    main()

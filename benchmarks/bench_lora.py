"""Speed of one LoRA layer: lowrank against PEFT and loralib, and merged against nn.Linear.

A 4096 x 4096 layer (LLaMA-7B's attention projections), a batch of 512 tokens, r = 16:
- forward + backward of the unmerged layer (x requires grad, as inside a network; W is
  frozen so only dx, dA and dB are computed) for lowrank, PEFT and loralib;
- forward of lowrank's merged layer against a plain nn.Linear with the same weight.

Targets: unmerged no slower than PEFT; merged within 2% of nn.Linear (it *is* one). The
timings are interleaved round-robin and we report medians, so a neighbour's load hits all
contenders alike.

    python benchmarks/bench_lora.py [--repeats 7] [--device cuda]
"""

import argparse
import statistics
import time
from collections.abc import Callable

import loralib
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lowrank.torch import add_lora, merge_lora

SIZE, TOKENS, RANK, ALPHA = 4096, 512, 16, 32


def one_layer(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(SIZE, SIZE)).to(device)


def with_trained_factors(parameters) -> None:
    with torch.no_grad():
        for parameter in parameters:
            if parameter.requires_grad:
                parameter.normal_(std=0.01)


def contenders(device: str) -> dict[str, nn.Module]:
    ours = add_lora(one_layer(device), ["0"], r=RANK, alpha=ALPHA)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["0"])
    peft = get_peft_model(one_layer(device), config)
    lora_linear = loralib.Linear(SIZE, SIZE, r=RANK, lora_alpha=ALPHA).to(device)
    loralib.mark_only_lora_as_trainable(lora_linear)
    lora_linear.train()  # loralib keeps the update unmerged in train mode
    models = {"lowrank": ours, "PEFT": peft, "loralib": lora_linear}
    for model in models.values():
        with_trained_factors(model.parameters())
    return models


def timed(step: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def race(steps: dict[str, Callable[[], None]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds per call, calls interleaved round-robin after one warm-up each."""
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = args.device
    x = torch.randn(TOKENS, SIZE, device=device, requires_grad=True)  # (tokens, in)
    dy = torch.randn(TOKENS, SIZE, device=device)  # (tokens, out)

    def forward_backward(model: nn.Module) -> Callable[[], None]:
        def step() -> None:
            x.grad = None
            model.zero_grad(set_to_none=True)
            model(x).backward(dy)

        return step

    models = contenders(device)
    unmerged = race({name: forward_backward(m) for name, m in models.items()}, args.repeats, device)

    merged = merge_lora(models["lowrank"])
    plain = one_layer(device)
    with torch.no_grad():
        plain[0].weight.copy_(merged[0].base_layer.weight)
    x_inference = x.detach()

    def forward(model: nn.Module) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                model(x_inference)

        return step

    inference = race(
        {"lowrank merged": forward(merged), "nn.Linear": forward(plain)}, 3 * args.repeats, device
    )

    print(
        f"{device}, {SIZE}x{SIZE} layer, {TOKENS} tokens, r={RANK}, medians of "
        f"{args.repeats} / {3 * args.repeats} interleaved runs"
    )
    for name, seconds in unmerged.items():
        print(f"  forward+backward {name:>8}: {seconds * 1e3:8.2f} ms")
    for name, seconds in inference.items():
        print(f"  forward {name:>17}: {seconds * 1e3:8.2f} ms")
    for peer, target in (("PEFT", "  (target <= 1)"), ("loralib", "")):
        ratio = unmerged["lowrank"] / unmerged[peer]
        print(f"  ratio lowrank / {peer:<8} (unmerged fwd+bwd): {ratio:.3f}{target}")
    ratio = inference["lowrank merged"] / inference["nn.Linear"]
    print(f"  ratio merged / nn.Linear  (forward):         {ratio:.3f}  (target <= 1.02)")


if __name__ == "__main__":
    main()

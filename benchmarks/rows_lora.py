"""Rows: one LoRA layer forward + backward (lowrank, PEFT, loralib), the merged layer's
forward against a plain nn.Linear, and one QLoRA layer forward + backward with its peak memory
(lowrank against PEFT over bitsandbytes' Linear4bit); the NumPy reference LoRA layer; and the
QLoRA layer's scaling with rank, width and sequence length.

Every contender gets the same base weight and the same factors A and B (nonzero, as after
some training), and the outputs are compared before timing. forward + backward is what a
layer does inside a network: x requires grad, W is frozen, so dx, dA and dB are computed.
"""

import copy

import numpy as np
import torch
from torch import nn

from benchmarks.common import Row, Settings, peer
from benchmarks.floors import copy_floor, count_flops, matmul_floor
from benchmarks.timing import race
from lowrank.torch import add_lora, merge_lora

ALPHA = 32


# --- building the contenders (also used by the memory probe, in a fresh process) -------------


def base_linear(width: int, dtype: torch.dtype) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(width, width).to(dtype)


def set_factors(model: nn.Module, width: int, r: int) -> None:
    """The same A [r, in] and B [out, r] in every contender (found by shape), std 0.01."""
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(r, width, generator=g) * 0.01, torch.randn(width, r, generator=g) * 0.01
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and tuple(p.shape) == (r, width):
                p.copy_(A)
            elif p.requires_grad and tuple(p.shape) == (width, r):
                p.copy_(B)


def bnb_linear4bit(linear: nn.Linear, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """bitsandbytes' Linear4bit (NF4, double quantization) holding `linear`'s weight."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=dtype,
        compress_statistics=True,
        quant_type="nf4",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(),
        requires_grad=False,
        blocksize=64,
        compress_statistics=True,
        quant_type="nf4",
        module=layer,
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    layer.weight._quantize(device)
    return layer.to(device)


def layer(kind: str, who: str, width: int, r: int, dtype: torch.dtype, device) -> nn.Module:
    """One contender: kind "lora" or "qlora"; who "lowrank", "PEFT", "loralib"."""
    device = torch.device(device)
    linear = base_linear(width, dtype)
    if who == "lowrank":
        model = add_lora(
            nn.Sequential(linear).to(device),
            ["0"],
            r=r,
            alpha=ALPHA,
            quant_type="nf4" if kind == "qlora" else None,
        )
    elif who == "PEFT":
        from peft import LoraConfig, get_peft_model

        base = bnb_linear4bit(linear, device, dtype) if kind == "qlora" else linear.to(device)
        config = LoraConfig(r=r, lora_alpha=ALPHA, target_modules=["0"])
        model = get_peft_model(nn.Sequential(base), config)
    elif who == "loralib":
        import loralib

        model = loralib.Linear(width, width, r=r, lora_alpha=ALPHA).to(device=device, dtype=dtype)
        with torch.no_grad():
            model.weight.copy_(linear.weight)
            model.bias.copy_(linear.bias)
        loralib.mark_only_lora_as_trainable(model)
        model.train()  # loralib keeps the update unmerged in train mode
    else:
        raise ValueError(who)
    set_factors(model, width, r)
    return model


def inputs(width: int, tokens: int, dtype: torch.dtype, device) -> tuple:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, width, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(tokens, width, generator=g).to(device=device, dtype=dtype)
    return x.requires_grad_(), dy


def fwd_bwd(model: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def step() -> None:
        x.grad = None
        model.zero_grad(set_to_none=True)
        model(x).backward(dy)

    return step


# --- the rows -------------------------------------------------------------------------------


def _close(models: dict[str, nn.Module], x: torch.Tensor) -> str:
    with torch.no_grad():
        outs = {name: m(x).float() for name, m in models.items()}
    ref = outs["lowrank"]
    scale = float(ref.abs().max())
    diffs = {n: float((o - ref).abs().max()) / scale for n, o in outs.items() if n != "lowrank"}
    return "outputs vs lowrank (max diff / max |y|): " + ", ".join(
        f"{n} {d:.1e}" for n, d in diffs.items()
    )


def lora_rows(settings: Settings, dtype: torch.dtype) -> list[Row]:
    device = settings.device
    width, tokens, r = settings.size(4096, 128), settings.size(512, 32), 16
    have_peft, have_loralib = peer("peft"), peer("loralib")
    names = ["lowrank"] + ["PEFT"] * bool(have_peft) + ["loralib"] * bool(have_loralib)
    models = {n: layer("lora", n, width, r, dtype, device) for n in names}
    x, dy = inputs(width, tokens, dtype, device)
    check = _close(models, x.detach())
    steps = {n: fwd_bwd(m, x, dy) for n, m in models.items()}
    flops = count_flops(steps["lowrank"])
    mm = matmul_floor(tokens, width, width, dtype, device)
    steps["matmul"] = mm
    times = race(steps, repeats=settings.repeats, device=device, min_sample_s=settings.min_sample_s)
    rate = mm.flops / times.pop("matmul").median
    rows = [
        Row(
            group="lora",
            name=f"LoRA fwd+bwd {width}x{width}, {tokens} tokens, r={r}",
            times=times,
            floor_s=flops / rate,
            floor_what=f"{flops / 1e9:.3g} GFLOP at the measured matmul rate "
            f"({rate / 1e9:.3g} GFLOP/s)",
            targets=[("PEFT", 1.0)] if have_peft else [],
            check=check,
            profile_fn=steps["lowrank"],
        )
    ]
    # merged forward against a plain nn.Linear with the merged weight
    merged = merge_lora(models["lowrank"])
    plain = copy.deepcopy(base_linear(width, dtype)).to(device)
    with torch.no_grad():
        plain.weight.copy_(merged[0].base_layer.weight)
    xi = x.detach()
    same = torch.allclose(merged(xi), plain(xi))

    def forward(m):
        def run():
            with torch.no_grad():
                m(xi)

        return run

    mm = matmul_floor(tokens, width, width, dtype, device)
    times = race(
        {"lowrank": forward(merged), "nn.Linear": forward(plain), "matmul": mm},
        repeats=3 * settings.repeats,
        device=device,
        min_sample_s=settings.min_sample_s,
    )
    rate = mm.flops / times.pop("matmul").median
    rows.append(
        Row(
            group="lora",
            name=f"merged forward {width}x{width}, {tokens} tokens",
            times=times,
            floor_s=mm.flops / rate,
            floor_what="the same matmul, plain x @ W.T",
            targets=[("nn.Linear", 1.02)],
            check=f"merged output equals nn.Linear's: {same}",
            profile_fn=forward(merged),
        )
    )
    return rows


def qlora_point(settings, dtype, width, tokens, r, names) -> tuple:
    """Times of one QLoRA layer fwd+bwd per contender, its floor and the output check."""
    device = settings.device
    models = {n: layer("qlora", n, width, r, dtype, device) for n in names}
    x, dy = inputs(width, tokens, dtype, device)
    check = _close(models, x.detach())
    steps = {n: fwd_bwd(m, x, dy) for n, m in models.items()}
    flops = count_flops(steps["lowrank"])
    q_bytes = sum(b.numel() * b.element_size() for b in models["lowrank"].buffers())
    w_bytes = width * width * torch.tensor([], dtype=dtype).element_size()
    mm = matmul_floor(tokens, width, width, dtype, device)
    cp = copy_floor(q_bytes, w_bytes, device)  # one decode's bytes; forward and backward decode
    steps["matmul"], steps["copy"] = mm, cp
    times = race(steps, repeats=settings.repeats, device=device, min_sample_s=settings.min_sample_s)
    rate = mm.flops / times.pop("matmul").median
    decode = times.pop("copy").median
    floor = flops / rate + 2 * decode
    what = (
        f"{flops / 1e9:.3g} GFLOP at {rate / 1e9:.3g} GFLOP/s + 2 decodes' bytes "
        f"({(q_bytes + w_bytes) / 2**20:.3g} MiB each) copied"
    )
    return times, floor, what, check, steps["lowrank"]


def qlora_rows(settings: Settings, dtype: torch.dtype, memory) -> list[Row]:
    width, tokens, r = settings.size(2048, 128), settings.size(512, 32), 16
    names = ["lowrank"] + ["PEFT+bitsandbytes"] * bool(peer("peft") and peer("bitsandbytes"))
    who = {"lowrank": "lowrank", "PEFT+bitsandbytes": "PEFT"}
    times, floor, what, check, fn = qlora_point(
        settings, dtype, width, tokens, r, [who[n] for n in names]
    )
    times = {n: times[who[n]] for n in names}
    peaks = {
        n: memory([{"kind": "qlora", "who": who[n], "width": width, "tokens": tokens, "r": r}])[0]
        for n in names
    }
    has_peer = len(names) > 1
    return [
        Row(
            group="qlora",
            name=f"QLoRA fwd+bwd {width}x{width}, {tokens} tokens, r={r}",
            times=times,
            floor_s=floor,
            floor_what=what,
            targets=[("PEFT+bitsandbytes", 1.0 if settings.device.type == "cpu" else 1 / 1.5)]
            * has_peer,
            memory=peaks,
            memory_targets=[("PEFT+bitsandbytes", 1.0)] * has_peer,
            check=check.replace("PEFT", "PEFT+bitsandbytes"),
            profile_fn=fn,
        )
    ]


def scaling(settings: Settings, dtype: torch.dtype, memory) -> dict:
    """QLoRA layer fwd+bwd time and peak memory against rank, width and tokens, with floor."""
    base = {"width": settings.size(2048, 128), "tokens": settings.size(512, 32), "r": 16}
    axes = {
        "r": [4, 16, 64] if not settings.quick else [4, 16],
        "width": [1024, 2048, 4096] if not settings.quick else [64, 128],
        "tokens": [128, 512, 2048] if not settings.quick else [16, 32],
    }
    names = ["lowrank"] + ["PEFT"] * bool(peer("peft") and peer("bitsandbytes"))
    out, cases = {}, []
    for axis, values in axes.items():
        series = {n: [] for n in names} | {"floor": []}
        for v in values:
            point = dict(base, **{axis: v})
            times, floor, *_ = qlora_point(
                settings, dtype, point["width"], point["tokens"], point["r"], names
            )
            for n in names:
                series[n].append(times[n].median)
            series["floor"].append(floor)
            cases.append({"kind": "qlora", **point})
        out[axis] = {"values": values, "base": base, "time_s": series, "peak_bytes": {}}
    # memory: one fresh process per contender, each point against its own baseline
    for n in names:
        peaks = iter(memory([dict(c, who=n) for c in cases]))
        for data in out.values():
            data["peak_bytes"][n] = [next(peaks) for _ in data["values"]]
    return out


def numpy_lora_rows(settings: Settings) -> list[Row]:
    """The NumPy reference LoRA layer against lowrank.torch's, float32 (readability's cost)."""
    from lowrank.numpy.lora import LoRALinear as NpLoRA

    width, tokens, r = settings.size(1024, 64), settings.size(256, 16), 16
    torch_model = layer("lora", "lowrank", width, r, torch.float32, "cpu")
    x, dy = inputs(width, tokens, torch.float32, "cpu")
    lin = torch_model[0]
    weight = lin.base_weight().detach().numpy()
    bias = lin.base_layer.bias.detach().numpy()
    np_layer = NpLoRA(weight, bias, r=r, alpha=ALPHA, rng=np.random.default_rng(0))
    params = dict(torch_model.named_parameters())
    A = next(p for n, p in params.items() if p.requires_grad and tuple(p.shape) == (r, width))
    B = next(p for n, p in params.items() if p.requires_grad and tuple(p.shape) == (width, r))
    np_layer.A[...] = A.detach().numpy()
    np_layer.B[...] = B.detach().numpy()
    x_np, dy_np = x.detach().numpy(), dy.numpy()
    y_np = np_layer.forward(x_np)
    with torch.no_grad():
        diff = float(np.abs(y_np - torch_model(x.detach()).numpy()).max())

    def np_step():
        np_layer.forward(x_np)
        np_layer.backward(dy_np)

    steps = {"lowrank": fwd_bwd(torch_model, x, dy), "numpy": np_step}
    flops = count_flops(steps["lowrank"])
    mm = matmul_floor(tokens, width, width, torch.float32, torch.device("cpu"))
    steps["matmul"] = mm
    times = race(steps, repeats=settings.repeats, min_sample_s=settings.min_sample_s)
    rate = mm.flops / times.pop("matmul").median
    return [
        Row(
            group="numpy",
            name=f"LoRA fwd+bwd float32 {width}x{width}, {tokens} tokens, r={r}",
            times=times,
            floor_s=flops / rate,
            floor_what=f"{flops / 1e9:.3g} GFLOP at {rate / 1e9:.3g} GFLOP/s",
            check=f"outputs max diff {diff:.1e}",
        )
    ]

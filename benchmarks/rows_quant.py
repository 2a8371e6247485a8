"""Rows: NF4 / FP4 quantize and dequantize (blocksize 64, double quantization) against
bitsandbytes and torchao's NF4Tensor, in each dtype; the NumPy reference against the torch
path on the same float32 weight.

Before timing, each pair is checked: bitsandbytes must give the same packed 4-bit codes (its
8-bit scale codes differ in a few places, an approximate lookup in its CPU quantizer, so the
share of equal scale codes and values is reported); torchao quantizes its scales differently (int8
per 256 scales around their mean), so only the share of equal codes and the error of its
dequantized weight are reported.
"""

import numpy as np
import torch

from benchmarks.common import DTYPES, Row, Settings, peer
from benchmarks.floors import copy_floor
from benchmarks.timing import race
from lowrank.numpy import quant as np_quant
from lowrank.torch import dequantize_4bit, quantize_4bit
from lowrank.torch.quant import unpack_4bit

QUANTIZE_TARGETS = [("bitsandbytes", 1 / 15), ("floor", 3.0)]
DEQUANTIZE_TARGETS = [("bitsandbytes", 1 / 1.5), ("floor", 2.0)]
FLOOR_WHAT = "a plain copy reading and writing as many bytes, into a fresh buffer"


def _weight(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    w = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    return w.to(device=device, dtype=dtype)


def _bnb_check(bnbf, w, ours) -> str:
    """Same 4-bit codes (bit for bit); the 8-bit scale codes may differ in a few places
    (bitsandbytes' CPU 8-bit quantizer uses an approximate lookup, tests/interop says so)."""
    packed, state = bnbf.quantize_4bit(
        w, blocksize=64, quant_type=ours.quant_type, compress_statistics=True
    )
    same_codes = torch.equal(ours.packed, packed.reshape(-1))
    scales_equal = float((ours.absmax == state.absmax.reshape(-1)).float().mean())
    ours_w, theirs_w = dequantize_4bit(ours).float(), bnbf.dequantize_4bit(packed, state).float()
    values_equal = float((ours_w == theirs_w).float().mean())
    ours_err = float((ours_w - w.float()).abs().mean())
    theirs_err = float((theirs_w - w.float()).abs().mean())
    verdict = "same 4-bit codes" if same_codes else "DIFFERENT 4-bit codes"
    return (
        f"bitsandbytes: {verdict}, {100 * scales_equal:.2f}% equal scale codes, "
        f"{100 * values_equal:.2f}% equal values, mean error {ours_err:.4g} vs {theirs_err:.4g}"
    )


def quant_rows(settings: Settings) -> list[Row]:
    device = settings.device
    size = settings.size(4096, 256)
    bnbf = peer("bitsandbytes.functional")
    ao = peer("torchao.quantization")
    rows = []
    for dtype_name in settings.dtypes:
        dtype = DTYPES[dtype_name]
        w = _weight(size, dtype, device)
        n = w.numel()
        for quant_type in ("nf4", "fp4"):
            q = quantize_4bit(w, quant_type=quant_type)
            q_bytes = q.nbytes
            shape = f"{size}x{size}"
            check = _bnb_check(bnbf, w, q) if bnbf else ""
            quantize = {"lowrank": lambda w=w, t=quant_type: quantize_4bit(w, quant_type=t)}
            dequantize = {"lowrank": lambda q=q: dequantize_4bit(q)}
            if bnbf:
                packed, state = bnbf.quantize_4bit(
                    w, blocksize=64, quant_type=quant_type, compress_statistics=True
                )
                quantize["bitsandbytes"] = lambda w=w, t=quant_type: bnbf.quantize_4bit(
                    w, blocksize=64, quant_type=t, compress_statistics=True
                )
                dequantize["bitsandbytes"] = lambda p=packed, s=state: bnbf.dequantize_4bit(p, s)
            ao_check = ""
            if ao and quant_type == "nf4" and n % (64 * 256) == 0:
                t = ao.to_nf4(w, 64, 256)
                codes_ours = unpack_4bit(q.packed, n)
                codes_ao = unpack_4bit(t.quantized_data.reshape(-1), n)
                equal = float((codes_ours == codes_ao).float().mean())
                err = float((t.get_original_weight().float() - w.float()).abs().max())
                err_ours = float((dequantize_4bit(q).float() - w.float()).abs().max())
                ao_check = (
                    f"; torchao: {100 * equal:.2f}% equal codes, max error {err:.3g} "
                    f"(ours {err_ours:.3g})"
                )
                quantize["torchao"] = lambda w=w: ao.to_nf4(w, 64, 256)
                dequantize["torchao"] = lambda t=t: t.get_original_weight()
            # the floor: read the weight and write the codes; read the codes, write the weight
            quantize["floor"] = copy_floor(n * w.element_size(), q_bytes, device)
            dequantize["floor"] = copy_floor(q_bytes, n * w.element_size(), device)
            for op, contenders, targets in (
                ("quantize", quantize, QUANTIZE_TARGETS),
                ("dequantize", dequantize, DEQUANTIZE_TARGETS),
            ):
                times = race(
                    contenders,
                    repeats=settings.repeats,
                    device=device,
                    min_sample_s=settings.min_sample_s,
                )
                floor = times.pop("floor")
                rows.append(
                    Row(
                        group="quant",
                        name=f"{op} {quant_type} {dtype_name} {shape}",
                        times=times,
                        floor_s=floor.median,
                        floor_what=FLOOR_WHAT,
                        targets=targets
                        if device.type == "cpu"
                        else [("floor", 1 / 0.85)]
                        if op == "dequantize"
                        else [],
                        check=check + ao_check,
                        profile_fn=contenders["lowrank"],
                    )
                )
    return rows


def numpy_rows(settings: Settings) -> list[Row]:
    """The NumPy reference against the torch path, float32, same weight (readability's cost)."""
    size = settings.size(2048, 128)
    w = _weight(size, torch.float32, torch.device("cpu"))
    w_np = w.numpy()
    q_np = np_quant.quantize_4bit(w_np)
    q = quantize_4bit(w)
    same = np.array_equal(q_np.packed, q.packed.numpy()) and np.array_equal(
        q_np.absmax, q.absmax.numpy()
    )
    same_values = np.array_equal(np_quant.dequantize_4bit(q_np), dequantize_4bit(q).numpy())
    check = f"same codes and scales: {same}, same values: {same_values}"
    rows = []
    for op, contenders in (
        (
            "quantize",
            {"lowrank": lambda: quantize_4bit(w), "numpy": lambda: np_quant.quantize_4bit(w_np)},
        ),
        (
            "dequantize",
            {
                "lowrank": lambda: dequantize_4bit(q),
                "numpy": lambda: np_quant.dequantize_4bit(q_np),
            },
        ),
    ):
        read, write = (w.nbytes, q.nbytes) if op == "quantize" else (q.nbytes, w.nbytes)
        contenders["floor"] = copy_floor(read, write, torch.device("cpu"))
        times = race(contenders, repeats=settings.repeats, min_sample_s=settings.min_sample_s)
        floor = times.pop("floor")
        rows.append(
            Row(
                group="numpy",
                name=f"{op} nf4 float32 {size}x{size}",
                times=times,
                floor_s=floor.median,
                floor_what=FLOOR_WHAT,
                check=check,
            )
        )
    return rows

"""`lowrank estimate`: the training memory of a Hugging Face model from its config.json alone.

No weights are read: `lowrank.memory.estimate_memory` counts weights, adapters, gradients,
optimizer state and activations from the shapes in the config, and the breakdown is printed,
with the total the other way round of gradient checkpointing. `--gpu 24GB` adds the largest
batch that fits such a card, with and without checkpointing. `--measure` builds the model from
the config with random weights, trains two steps in a fresh process
(`lowrank.torch.measure.measure_receipt`) and prints a receipt: each part as estimated and as
counted in that process, the measured peak, and what the peak holds beyond the counted parts
(the backward pass's working memory and the allocator's slack), so a surprise shows where it is.

The config is the user's file, so it is read and checked here first: every problem (no such
file, a folder without config.json, not UTF-8, not JSON, not an object, no model_type, a size
that is missing or not a positive integer) is a ValueError or an OSError whose message starts
with the file's path.

    lowrank estimate Llama-2-7b/config.json --method qlora --batch-size 4 --gpu 24GB
    lowrank estimate tiny-llama/config.json --batch-size 8 --seq-len 128 --device cpu --measure
"""

import argparse
import os
from pathlib import Path

from lowrank._validate import check_int
from lowrank.accounting import format_bytes
from lowrank.data import json_kind, loads_json
from lowrank.memory import MemoryEstimate, estimate_memory, largest_batch_size
from lowrank.shapes import config_to_shape

__all__ = ["format_receipt", "main", "read_config"]

# The sizes `shapes.config_to_shape` reads, by the smallest value each may take. They are
# checked under their config.json names, so the message names the key the user wrote.
_SIZE_KEYS = {
    1: (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "num_key_value_heads", "n_embd", "n_layer", "n_head", "n_inner",
    ),
    0: ("vocab_size", "max_position_embeddings", "n_positions", "type_vocab_size"),
}  # fmt: skip


def read_config(path: str | os.PathLike) -> dict:
    """A Hugging Face config.json (or a model folder holding one) as a checked dict.

    Raises:
        FileNotFoundError: no such file, or a folder without config.json.
        ValueError: not UTF-8, not a JSON object, no model_type, a size that is not a
            positive int, or a key the architecture needs is missing; the message starts
            with the file's path.

    Examples:
        >>> import json, tempfile
        >>> folder = tempfile.TemporaryDirectory()
        >>> config = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
        ...           "num_attention_heads": 32, "intermediate_size": 11008, "vocab_size": 32000}
        >>> _ = (Path(folder.name) / "config.json").write_text(json.dumps(config))
        >>> read_config(folder.name)["hidden_size"]  # the folder, or its config.json
        4096
        >>> _ = (Path(folder.name) / "config.json").write_text('{"model_type": "llama"}')
        >>> read_config(folder.name)
        Traceback (most recent call last):
        ...
        ValueError: .../config.json: missing key 'hidden_size', which model_type 'llama' needs
        >>> folder.cleanup()
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder without a config.json")
        path = path / "config.json"
    elif not path.exists():
        raise FileNotFoundError(f"no config file at {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not UTF-8 text (byte 0x{raw[error.start]:02x} at position "
            f"{error.start + 1}); expected a Hugging Face config.json"
        ) from None
    config = loads_json(text, str(path))
    if not isinstance(config, dict):
        raise ValueError(
            f"{path}: expected a JSON object (a Hugging Face config), got {json_kind(config)}"
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        if model_type is None:
            raise ValueError(
                f"{path}: no 'model_type' key; a Hugging Face config names its architecture there"
            )
        raise ValueError(f"{path}: 'model_type' must be a string, got {model_type!r}")
    for low, keys in _SIZE_KEYS.items():
        for key in keys:
            if config.get(key) is not None:  # None: absent, or null (n_inner: null is usual)
                check_int(f"{path}: {key!r}", config[key], low=low)
    try:
        config_to_shape(config)
    except KeyError as error:
        if error.args and error.args[0] not in config:  # a key the architecture needs
            raise ValueError(
                f"{path}: missing key {error.args[0]!r}, which model_type {model_type!r} needs"
            ) from None
        raise
    except ValueError as error:  # unsupported model_type, sizes that do not fit together
        raise ValueError(f"{path}: {error}") from None
    return config


def format_receipt(estimate: MemoryEstimate, counted: dict) -> str:
    """The receipt: each part as estimated and as counted by `measure_receipt`, the measured
    peak, and the rest (measured minus the counted parts: working memory and allocator slack).

    Examples:
        >>> from lowrank.commands.estimate import format_receipt
        >>> from lowrank.memory import estimate_memory
        >>> gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2,
        ...         "vocab_size": 128, "n_positions": 64}
        >>> estimate = estimate_memory(gpt2, batch_size=2, seq_len=16, dtype="fp32", device="cpu")
        >>> counted = {"peak": 2_000_000, "weights": {"embeddings and head": 36_864},
        ...            "adapters": 6_144, "gradients": 6_144, "optimizer (AdamW)": 12_304,
        ...            "activations": {"MLP": 65_536}}  # as measure_receipt returns them
        >>> print(format_receipt(estimate, counted))
        receipt: the step measured on cpu (fp32, random weights, a fresh process)
                                             estimated              counted
          weights                   ...
        ...
          activations (saved)       ...
            MLP                     ...
        ...
          peak                      ...        2.0 MB (1.9 MiB)
        measured / estimated: ...
    """
    weights, saved = counted["weights"], counted["activations"]
    rows = [("weights", estimate.weights, sum(weights.values()))]
    rows += [(f"  {k}", estimate.weight_parts.get(k, 0), weights.get(k, 0))
             for k in {**estimate.weight_parts, **weights}]  # fmt: skip
    rows += [(name, getattr(estimate, attribute), counted[name]) for name, attribute in (
        ("adapters", "adapters"), ("gradients", "gradients"),
        ("optimizer (AdamW)", "optimizer_states"),
    )]  # fmt: skip
    rows.append(("activations (saved)", estimate.activations, sum(saved.values())))
    rows += [(f"  {k}", estimate.per_batch.saved.get(k, 0), saved.get(k, 0))
             for k in {**estimate.per_batch.saved, **saved}]  # fmt: skip
    static = estimate.weights + estimate.adapters + estimate.optimizer_states
    counted_static = sum(weights.values()) + counted["adapters"] + counted["optimizer (AdamW)"]
    rows.append(("rest: working + slack", estimate.total - static - estimate.activations,
                 counted["peak"] - counted_static - sum(saved.values())))  # fmt: skip
    rows.append(("peak", estimate.total, counted["peak"]))
    lines = [
        f"receipt: the step measured on {estimate.device} ({estimate.dtype}, random weights, "
        "a fresh process)",
        f"{'':<26} {'estimated':>21} {'counted':>21}",
    ]
    lines += [f"  {name:<24} {format_bytes(a):>21} {format_bytes(b):>21}" for name, a, b in rows]
    lines.append(f"measured / estimated: {counted['peak'] / estimate.total:.2f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """`lowrank estimate CONFIG [--method ...]`: print the estimate's breakdown (and with
    `--gpu` the largest batch that fits, with `--measure` the receipt); returns 0.

    `args` comes from `lowrank.cli.build_parser()`; the estimate is
    `lowrank.memory.estimate_memory` (LoRA: Hu et al. 2021, arXiv:2106.09685; QLoRA's NF4
    weights: Dettmers et al. 2023, arXiv:2305.14314).

    Examples:
        >>> import json, tempfile
        >>> from lowrank.cli import build_parser
        >>> folder = tempfile.TemporaryDirectory()
        >>> config = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
        ...           "num_attention_heads": 32, "intermediate_size": 11008, "vocab_size": 32000}
        >>> _ = (Path(folder.name) / "config.json").write_text(json.dumps(config))
        >>> main(build_parser().parse_args(["estimate", folder.name, "--gpu", "24GB"]))
        llama: qlora, weights NF4 linears + bf16, batch 1 x 512 tokens, on cuda
        adapters: r=8 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (qlora's default:
          every linear layer)
        ...
          total (the peak)           8.8 GB (8.2 GiB)
        ...
        with gradient checkpointing: 4.4 GB (4.1 GiB)
        fits on a GPU with 12 GB (12 GiB; ~0.5 GB kept for the CUDA context)
        on a 24 GB GPU (24 GiB): at most 4 sequences of 512 tokens per step, 62 with gradient
          checkpointing
        0
        >>> folder.cleanup()
    """
    config = read_config(args.config)
    options = dict(
        method=args.method, seq_len=args.seq_len, r=args.r, targets=args.targets,
        dtype=args.dtype, device=args.device, dora=args.dora, gpus=args.gpus,
        strategy=args.strategy,
    )  # fmt: skip
    if args.measure and args.gpus > 1:
        raise ValueError("--measure runs one process on one device; leave out --gpus")
    if args.measure and args.device == "cuda":
        import torch  # only --measure needs torch

        if not torch.cuda.is_available():
            raise ValueError("--measure --device cuda needs a CUDA GPU, and none is visible "
                             "(measure on the CPU with --device cpu)")  # fmt: skip
    estimate = estimate_memory(
        config, batch_size=args.batch_size, gradient_checkpointing=args.gradient_checkpointing,
        **options,
    )  # fmt: skip
    print(estimate)
    if args.gpu is not None:
        fits = [largest_batch_size(args.gpu, config, gradient_checkpointing=checkpointing,
                                   **options) for checkpointing in (False, True)]  # fmt: skip
        gib = f"{args.gpu / 2**30:g}"
        where = f"a {gib} GB GPU" if args.gpus == 1 else f"{args.gpus} GPUs of {gib} GB"
        print(
            f"on {where} ({gib} GiB): at most {fits[0]} sequences of {args.seq_len} "
            f"tokens per step, {fits[1]} with gradient checkpointing"
        )
    if args.measure:
        from lowrank.torch.measure import measure_receipt

        options = {k: v for k, v in options.items() if k not in ("gpus", "strategy")}
        counted = measure_receipt(
            config, batch_size=args.batch_size,
            gradient_checkpointing=args.gradient_checkpointing, **options,
        )  # fmt: skip
        print(format_receipt(estimate, counted))
    return 0

"""`lowrank estimate`: the training memory of a Hugging Face model from its config.json alone.

No weights are read: `lowrank.memory.estimate_memory` counts weights, adapters, gradients,
optimizer state and activations from the shapes in the config, and the breakdown is printed.

The config is the user's file, so it is read and checked here first: every problem (no such
file, a folder without config.json, not UTF-8, not JSON, not an object, no model_type, a size
that is missing or not a positive integer) is a ValueError or an OSError whose message starts
with the file's path.
"""

import argparse
import os
from pathlib import Path

from lowrank._validate import check_int
from lowrank.data import json_kind, loads_json
from lowrank.memory import estimate_memory
from lowrank.shapes import config_to_shape

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
    """A Hugging Face config.json (or a model folder holding one) as a checked dict."""
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


def main(args: argparse.Namespace) -> int:
    """`lowrank estimate CONFIG [--method ...]`: print the estimate's breakdown."""
    estimate = estimate_memory(
        read_config(args.config),
        method=args.method,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        r=args.r,
        targets=args.targets,
        gradient_checkpointing=args.gradient_checkpointing,
        dtype=args.dtype,
    )
    print(estimate)
    return 0

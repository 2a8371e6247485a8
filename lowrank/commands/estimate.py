"""`lowrank estimate`: the training memory of a Hugging Face model from its config.json alone.

No weights are read: `lowrank.memory.estimate_memory` counts weights, adapters, gradients,
optimizer state and activations from the shapes in the config, and the breakdown is printed.

The config is the user's file, so it is read and checked here first: every problem (no such
file, a folder without config.json, not UTF-8, not JSON, not an object, no model_type, a size
that is missing or not a positive integer) is a ValueError or an OSError whose message starts
with the file's path.

    lowrank estimate Llama-2-7b/config.json --method qlora --batch-size 4
"""

import argparse
import os
from pathlib import Path

from lowrank._validate import check_int
from lowrank.data import json_kind, loads_json
from lowrank.memory import estimate_memory
from lowrank.shapes import config_to_shape

__all__ = ["main", "read_config"]

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


def main(args: argparse.Namespace) -> int:
    """`lowrank estimate CONFIG [--method ...]`: print the estimate's breakdown; returns 0.

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
        >>> main(build_parser().parse_args(["estimate", folder.name, "--targets", "q_proj,v_proj"]))
        llama: qlora, r=8 on q_proj,v_proj, weights NF4 linears + bf16, batch 1 x 512 tokens
        trainable parameters 4,194,304 of 6,742,609,920 (0.062%)
          weights                    3.9 GB (3.6 GiB)
        ...
          total                      6.2 GB (5.8 GiB)
        fits in 8 GB of GPU memory (counting ~0.5 GB for the CUDA context)
        0
        >>> folder.cleanup()
    """
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

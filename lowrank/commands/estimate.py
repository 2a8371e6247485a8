"""`lowrank estimate`: the training memory of a Hugging Face model from its config.json alone.

No weights are read: `lowrank.memory.estimate_memory` counts weights, adapters, gradients,
optimizer state and activations from the shapes in the config, and the breakdown is printed.
"""

import argparse

from lowrank.memory import estimate_memory


def main(args: argparse.Namespace) -> int:
    """`lowrank estimate CONFIG [--method ...]`: print the estimate's breakdown."""
    targets = args.targets.split(",") if args.targets else None
    estimate = estimate_memory(
        args.config,
        method=args.method,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        r=args.r,
        targets=targets,
        gradient_checkpointing=args.gradient_checkpointing,
        dtype=args.dtype,
    )
    print(estimate)
    return 0

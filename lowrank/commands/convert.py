"""`lowrank convert`: another tool's LoRA adapter (mlx-lm, loralib, PEFT under another scale
convention) written as a PEFT adapter folder, with the proof printed.

`lowrank.torch.convert.convert_adapter` does the work: it reads the source, writes PEFT's two
files with lora_alpha chosen so that PEFT's alpha / r is the source's scale for every layer,
loads the result with lowrank's loader and compares each layer's outputs on random float64
inputs with the source's own formula (and, with `--base`, the whole model's). A difference
above the stated bound is an error (exit 2) and nothing is written.

    lowrank convert mlx-adapters/ --out peft-adapter --base Llama-3.2-1B/config.json
    lowrank convert lora.pt --from loralib --alpha 16 --out peft-adapter
"""

import argparse

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    """Convert `args.source` into `args.out` and print the proof.

    Examples:
        >>> import argparse
        >>> from lowrank.commands.convert import main
        >>> args = argparse.Namespace(source="lora.pt", out="peft", format="loralib",
        ...     convention=None, alpha=None, base=None)
        >>> main(args)
        Traceback (most recent call last):
            ...
        ValueError: lora.pt is missing
    """
    from lowrank.torch.convert import convert_adapter

    result = convert_adapter(
        args.source,
        args.out,
        format=args.format,
        convention=args.convention,
        alpha=args.alpha,
        base=args.base,
    )
    print(result.to_text())
    return 0

"""`lowrank inspect`: what is in a LoRA adapter (PEFT, mlx-lm or loralib), per layer, and
against a base model what PEFT would load, miss or silently skip.

The report is `lowrank.torch.adapter_report.inspect_adapter`'s: producer format, targets, the
scale convention, dtype and size on disk, and per layer r, alpha, s, the update s * B @ A's
Frobenius norm, singular values (from the factors alone), energy rank and effective rank.
`--json` prints it as JSON; `--plot FILE.png` also writes the spectra.

    lowrank inspect my-adapter --base Llama-3.2-1B/config.json
    lowrank inspect adapters/ --from mlx-lm --json
"""

import argparse
import json

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    """Print the report of `args.adapter` (text or `--json`); write `--plot` if given.

    Examples:
        >>> import argparse
        >>> from lowrank.commands.inspect import main
        >>> args = argparse.Namespace(adapter="no-such-adapter", base=None, json=False,
        ...     plot=None, format=None, convention=None, alpha=None, energy=0.9)
        >>> main(args)
        Traceback (most recent call last):
            ...
        ValueError: no-such-adapter is none of the adapter formats (peft, mlx-lm, loralib): ...
    """
    from lowrank.torch.adapter_report import inspect_adapter

    report = inspect_adapter(
        args.adapter,
        args.base,
        energy=args.energy,
        format=args.format,
        convention=args.convention,
        alpha=args.alpha,
    )
    if args.plot:
        report.plot(args.plot)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    if args.plot and not args.json:
        print(f"spectra written to {args.plot}")
    return 0

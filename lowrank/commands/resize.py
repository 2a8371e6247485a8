"""`lowrank resize`: the best lower-rank version of a PEFT adapter folder, with its error.

    lowrank resize my-adapter --rank 4 --out my-adapter-r4
    lowrank resize my-adapter --energy 0.9 --out my-adapter-90 --json

The job is `lowrank.torch.resize.resize_adapter` (Eckart-Young truncation of each layer's
update s B A from its factors; LoRA: Hu et al. 2021, arXiv:2106.09685); this prints its report:
per layer r -> r', ||s B A||_F, the error of the written factors and the Eckart-Young bound,
which agree, and the relative error.
"""

import argparse
import json

__all__ = ["energy_share", "rank_list", "main"]


def energy_share(text: str) -> float:
    """`--energy`: a share in (0, 1] of the update's squared Frobenius norm (argparse type).

    Examples:
        >>> from lowrank.commands.resize import energy_share
        >>> energy_share("0.9")
        0.9
        >>> energy_share("90")
        Traceback (most recent call last):
            ...
        argparse.ArgumentTypeError: must be a share in (0, 1], e.g. 0.9, got '90'
    """
    try:
        value = float(text)
    except ValueError:
        value = -1.0  # refused below, with the text as given
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1], e.g. 0.9, got {text!r}")
    return value


def rank_list(text: str) -> list[int]:
    """`lowrank extract --rank`: one rank or a comma list ("1,2,4,8"), each an int >= 1, in
    the order given without repeats (argparse type).

    Examples:
        >>> from lowrank.commands.resize import rank_list
        >>> rank_list("8"), rank_list("1, 4,2,4")
        ([8], [1, 4, 2])
        >>> rank_list("0")
        Traceback (most recent call last):
            ...
        argparse.ArgumentTypeError: must be positive integers separated by commas, got '0'
    """
    try:
        ranks = [int(part) for part in text.split(",")]
    except ValueError:
        ranks = [0]
    if not all(rank >= 1 for rank in ranks):
        raise argparse.ArgumentTypeError(
            f"must be positive integers separated by commas, got {text!r}"
        )
    return list(dict.fromkeys(ranks))


def main(args: argparse.Namespace) -> int:
    """`lowrank resize ADAPTER (--rank R | --energy E) --out DIR [--json]`: write the resized
    adapter and print the report (a table, or JSON with `--json`). Returns 0; a bad folder
    raises the ValueError `lowrank.cli.main` prints as one line.

    Examples:
        >>> import tempfile
        >>> from collections import OrderedDict
        >>> from pathlib import Path
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.cli import build_parser
        >>> from lowrank.torch import add_lora, save_adapter
        >>> _ = torch.manual_seed(0)
        >>> model = add_lora(nn.Sequential(OrderedDict(q=nn.Linear(16, 16))), ["q"], r=4)
        >>> _ = model.q.B["default"].data.normal_()  # as if trained
        >>> tmp = tempfile.TemporaryDirectory()
        >>> save_adapter(model, Path(tmp.name) / "r4")
        >>> argv = ["resize", str(Path(tmp.name) / "r4"), "--rank", "8", "--out",
        ...         str(Path(tmp.name) / "r8")]
        >>> main(build_parser().parse_args(argv))  # doctest: +ELLIPSIS
        resized ... to rank 8 ...
        layer  r -> r'  ||s B A||_F   ||error||_F  Eckart-Young  relative
        q       4 ->  4*...
        * asked for more than the layer's r: it keeps its rank (resize never adds rank)
        0
        >>> tmp.cleanup()
    """
    from lowrank.torch.resize import resize_adapter

    report = resize_adapter(args.adapter, args.out, rank=args.rank, energy=args.energy)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    rule = f"rank {args.rank}" if args.rank is not None else f"{args.energy:g} of the energy"
    print(
        f"resized {args.adapter} to {rule} -> {args.out} (lora_alpha = r': scale 1, the factors "
        "hold the update)"
    )
    print(report.table())
    if any(row.capped for row in report.layers):
        print("* asked for more than the layer's r: it keeps its rank (resize never adds rank)")
    return 0

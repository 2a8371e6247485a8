"""The NumPy demo (`lowrank numpy-demo`): adapt a pre-trained tiny MLP to a shifted task,
with full fine-tuning and with LoRA at ranks 1, 2, 4, 8, and compare.

The data are generated, not real. Each point lives in 16 dimensions: its class (one of 8) is
the angular sector, 45 degrees wide, that its projection onto a hidden plane falls in; the
other 14 directions carry only noise. The model is pre-trained on this task. The shifted task
rotates every input by 22.5 degrees (half a sector) within that plane, keeping the labels of
the unrotated points: half of each sector now carries its neighbour's label, so the
pre-trained model gets about half of the shifted examples right.

Undoing a rotation in one plane is a rank-2 change of the input, x -> R x with R - I of rank
2, so the first layer's ideal correction W (R^T - I) has rank 2: the setting in which LoRA
(Hu et al. 2021, arXiv:2106.09685) argues the weight update of adaptation has a low
"intrinsic rank". The demo prints what actually happens: the accuracy each method reaches,
with how many trainable parameters, and the energy rank (90%) of the update Delta W that full
fine-tuning made to each layer. Everything is seeded; a run takes a few seconds. It needs
NumPy only: it imports `lowrank.numpy`, never torch.

Constants, the demo's fixed settings: `N_FEATURES`, `N_CLASSES`, `HIDDEN` (the MLP's sizes),
`SHIFT_DEGREES` (the rotation of the shifted task), `RANKS` (LoRA's ranks), `N_PRETRAIN`,
`N_ADAPT`, `N_TEST` (examples), `NOISE` (the noise's std), `ADAPT_EPOCHS`, `FULL_LR` and
`LORA_LR` (AdamW, Loshchilov & Hutter, arXiv:1711.05101).

    print(format_report(run_demo(seed=0)))  # what `lowrank numpy-demo` prints
"""

import argparse
import copy
import time

import numpy as np

from lowrank._validate import check_int
from lowrank.numpy import MLP, AdamW, accuracy, add_lora, energy_rank, train

__all__ = [
    "ADAPT_EPOCHS",
    "FULL_LR",
    "HIDDEN",
    "LORA_LR",
    "NOISE",
    "N_ADAPT",
    "N_CLASSES",
    "N_FEATURES",
    "N_PRETRAIN",
    "N_TEST",
    "RANKS",
    "SHIFT_DEGREES",
    "format_report",
    "main",
    "make_sectors",
    "run_demo",
]

N_FEATURES = 16
N_CLASSES = 8
HIDDEN = 64
SHIFT_DEGREES = 22.5
RANKS = (1, 2, 4, 8)
N_PRETRAIN, N_ADAPT, N_TEST = 4000, 500, 2000
NOISE = 0.1
ADAPT_EPOCHS = 20
FULL_LR, LORA_LR = 3e-4, 3e-3  # AdamW; LoRA is usually run at a higher learning rate


def make_sectors(
    n: int, plane: np.ndarray, rotation_degrees: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """n points (n, 16) and labels (n,): the label is the angle's sector (0..7) in `plane`
    (2, 16, orthonormal rows); the point is placed at that angle plus `rotation_degrees`, at a
    radius in [1, 2], plus Gaussian noise (std 0.1) in all 16 directions.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> plane = np.linalg.qr(rng.normal(size=(16, 2)))[0].T  # (2, 16), orthonormal rows
        >>> X, y = make_sectors(5, plane, 0.0, rng)
        >>> X.shape, y.dtype, y.tolist()  # labels: the sector, 0..7
        ((5, 16), dtype('int64'), [1, 5, 4, 2, 3])
        >>> radius = np.linalg.norm(X @ plane.T, axis=1)  # (5, 16) @ (16, 2) -> (5, 2)
        >>> bool(np.all((radius > 0.5) & (radius < 2.5)))  # in [1, 2], plus the noise
        True
    """
    angle = rng.uniform(0.0, 2 * np.pi, n)
    labels = (angle // (2 * np.pi / N_CLASSES)).astype(np.int64)
    radius = rng.uniform(1.0, 2.0, n)
    shifted = angle + np.deg2rad(rotation_degrees)
    in_plane = np.stack([radius * np.cos(shifted), radius * np.sin(shifted)], axis=1)  # (n, 2)
    points = in_plane @ plane + rng.normal(0.0, NOISE, (n, N_FEATURES))  # (n, 2) @ (2, 16)
    return points, labels


def run_demo(seed: int = 0) -> dict:
    """Pre-train, adapt with full fine-tuning and LoRA, return the results as a JSON-able dict.

    LoRA (Hu et al. 2021, arXiv:2106.09685) at each of RANKS with alpha = 2r, on every layer;
    AdamW for every method. The dict holds the settings, one row per method (trainable
    parameters, their share, accuracy before and after) and the energy rank of full
    fine-tuning's update per layer. A few seconds.

    Examples:
        >>> result = run_demo(seed=0)  # doctest: +SKIP
        >>> [row["method"] for row in result["methods"]]  # doctest: +SKIP
        ['full fine-tuning', 'LoRA r=1', 'LoRA r=2', 'LoRA r=4', 'LoRA r=8']
        >>> run_demo(seed=-1)
        Traceback (most recent call last):
        ...
        ValueError: seed must be a non-negative int, got -1
    """
    seed = check_int("seed", seed, low=0)  # NumPy's generators take non-negative seeds
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    plane = np.linalg.qr(rng.normal(size=(N_FEATURES, 2)))[0].T  # (2, 16), orthonormal rows
    X_pre, y_pre = make_sectors(N_PRETRAIN, plane, 0.0, rng)
    X_pre_test, y_pre_test = make_sectors(N_TEST, plane, 0.0, rng)
    X_new, y_new = make_sectors(N_ADAPT, plane, SHIFT_DEGREES, rng)
    X_new_test, y_new_test = make_sectors(N_TEST, plane, SHIFT_DEGREES, rng)

    pretrained = MLP([N_FEATURES, HIDDEN, HIDDEN, N_CLASSES], rng=rng)
    optimizer = AdamW(pretrained.parameters(), lr=3e-3)
    train(pretrained, X_pre, y_pre, optimizer, epochs=30, batch_size=64, rng=rng)
    before = accuracy(pretrained, X_new_test, y_new_test)
    total = pretrained.num_parameters()

    def adapt(model: MLP, lr: float) -> float:
        # Every method sees the same 500 shifted examples in the same order.
        optimizer = AdamW(model.parameters(), lr=lr)
        order_rng = np.random.default_rng(seed + 1)
        train(model, X_new, y_new, optimizer, epochs=ADAPT_EPOCHS, batch_size=32, rng=order_rng)
        return accuracy(model, X_new_test, y_new_test)

    def row(method: str, model: MLP, after: float) -> dict:
        trainable = model.num_trainable()
        return {
            "method": method,
            "trainable": trainable,
            "share": trainable / model.num_parameters(),
            "accuracy_before": before,
            "accuracy_after": after,
        }

    full = copy.deepcopy(pretrained)
    rows = [row("full fine-tuning", full, adapt(full, lr=FULL_LR))]
    for r in RANKS:
        init_rng = np.random.default_rng(seed + 2)
        lora = add_lora(copy.deepcopy(pretrained), r=r, alpha=2 * r, rng=init_rng)
        rows.append(row(f"LoRA r={r}", lora, adapt(lora, lr=LORA_LR)))

    updates = []
    for index, (old, new) in enumerate(zip(pretrained.layers, full.layers, strict=True)):
        if hasattr(old, "weight"):
            delta = new.weight - old.weight  # (out, in): what full fine-tuning changed
            updates.append(
                {
                    "layer": f"layers.{index}",
                    "shape": list(delta.shape),
                    "energy_rank_90": energy_rank(delta, 0.9),
                    "max_rank": min(delta.shape),
                }
            )
    return {
        "seed": seed,
        "task": {
            "features": N_FEATURES,
            "classes": N_CLASSES,
            "shift_degrees": SHIFT_DEGREES,
            "pretrain_examples": N_PRETRAIN,
            "adapt_examples": N_ADAPT,
            "test_examples": N_TEST,
        },
        "adaptation": {
            "optimizer": "AdamW",
            "epochs": ADAPT_EPOCHS,
            "batch_size": 32,
            "lr_full": FULL_LR,
            "lr_lora": LORA_LR,
            "lora_alpha": "2r",
        },
        "model_sizes": [N_FEATURES, HIDDEN, HIDDEN, N_CLASSES],
        "total_parameters": total,
        "pretrained_accuracy": accuracy(pretrained, X_pre_test, y_pre_test),
        "methods": rows,
        "full_ft_update": updates,
        "seconds": time.perf_counter() - start,
    }


def format_report(result: dict) -> str:
    """The demo's results as a plain-text report: one table of methods, one of ranks.

    `result` is a dict as `run_demo` returns it.

    Examples:
        >>> result = {
        ...     "seconds": 1.6, "model_sizes": [16, 64, 64, 8], "total_parameters": 5768,
        ...     "pretrained_accuracy": 0.912,
        ...     "task": {"features": 16, "classes": 8, "shift_degrees": 22.5,
        ...              "pretrain_examples": 4000, "adapt_examples": 500, "test_examples": 2000},
        ...     "adaptation": {"epochs": 20, "lr_full": 3e-4, "lr_lora": 3e-3},
        ...     "methods": [{"method": "LoRA r=2", "trainable": 560, "share": 0.0885,
        ...                  "accuracy_before": 0.5135, "accuracy_after": 0.9235}],
        ...     "full_ft_update": [{"layer": "layers.0", "shape": [64, 16],
        ...                         "energy_rank_90": 2, "max_rank": 16}],
        ... }
        >>> report = format_report(result)
        >>> print(report.splitlines()[0])
        lowrank NumPy demo: adapt a pre-trained MLP to a shifted task (generated data)
        >>> for line in report.splitlines()[9:11]:  # the table of methods
        ...     print(line)
          method             trainable    share  acc. before  acc. after
          LoRA r=2                 560     8.8%        51.3%       92.3%
        >>> print(report.splitlines()[-1])
          finished in 1.6 s
    """
    task, adaptation = result["task"], result["adaptation"]
    lines = [
        "lowrank NumPy demo: adapt a pre-trained MLP to a shifted task (generated data)",
        "",
        f"  Task: {task['classes']} classes, the angular sectors of a hidden plane in "
        f"{task['features']}-D; noise elsewhere.",
        f"  Pre-trained MLP {result['model_sizes']} ({result['total_parameters']:,} parameters) "
        f"on {task['pretrain_examples']} examples:",
        f"  {result['pretrained_accuracy']:.1%} held-out accuracy. Shifted task: inputs rotated "
        f"{task['shift_degrees']} degrees in that plane.",
        f"  Each method adapts on {task['adapt_examples']} shifted examples; accuracy on "
        f"{task['test_examples']} held-out ones.",
        f"  AdamW, {adaptation['epochs']} epochs: lr {adaptation['lr_full']:g} for full "
        f"fine-tuning, {adaptation['lr_lora']:g} for LoRA (on every layer, alpha = 2r).",
        "  Share: trainable / all parameters of the adapted model, adapters included.",
        "",
        f"  {'method':<18}{'trainable':>10}{'share':>9}{'acc. before':>13}{'acc. after':>12}",
    ]
    for row in result["methods"]:
        lines.append(
            f"  {row['method']:<18}{row['trainable']:>10,}{row['share']:>9.1%}"
            f"{row['accuracy_before']:>13.1%}{row['accuracy_after']:>12.1%}"
        )
    lines += [
        "",
        "  Full fine-tuning's update Delta W = W_after - W_before, per layer:",
        f"  {'layer':<10}{'shape':>10}{'energy rank (90%)':>20}{'max rank':>10}",
    ]
    for update in result["full_ft_update"]:
        shape = "x".join(str(size) for size in update["shape"])
        lines.append(
            f"  {update['layer']:<10}{shape:>10}{update['energy_rank_90']:>20}"
            f"{update['max_rank']:>10}"
        )
    lines += [
        "  Energy rank: the fewest singular directions holding 90% of ||Delta W||_F^2. For",
        "  comparison, undoing a rotation R in one plane changes layer 0 by W (R^T - I): rank 2.",
        f"  finished in {result['seconds']:.1f} s",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """`lowrank numpy-demo [--seed N]`: run the demo and print its report; returns 0.

    Examples:
        >>> from lowrank.cli import build_parser
        >>> args = build_parser().parse_args(["numpy-demo", "--seed", "1"])
        >>> args.seed
        1
        >>> main(args)  # prints the report of `format_report`  # doctest: +SKIP
    """
    print(format_report(run_demo(seed=args.seed)))
    return 0

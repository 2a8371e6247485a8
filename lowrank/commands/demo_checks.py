"""The checks of `lowrank demo`: the rank of the full fine-tuning update, and merging.

1. Intrinsic rank (Hu et al. 2021, arXiv:2106.09685, section 7): how many singular directions
   hold 90% (and 99%) of the energy of Delta W = W_after - W_before, next to a Gaussian random
   matrix of the same shape, which has no low-rank structure (`update_ranks`); and whether the
   model cares: with every update cut to its top r directions, how often the model still
   predicts what the fully fine-tuned one predicts (`rank_r_agreement`, as notebook 02 does).
2. Merging: merged and unmerged outputs agree, and a merged model costs what the base costs
   ("no additional inference latency"), timed in one run with the forward passes interleaved
   so that load from other processes hits all three alike (`merge_check`, `time_interleaved`).
   `compare_timings` reads the timings: a difference inside the run-to-run spread is reported
   as "no measurable difference", not as a result. Notebook 05 uses the same two functions.

    ranks = update_ranks(pretrained, fine_tuned, ["encoder.layer.0.attention.self.query.weight"])
"""

import copy
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lowrank.numpy import effective_rank, energy_rank, singular_values
from lowrank.torch import best_rank_r, collate_token_ids, logits, merge_lora

__all__ = [
    "MIN_ROUNDS",
    "compare_timings",
    "merge_check",
    "rank_r_agreement",
    "time_interleaved",
    "update_ranks",
]

MIN_ROUNDS = 5  # timings per model that `compare_timings` needs: quartiles of fewer say little


def time_interleaved(models: Mapping[str, nn.Module], batch: dict, rounds: int) -> dict:
    """Seconds of `rounds` forward passes of each model on one batch, interleaved.

    Each model is called as model(input_ids, attention_mask) (each (batch, tokens), from
    `batch`) under no_grad, once untimed first (one-off allocations), then once per round. The
    order within a round rotates, so no model always runs first (or right after another), and
    a burst of load from other processes hits every model alike. CUDA is synchronized before
    each clock reading. Returns {name: [seconds, one per round]}.

    Examples:
        >>> class Model(nn.Module):  # model(input_ids, attention_mask) -> logits, as the demo's
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed, self.proj = nn.Embedding(20, 8), nn.Linear(8, 2)
        ...     def forward(self, input_ids, attention_mask):  # (batch, tokens) -> (batch, 2)
        ...         return self.proj((self.embed(input_ids) * attention_mask.unsqueeze(-1)).mean(1))
        >>> models = {"a": Model(), "b": Model()}
        >>> batch = collate_token_ids([([1, 2, 3], 0), ([4, 5], 1)])
        >>> seconds = time_interleaved(models, batch, rounds=3)
        >>> {name: len(values) for name, values in seconds.items()}
        {'a': 3, 'b': 3}
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    names = list(models)
    cuda = batch["input_ids"].is_cuda

    def seconds(model: nn.Module) -> float:
        start = time.perf_counter()
        model(batch["input_ids"], batch["attention_mask"])
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timings = {name: [] for name in names}
    with torch.no_grad():
        for name in names:
            models[name].eval()
            seconds(models[name])  # warm-up, untimed
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                timings[name].append(seconds(models[name]))
    return timings


def compare_timings(seconds: Mapping[str, Sequence[float]], reference: str) -> dict:
    """Median and interquartile range of each model's times, and a verdict against `reference`.

    The rule: two models differ measurably only when the interquartile ranges [q1, q3] of their
    times do not overlap; otherwise the difference is inside the run-to-run spread and the
    verdict is "no measurable difference". Why this rule: it is the plain reading of "inside
    the spread" (the middle halves of the repeated runs overlap), it needs no extra runs, and
    it errs towards saying nothing, which is the safe error for a timing on a shared machine.
    In a simulation (each round's load drifting by 10%, each pass's own noise 5%, 9 rounds),
    identical work was called different in 0.5% of runs; pairing the runs by round and asking
    whether the ratios' interquartile range excludes 1 (sharper) did so in 19%. The price: a
    real 10% difference is found in about a third of such runs (86% of 20% differences).

    Args:
        seconds: {name: seconds of repeated runs}, at least `MIN_ROUNDS` positive values each,
            e.g. what `time_interleaved` returns.
        reference: the name the others are compared with (e.g. "base").

    Returns:
        {name: {"median_s", "q1_s", "q3_s"}}, and for every name but the reference also
        "ratio" (its median over the reference's), "measurable" and "verdict" ("no measurable
        difference", or "measurably slower (1.25x)" / "measurably faster (0.80x)").

    Examples:
        >>> seconds = {
        ...     "base": [1.0, 1.2, 0.9, 1.1, 1.0],
        ...     "same": [1.05, 0.95, 1.1, 1.0, 1.2],  # overlaps the base's spread
        ...     "slow": [1.5, 1.4, 1.6, 1.5, 1.7],  # its whole middle half is above the base's
        ... }
        >>> timing = compare_timings(seconds, reference="base")
        >>> timing["same"]["verdict"], timing["slow"]["verdict"]
        ('no measurable difference', 'measurably slower (1.50x)')
        >>> timing["base"]
        {'median_s': 1.0, 'q1_s': 1.0, 'q3_s': 1.1}
    """
    if reference not in seconds:
        raise ValueError(f"reference {reference!r} is not among the timings {sorted(seconds)}")
    stats = {}
    for name, values in seconds.items():
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1 or len(values) < MIN_ROUNDS:
            raise ValueError(
                f"{name!r} needs at least {MIN_ROUNDS} timings (a flat list), got {values.size}"
            )
        if not np.all(np.isfinite(values) & (values > 0)):
            raise ValueError(f"{name!r} has a timing that is not a positive number: {values}")
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        stats[name] = {"median_s": float(median), "q1_s": float(q1), "q3_s": float(q3)}
    ref = stats[reference]
    for name, info in stats.items():
        if name == reference:
            continue
        ratio = info["median_s"] / ref["median_s"]
        measurable = info["q1_s"] > ref["q3_s"] or info["q3_s"] < ref["q1_s"]
        direction = "slower" if ratio > 1 else "faster"
        info["ratio"] = ratio
        info["measurable"] = bool(measurable)
        info["verdict"] = (
            f"measurably {direction} ({ratio:.2f}x)" if measurable else "no measurable difference"
        )
    return stats


def merge_check(
    lora_model: nn.Module, base_model: nn.Module, examples: list, device, repeats: int
) -> dict:
    """Merged vs unmerged outputs, and the base, merged and unmerged forward times in one run.

    Both models take (input_ids, attention_mask), each (batch, tokens), and return logits
    (batch, labels); `examples` are (token ids, label) pairs (`collate_token_ids`). The merged
    model is a copy of `lora_model` merged in place (`merge_lora`: its LoRA layers run only
    their base layer); `lora_model` is left as it was given. The three are timed with
    `time_interleaved`, `repeats` rounds on up to 128 examples, and read with
    `compare_timings` against the base: the LoRA paper's "no additional inference latency"
    (Hu et al. 2021, arXiv:2106.09685, section 4.1). Returns the largest logit difference,
    the largest logit, every timing ("forward_s") and their summary ("timing").

    Examples:
        >>> from lowrank.torch import add_lora
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> class Model(nn.Module):  # model(input_ids, attention_mask) -> logits, as the demo's
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed, self.proj = nn.Embedding(20, 8), nn.Linear(8, 2)
        ...     def forward(self, input_ids, attention_mask):  # (batch, tokens) -> (batch, 2)
        ...         return self.proj((self.embed(input_ids) * attention_mask.unsqueeze(-1)).mean(1))
        >>> base = Model()
        >>> model = add_lora(copy.deepcopy(base), ["proj"], r=2)
        >>> with torch.no_grad():
        ...     _ = model.proj.B["default"].normal_()  # as after training: B @ A is not 0
        >>> examples = [([1, 2, 3], 0), ([4, 5], 1), ([6], 0)]
        >>> result = merge_check(model, base, examples, torch.device("cpu"), repeats=5)
        >>> result["max_abs_logit_diff"] < 1e-5 < result["max_abs_logit"]
        True
        >>> sorted(result["timing"]), model.proj.merged
        (['base', 'merged', 'unmerged'], False)
    """
    unmerged_logits = logits(lora_model, examples, device)
    merged = merge_lora(copy.deepcopy(lora_model).to(device))
    merged_logits = logits(merged, examples, device)
    batch = {k: v.to(device) for k, v in collate_token_ids(examples[:128]).items()}  # timing batch
    models = {"base": base_model.to(device), "merged": merged, "unmerged": lora_model}
    seconds = time_interleaved(models, batch, repeats)
    return {
        "max_abs_logit_diff": (merged_logits - unmerged_logits).abs().max().item(),
        "max_abs_logit": unmerged_logits.abs().max().item(),
        "forward_s": seconds,
        "timing": compare_timings(seconds, reference="base"),
    }


def rank_r_agreement(
    before: nn.Module,
    after: nn.Module,
    layers: list[str],
    examples: list,
    device,
    ranks: Sequence[int],
) -> dict:
    """How often `after` still predicts what it predicts when each update is cut to rank r.

    For each r, every layer named in `layers` (linear layers of both models, weight (out, in))
    gets W_before + best_rank_r(Delta W, r) (r = 0: W_before, no update), every other
    parameter keeps its `after` value, and the predicted classes (argmax of the logits, on
    `examples`, (token ids, label) pairs) are compared with those of `after` unchanged and
    with the labels. `after` gets its weights back at the end. Eckart-Young: the rank-r cut is
    the closest rank-r matrix to Delta W; the question of Hu et al. 2021 (arXiv:2106.09685,
    section 7): does the model need more than the top few directions of its update?

    Returns {"layers": how many were cut, "ranks", "agreement" (share of examples predicted
    as by `after`), "accuracy"}, one entry per rank.

    Examples:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> class Model(nn.Module):  # model(input_ids, attention_mask) -> logits, as the demo's
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed, self.proj = nn.Embedding(20, 8), nn.Linear(8, 2)
        ...     def forward(self, input_ids, attention_mask):  # (batch, tokens) -> (batch, 2)
        ...         return self.proj((self.embed(input_ids) * attention_mask.unsqueeze(-1)).mean(1))
        >>> before = Model()
        >>> after = copy.deepcopy(before)
        >>> with torch.no_grad():  # a rank-1 update of proj (2, 8)
        ...     after.proj.weight += 5 * torch.randn(2, 1) @ torch.randn(1, 8)
        >>> examples = [([i, i + 1], i % 2) for i in range(1, 19)]
        >>> cut = rank_r_agreement(before, after, ["proj"], examples, "cpu", ranks=[0, 1])
        >>> cut["ranks"], cut["agreement"][1]  # rank 1 holds all of a rank-1 update
        ([0, 1], 1.0)
    """
    weights = [after.get_submodule(name).weight for name in layers]
    originals = [weight.detach().clone() for weight in weights]
    befores = [  # each (out, in), float64, where `after` is
        before.get_submodule(name).weight.detach().to(weight.device, torch.float64)
        for name, weight in zip(layers, weights, strict=True)
    ]
    deltas = [w.double() - w0 for w, w0 in zip(originals, befores, strict=True)]
    labels = torch.tensor([label for _, label in examples])
    predicted_after = logits(after, examples, device).argmax(1)
    agreement, accuracy = [], []
    try:
        for r in ranks:
            with torch.no_grad():
                for weight, w0, delta in zip(weights, befores, deltas, strict=True):
                    weight.copy_(w0 + best_rank_r(delta, r))  # W_before + (Delta W cut to rank r)
            predicted = logits(after, examples, device).argmax(1)
            agreement.append((predicted == predicted_after).double().mean().item())
            accuracy.append((predicted == labels).double().mean().item())
    finally:
        with torch.no_grad():
            for weight, original in zip(weights, originals, strict=True):
                weight.copy_(original)
    return {
        "layers": len(layers),
        "ranks": list(ranks),
        "agreement": agreement,
        "accuracy": accuracy,
    }


def update_ranks(before: nn.Module, after: nn.Module, layers: list[str]) -> dict:
    """Energy rank (90% and 99%) and effective rank of Delta W = W_after - W_before, each
    next to a Gaussian random matrix of the same shape (no low-rank structure) for scale.

    `layers` are parameter names of both models (each a weight (out, in)); the intrinsic-rank
    question of Hu et al. 2021 (arXiv:2106.09685, section 7). Returns, per layer, the shape,
    the energy ranks, the effective rank and the singular values of Delta W and of the random
    matrix.

    Examples:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> before = nn.Sequential(nn.Linear(40, 30))
        >>> after = copy.deepcopy(before)
        >>> with torch.no_grad():  # Delta W = U V^T, two equal singular values: rank 2
        ...     U = torch.linalg.qr(torch.randn(30, 2))[0]  # (30, 2), orthonormal columns
        ...     V = torch.linalg.qr(torch.randn(40, 2))[0]  # (40, 2)
        ...     after[0].weight += U @ V.T  # (30, 40)
        >>> ranks = update_ranks(before, after, ["0.weight"])["0.weight"]
        >>> ranks["shape"], ranks["energy_rank_90"], ranks["energy_rank_99"]
        ([30, 40], 2, 2)
        >>> round(ranks["effective_rank"], 3), ranks["random_energy_rank_90"]
        (2.0, 17)
    """
    parameters_before = dict(before.named_parameters())
    parameters_after = dict(after.named_parameters())
    rng = np.random.default_rng(0)
    ranks = {}
    for layer in layers:
        after_weight = parameters_after[layer].detach().cpu().double()
        delta = (after_weight - parameters_before[layer].detach().cpu().double()).numpy()
        random = rng.normal(size=delta.shape)
        ranks[layer] = {
            "random_energy_rank_90": energy_rank(random, 0.9),
            "shape": list(delta.shape),
            "energy_rank_90": energy_rank(delta, 0.9),
            "energy_rank_99": energy_rank(delta, 0.99),
            "effective_rank": effective_rank(delta),
            "singular_values": singular_values(delta).tolist(),
            "random_singular_values": singular_values(random).tolist(),
        }
    return ranks

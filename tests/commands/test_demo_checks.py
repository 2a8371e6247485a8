"""Tests for lowrank.commands.demo_checks: the demo's rank, agreement, merge and timing checks.

Oracles: an update built with a known rank, the models' own outputs computed directly, the
order of calls recorded by the models themselves, and quartiles of synthetic timings worked
out by hand.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lowrank.commands.demo_checks import (
    compare_timings,
    merge_check,
    rank_r_agreement,
    time_interleaved,
    update_ranks,
)
from lowrank.torch import add_lora, collate_token_ids


def test_update_ranks_finds_the_rank_an_update_was_built_with():
    torch.manual_seed(0)
    before = nn.Sequential(nn.Linear(40, 30))
    after = nn.Sequential(nn.Linear(40, 30))
    after.load_state_dict(before.state_dict())
    with torch.no_grad():  # Delta W = U V^T with two equal singular values: rank 2 exactly
        U, _ = torch.linalg.qr(torch.randn(30, 2))
        V, _ = torch.linalg.qr(torch.randn(40, 2))
        after[0].weight += U @ V.T
    ranks = update_ranks(before, after, ["0.weight"])["0.weight"]
    assert ranks["shape"] == [30, 40]
    assert ranks["energy_rank_90"] == 2 and ranks["energy_rank_99"] == 2
    assert abs(ranks["effective_rank"] - 2) < 1e-5  # two equal values: entropy log 2
    assert ranks["random_energy_rank_90"] > 10  # a Gaussian matrix spreads its energy
    assert len(ranks["random_singular_values"]) == 30  # min(shape), for the plot's baseline


class Classifier(nn.Module):
    """The demo's calling convention: model(input_ids, attention_mask) -> logits."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.proj = nn.Linear(hidden, 2)

    def forward(self, input_ids, attention_mask):
        states = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.proj(torch.tanh(self.mix(states.mean(1))))


def test_merge_check_compares_merged_and_unmerged_and_leaves_the_model_unmerged():
    torch.manual_seed(1)
    base = Classifier()
    model = copy.deepcopy(base)
    add_lora(model, ["proj"], r=2)
    with torch.no_grad():
        model.proj.B["default"].normal_()
    examples = [([1, 2, 3], 0), ([4, 5], 1), ([6], 0)]
    result = merge_check(model, base, examples, torch.device("cpu"), repeats=5)
    assert result["max_abs_logit_diff"] < 1e-5 < result["max_abs_logit"]
    assert {name: len(s) for name, s in result["forward_s"].items()} == {
        "base": 5,
        "merged": 5,
        "unmerged": 5,
    }
    timing = result["timing"]  # the rule itself is tested on synthetic timings below
    assert set(timing) == {"base", "merged", "unmerged"}
    assert "verdict" not in timing["base"] and "verdict" in timing["merged"]
    assert not model.proj.merged  # left unmerged, as it was given


class Recorder(nn.Module):
    """Records each call's name in a shared list: the oracle for the order of the passes."""

    def __init__(self, name: str, calls: list) -> None:
        super().__init__()
        self.name, self.calls = name, calls

    def forward(self, input_ids, attention_mask):
        self.calls.append(self.name)
        return input_ids


def test_time_interleaved_warms_up_then_rotates_the_order_each_round():
    calls = []
    models = {name: Recorder(name, calls) for name in ("a", "b", "c")}
    batch = collate_token_ids([([1, 2], 0)])
    seconds = time_interleaved(models, batch, rounds=4)
    warm_up, rounds = calls[:3], [calls[3 + 3 * i : 6 + 3 * i] for i in range(4)]
    assert warm_up == ["a", "b", "c"]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert all(len(s) == 4 and min(s) >= 0 for s in seconds.values())
    with pytest.raises(ValueError, match="rounds must be a positive int"):
        time_interleaved(models, batch, rounds=0)


def test_compare_timings_calls_a_difference_inside_the_spread_no_measurable_difference():
    # Medians 15% apart, as "merged 11-24% faster than the base" was read, but each model's
    # middle half overlaps the other's: base [1.0, 1.3] (sorted 0.9 1.0 1.15 1.3 1.4),
    # merged [0.9, 1.1] (0.8 0.9 1.0 1.1 1.2); quartiles by hand (5 values: 2nd and 4th).
    seconds = {"base": [1.3, 0.9, 1.4, 1.0, 1.15], "merged": [1.0, 1.2, 0.8, 1.1, 0.9]}
    timing = compare_timings(seconds, reference="base")
    assert timing["base"] == {"median_s": 1.15, "q1_s": 1.0, "q3_s": 1.3}
    assert (timing["merged"]["q1_s"], timing["merged"]["q3_s"]) == (0.9, 1.1)
    assert timing["merged"]["ratio"] == pytest.approx(1.0 / 1.15)
    assert timing["merged"]["measurable"] is False
    assert timing["merged"]["verdict"] == "no measurable difference"


def test_compare_timings_calls_a_difference_beyond_the_spread_measurable_both_ways():
    rng = np.random.default_rng(0)
    base = 0.040 * (1 + 0.02 * rng.standard_normal(15))  # 2% run-to-run noise
    slower = 0.050 * (1 + 0.02 * rng.standard_normal(15))  # 25% slower, far beyond it
    faster = 0.030 * (1 + 0.02 * rng.standard_normal(15))
    timing = compare_timings({"base": base, "slow": slower, "fast": faster}, reference="base")
    assert timing["slow"]["measurable"] and timing["fast"]["measurable"]
    assert timing["slow"]["verdict"] == f"measurably slower ({timing['slow']['ratio']:.2f}x)"
    assert timing["fast"]["verdict"] == f"measurably faster ({timing['fast']['ratio']:.2f}x)"
    assert 1.15 < timing["slow"]["ratio"] < 1.35 and 0.65 < timing["fast"]["ratio"] < 0.85


def test_compare_timings_ranges_that_touch_overlap():
    # base q3 = 1.0 exactly and other q1 = 1.0 exactly: touching ranges count as overlapping
    timing = compare_timings(
        {"base": [0.8, 0.9, 0.95, 1.0, 1.1], "other": [0.9, 1.0, 1.05, 1.1, 1.2]}, "base"
    )
    assert (timing["base"]["q3_s"], timing["other"]["q1_s"]) == (1.0, 1.0)
    assert not timing["other"]["measurable"]


@pytest.mark.parametrize(
    "seconds, reference, message",
    [
        ({"base": [1.0] * 5}, "merged", "reference 'merged'"),
        ({"base": [1.0] * 4}, "base", "at least 5 timings"),
        ({"base": [1.0, 1.0, 0.0, 1.0, 1.0]}, "base", "not a positive number"),
        ({"base": [1.0, 1.0, float("nan"), 1.0, 1.0]}, "base", "not a positive number"),
    ],
)
def test_compare_timings_rejects_bad_input(seconds, reference, message):
    with pytest.raises(ValueError, match=message):
        compare_timings(seconds, reference)


def test_rank_r_agreement_against_the_models_computed_directly():
    torch.manual_seed(2)
    before = Classifier(hidden=16)
    after = copy.deepcopy(before)
    with torch.no_grad():  # a rank-2 update of `mix`, large enough to change predictions
        after.mix.weight += 3 * torch.randn(16, 2) @ torch.randn(2, 16)
    examples = [([i, (3 * i) % 40, (7 * i) % 40], i % 2) for i in range(40)]
    batch = collate_token_ids(examples)

    def predictions(model):
        with torch.no_grad():
            return model(batch["input_ids"], batch["attention_mask"]).argmax(1)

    predicted_before, predicted_after = predictions(before), predictions(after)
    weight_after = after.mix.weight.detach().clone()
    cut = rank_r_agreement(before, after, ["mix"], examples, "cpu", ranks=[0, 2, 16])
    assert cut["layers"] == 1 and cut["ranks"] == [0, 2, 16]
    # r = 0 is the model before the update; r = 2 and r = 16 hold all of a rank-2 update
    expected_0 = (predicted_before == predicted_after).double().mean().item()
    assert expected_0 < 1.0  # the update changed some predictions, so the test can fail
    assert cut["agreement"] == [pytest.approx(expected_0), 1.0, 1.0]
    labels = torch.tensor([label for _, label in examples])
    assert cut["accuracy"][0] == pytest.approx((predicted_before == labels).double().mean().item())
    assert torch.equal(after.mix.weight, weight_after)  # the weights came back

"""Tests for lowrank.commands.demo_checks: the demo's rank and merge checks.

Oracles: an update built with a known rank, and the unmerged model's own outputs.
"""

import torch
from torch import nn

from lowrank.commands.demo_checks import merge_check, update_ranks
from lowrank.torch import add_lora


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


class Classifier(nn.Module):
    """The demo's calling convention: model(input_ids, attention_mask) -> logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask):
        states = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.proj(states.mean(1))


def test_merge_check_compares_merged_and_unmerged_and_restores_the_model():
    torch.manual_seed(1)
    base = Classifier()
    model = Classifier()
    model.load_state_dict(base.state_dict())
    add_lora(model, ["proj"], r=2)
    with torch.no_grad():
        model.proj.B["default"].normal_()
    examples = [([1, 2, 3], 0), ([4, 5], 1), ([6], 0)]
    result = merge_check(model, base, examples, torch.device("cpu"), repeats=2)
    assert result["max_abs_logit_diff"] < 1e-5 < result["max_abs_logit"]
    assert set(result["forward_s"]) == {"base", "merged", "unmerged"}
    assert not model.proj.merged  # left unmerged, as it was given

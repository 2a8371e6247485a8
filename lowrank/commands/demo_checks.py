"""Checks 1 and 2 of `lowrank demo`: the rank of the full fine-tuning update, and merging.

1. Intrinsic rank (Hu et al. 2021, arXiv:2106.09685, section 7): how many singular directions
   hold 90% (and 99%) of the energy of Delta W = W_after - W_before, next to a Gaussian random
   matrix of the same shape, which has no low-rank structure.
2. Merging: merged and unmerged outputs agree, and a merged model costs what the base costs
   ("no additional inference latency"), timed in one run with the forward passes interleaved
   so that load from other processes hits all three alike.

    ranks = update_ranks(pretrained, fine_tuned, ["encoder.layer.0.attention.self.query.weight"])
"""

import time

import numpy as np
import torch
from torch import nn

from lowrank.numpy import effective_rank, energy_rank, singular_values
from lowrank.torch import collate_token_ids, logits, merge_lora, unmerge_lora

__all__ = ["merge_check", "update_ranks"]


def _forward_seconds(model: nn.Module, batch: dict) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(batch["input_ids"], batch["attention_mask"])
        if batch["input_ids"].is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def merge_check(
    lora_model: nn.Module, base_model: nn.Module, examples: list, device, repeats: int
) -> dict:
    """Merged vs unmerged outputs, and merged vs base forward time, measured in one run.

    Both models take (input_ids, attention_mask), each (batch, tokens), and return logits
    (batch, labels); `examples` are (token ids, label) pairs (`collate_token_ids`), and each
    forward pass is timed `repeats` times on up to 128 of them. The LoRA paper's "no
    additional inference latency" (Hu et al. 2021, arXiv:2106.09685, section 4.1). The LoRA
    model is left unmerged, as it was given. Returns the largest logit difference, the
    largest logit, the median forward seconds of each and the two ratios to the base.

    Examples:
        >>> import copy
        >>> from lowrank.torch import add_lora
        >>> class Classifier(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed, self.proj = nn.Embedding(20, 8), nn.Linear(8, 2)
        ...     def forward(self, input_ids, attention_mask):  # (batch, tokens) -> (batch, 2)
        ...         states = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        ...         return self.proj(states.mean(1))
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> base = Classifier()
        >>> model = add_lora(copy.deepcopy(base), ["proj"], r=2)
        >>> with torch.no_grad():
        ...     _ = model.proj.B["default"].normal_()  # as after training: B @ A is not 0
        >>> examples = [([1, 2, 3], 0), ([4, 5], 1), ([6], 0)]
        >>> result = merge_check(model, base, examples, torch.device("cpu"), repeats=2)
        >>> result["max_abs_logit_diff"] < 1e-5 < result["max_abs_logit"]
        True
        >>> sorted(result["forward_s"]), model.proj.merged
        (['base', 'merged', 'unmerged'], False)
    """
    unmerged_logits = logits(lora_model, examples, device)
    batch = {k: v.to(device) for k, v in collate_token_ids(examples[:128]).items()}  # timing batch
    base_model.to(device).eval()
    seconds = {"base": [], "unmerged": [], "merged": []}
    merge_lora(lora_model)
    merged_logits = logits(lora_model, examples, device)
    for _ in range(repeats):  # interleaved, so load from other processes hits all alike
        seconds["base"].append(_forward_seconds(base_model, batch))
        seconds["merged"].append(_forward_seconds(lora_model, batch))
        unmerge_lora(lora_model)
        seconds["unmerged"].append(_forward_seconds(lora_model, batch))
        merge_lora(lora_model)
    unmerge_lora(lora_model)
    median = {key: float(np.median(values)) for key, values in seconds.items()}
    scale = unmerged_logits.abs().max().item()
    return {
        "max_abs_logit_diff": (merged_logits - unmerged_logits).abs().max().item(),
        "max_abs_logit": scale,
        "forward_s": median,
        "merged_over_base": median["merged"] / median["base"],
        "unmerged_over_base": median["unmerged"] / median["base"],
    }


def update_ranks(before: nn.Module, after: nn.Module, layers: list[str]) -> dict:
    """Energy rank (90% and 99%) and effective rank of Delta W = W_after - W_before, each
    next to a Gaussian random matrix of the same shape (no low-rank structure) for scale.

    `layers` are parameter names of both models (each a weight (out, in)); the intrinsic-rank
    question of Hu et al. 2021 (arXiv:2106.09685, section 7). Returns, per layer, the shape,
    the energy ranks, the effective rank and the singular values of Delta W.

    Examples:
        >>> import copy
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
        }
    return ranks

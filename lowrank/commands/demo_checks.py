"""Checks 1 and 2 of `lowrank demo`: the rank of the full fine-tuning update, and merging.

1. Intrinsic rank (Hu et al. 2021, arXiv:2106.09685, section 7): how many singular directions
   hold 90% (and 99%) of the energy of Delta W = W_after - W_before, next to a Gaussian random
   matrix of the same shape, which has no low-rank structure.
2. Merging: merged and unmerged outputs agree, and a merged model costs what the base costs
   ("no additional inference latency"), timed in one run with the forward passes interleaved
   so that load from other processes hits all three alike.
"""

import time

import numpy as np
import torch
from torch import nn

from lowrank.numpy import effective_rank, energy_rank, singular_values
from lowrank.torch import collate_token_ids, logits, merge_lora, unmerge_lora


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
    """Merged vs unmerged outputs, and merged vs base forward time, measured in one run."""
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
    next to a Gaussian random matrix of the same shape (no low-rank structure) for scale."""
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

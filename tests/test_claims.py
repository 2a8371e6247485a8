"""Tests for lowrank.claims. Oracles: the LoRA paper's GPT-3 175B numbers (Hu et al. 2021,
arXiv:2106.09685: abstract and section 4.2) and the QLoRA paper's LLaMA-65B numbers (Dettmers et
al. 2023, arXiv:2305.14314: section 1), and which quantity each of them is."""

import pytest

from lowrank.accounting import weight_bytes
from lowrank.claims import Claim, lora_paper_claims, qlora_paper_claims
from lowrank.shapes import GPT3_175B


def test_lora_paper_claims_say_which_quantity_is_10000x():
    params, checkpoint, memory = lora_paper_claims()
    assert params.unit == "parameters" and checkpoint.unit == memory.unit == "bytes"
    assert 9_000 < params.ratio < 10_000 and 9_000 < checkpoint.ratio < 10_000  # "10,000x"
    assert checkpoint.after == 36 * 2**20
    # VRAM: the paper's 1.2 TB -> 350 GB is 3.4x; ours without activations is 6x. Never 10,000x:
    # what LoRA keeps is at least the frozen fp16 weights, the paper's 350 GB.
    assert 3 <= memory.ratio <= 6.01
    assert memory.after >= weight_bytes(GPT3_175B, "fp16")
    assert memory.after == pytest.approx(350e9, rel=0.01)
    for claim in (params, checkpoint, memory):
        assert claim.quantity in str(claim) and "paper" in str(claim)
    assert "MiB" in str(checkpoint) and "TB" in str(memory)


def test_qlora_paper_claims():
    weights, memory = qlora_paper_claims()
    assert memory.before > 780e9  # "from >780GB of GPU memory"
    assert memory.after < 48e9  # "to <48GB" (ours has no activations, so it must be below)
    assert 33e9 < weights.after < 35e9


def test_claim_prints_both_counts_and_the_ratio():
    claim = Claim("trainable parameters", '"10,000x"', 175_000_000_000, 18_874_368, "parameters")
    assert str(claim) == (
        "trainable parameters: 175,000,000,000 (175.0B) -> 18,874,368 (18.9M) (9,272x fewer); "
        'paper: "10,000x"'
    )
    in_bytes = Claim("size", "p", 4_000, 1_000, "bytes", note="a note")
    assert (
        str(in_bytes)
        == "size: 4.0 kB (3.9 KiB) -> 1.0 kB (1,000 B) (4.0x smaller); paper: p\n  a note"
    )

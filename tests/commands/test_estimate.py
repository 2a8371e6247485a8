"""`lowrank estimate`: the breakdown printed for all-MiniLM-L6-v2's config.json."""

from lowrank.cli import main
from lowrank.torch.hf import minilm_path


def test_estimate_prints_the_breakdown(capsys):
    assert main(["estimate", str(minilm_path()), "--method", "qlora", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    for part in ("weights", "adapters", "gradients", "optimizer", "activations", "total", "fits"):
        assert part in out

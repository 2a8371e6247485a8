"""Training under torch.distributed: `torchrun --nproc_per_node 2` on the CPU (gloo) makes the run
one process makes with the same global batch, under DDP and FSDP2, for LoRA and QLoRA, and
`lowrank finetune` accepts the same launch.

Oracles: the same tiny run in one plain process (the reference: no process group, no split of
the batch, no all-reduce); the sizes DDP's own reducer reports against the trainable tensors
counted by hand from the architecture; the shapes of the shards FSDP holds against the sizes
worked out by hand; a hand-written weighted mean for the split of a micro-batch.

Tolerances (float32): the per-step losses within 1e-6 relative and the final weights within
1e-6 absolute of the one-process run (1e-5 for the BERT of the CLI test). They cannot be
bit-identical: the ranks' halves of a micro-batch are reduced separately and then summed (the
all-reduce), not in one sum, so each float32 rounding differs by about 6e-8 relative; AdamW
divides by sqrt(v) and carries such differences along for the 6 steps (measured: 1.1e-7 on the
losses and 3e-8 on the weights).
Across ranks the adapters are bit-identical: DDP gives every rank the same averaged gradient
and each applies the same AdamW step; FSDP's gathered tensors are one copy.

The launches cost most of the time (imports): all five 2-process training runs share one
launch (`distributed_worker.py`), the CLI has its own; about 60 s on 2 cores in all. The one
CUDA test (nccl) needs two GPUs and is skipped without them.
"""

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torchrun import run_torchrun

from lowrank.cli import main as cli_main
from lowrank.commands.finetune import finetune
from lowrank.torch.distributed import (
    Parallel,
    full_trainable,
    launch_from_env,
    shard_micro_batch,
)
from lowrank.torch.hf import minilm_path
from lowrank.torch.train import TrainConfig, torch_threads

WORKER = Path(__file__).with_name("distributed_worker.py")
RUNS = ["ddp", "fsdp", "ddp:nf4", "fsdp:nf4:uint8", "fsdp:nf4:bfloat16"]
LOSS_RTOL = 1e-6  # see the module docstring: float32 sums in another order, over 6 steps
WEIGHT_ATOL = 1e-6
FINETUNE_ATOL = 1e-5  # a 2-layer BERT: longer sums, and padding to each half's longest row
# trainable tensors by hand: two LoRA pairs on 16 x 16 layers at r = 2 (A 2x16, B 16x2) and a
# 16 -> 1 head trained in full (weight 1x16, bias 1): 6 tensors of float32
TRAINABLE_TENSORS = 6
TRAINABLE_BYTES = 4 * (2 * (2 * 16 + 16 * 2) + 16 + 1)
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONPATH": str(Path(__file__).parents[2]),
}


def _torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone` (a free rendezvous port) with `args`."""
    done = run_torchrun(list(args), env=ENV, nproc=nproc, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _worker():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(folder: Path, rank: int) -> tuple[dict, dict]:
    record = json.loads((folder / f"rank{rank}.json").read_text())
    return record, load_file(folder / f"rank{rank}.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The four 2-process runs (one launch), and the one-process references beside them."""
    out = tmp_path_factory.mktemp("distributed")
    _torchrun(str(WORKER), str(out), *RUNS)
    worker = _worker()
    with torch_threads(1):
        worker.run(out / "single", None, None, None)
        worker.run(out / "single-nf4", None, "nf4", None)
    return out


@pytest.mark.parametrize("name", [run.replace(":", "-") for run in RUNS])
def test_two_processes_make_the_one_process_run(runs, name):
    reference, reference_state = _read(runs / ("single-nf4" if "nf4" in name else "single"), 0)
    (first, first_state), (second, second_state) = _read(runs / name, 0), _read(runs / name, 1)
    assert first["steps"] == reference["steps"] == 6
    assert first["losses"] == second["losses"]  # the all-reduced loss, the same on both ranks
    torch.testing.assert_close(
        torch.tensor(first["losses"], dtype=torch.float64),
        torch.tensor(reference["losses"], dtype=torch.float64),
        rtol=LOSS_RTOL,
        atol=0,
    )
    assert first["evals"] == second["evals"] and len(first["evals"]) == 3  # one per epoch
    for metrics, expected in zip(first["evals"], reference["evals"], strict=True):
        assert metrics["mse"] == pytest.approx(expected["mse"], rel=LOSS_RTOL)
    assert first_state.keys() == second_state.keys() == reference_state.keys()
    for key, tensor in first_state.items():
        assert torch.equal(tensor, second_state[key]), key  # bit-identical across ranks
        torch.testing.assert_close(tensor, reference_state[key], rtol=0, atol=WEIGHT_ATOL)


def test_a_ddp_checkpoint_is_written_once_and_resumes_in_one_process(runs, tmp_path):
    run = runs / "ddp" / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged if line["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    worker = _worker()
    with torch_threads(1):  # one process goes on from the 2-process run's step 3
        worker.run(tmp_path, None, None, None, resume_from=str(run / "checkpoint-3"))
    resumed, resumed_state = _read(tmp_path, 0)
    finished, finished_state = _read(runs / "ddp", 0)
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]), torch.tensor(finished["losses"]), rtol=LOSS_RTOL, atol=0
    )
    for key, tensor in finished_state.items():
        torch.testing.assert_close(resumed_state[key], tensor, rtol=0, atol=WEIGHT_ATOL)


@pytest.mark.parametrize("name", ["ddp", "ddp-nf4"])
def test_ddp_all_reduces_the_trainable_tensors_only(runs, name):
    registered = _read(runs / name, 0)[0]["ddp"]  # what DDP's reducer reported
    assert registered["num_parameter_tensors"] == TRAINABLE_TENSORS
    assert registered["total_parameter_size_bytes"] == TRAINABLE_BYTES  # no frozen or 4-bit one


def test_fsdp_shards_the_frozen_base_and_the_4bit_codes(runs):
    shards = [_read(runs / "fsdp", rank)[0]["shards"] for rank in (0, 1)]
    assert [s["blocks.0.fc.base_layer.weight"] for s in shards] == [[8, 16], [8, 16]]
    codes = [_read(runs / "fsdp-nf4-uint8", rank)[0]["shards"] for rank in (0, 1)]
    # a 16 x 16 weight is 256 codes in 128 bytes: 64 bytes on each rank
    assert [s["blocks.0.fc.base_layer.weight_packed"] for s in codes] == [[64], [64]]


def test_a_micro_batch_split_over_ranks_weights_to_its_mean():
    torch.manual_seed(0)
    losses = torch.randn(9, dtype=torch.float64)  # per example
    indices = list(range(9))
    for world_size in (2, 3, 4, 16):
        averaged = 0.0  # what DDP computes: the mean over ranks of weight * rank's mean
        for rank in range(world_size):
            mine, weight = shard_micro_batch(indices, rank, world_size)
            averaged += weight * losses[mine].mean() / world_size
        torch.testing.assert_close(averaged, losses.mean(), rtol=1e-12, atol=0)


def test_the_launch_environment_is_read_and_checked():
    assert launch_from_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}).rank == 1
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        launch_from_env({"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match=r"LOCAL_RANK must be in \[0, WORLD_SIZE=2\)"):
        launch_from_env({"LOCAL_RANK": "-1", "WORLD_SIZE": "2"})
    one = Parallel.start("fsdp", torch.device("cpu"))  # no torchrun: one process, no wrapper
    model = torch.nn.Linear(2, 2)
    assert one.mode is None and one.wrap(model) is model and one.mean(0.25) == 0.25
    with full_trainable(model):
        assert isinstance(model.weight, torch.nn.Parameter)


def test_train_config_refuses_an_unknown_parallel_and_fsdp_checkpoints():
    with pytest.raises(ValueError, match="parallel must be one of"):
        TrainConfig(parallel="deepspeed")
    with pytest.raises(ValueError, match="checkpoints .* need parallel='ddp'"):
        TrainConfig(parallel="fsdp", save_steps=2)


def test_finetune_refuses_fsdp_with_checkpoints_in_one_line(tmp_path, capsys):
    argv = ["finetune", "gpt2", str(tmp_path / "d.jsonl"), "--strategy", "fsdp", "--save-steps"]
    assert cli_main([*argv, "1"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory) -> Path:
    """A tiny random BERT classifier with all-MiniLM's tokenizer (no download)."""
    folder = tmp_path_factory.mktemp("bert")
    config = transformers.BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_dropout_prob=0.0,  # dropout draws other masks on two ranks than on one
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, folder / name)
    return folder


def test_lowrank_finetune_under_torchrun_trains_the_one_process_adapter(tiny_bert_folder, tmp_path):
    words = "good bad fine nice awful great ok meh wow sad glad mad dull".split()
    data = tmp_path / "words.jsonl"
    rows = [{"text": word, "label": ["neg", "pos"][i % 2]} for i, word in enumerate(words)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # --lora-r, not --r: torchrun's parser would take --r for an abbreviation of its --rdzv-*
    options = ["--lora-r", "2", "--batch-size", "4", "--epochs", "2", "--lr", "1e-2"]
    done = _torchrun("-m", "lowrank", "finetune", str(tiny_bert_folder), str(data), *options,
                     "--out", str(tmp_path / "two"))  # fmt: skip
    assert done.stdout.count("saved a LoRA adapter") == 1, done.stdout  # rank 0 alone prints
    with torch_threads(1):
        finetune(tiny_bert_folder, data, r=2, batch_size=4, epochs=2, lr=1e-2,
                 out_dir=tmp_path / "one", progress=False)  # fmt: skip
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert two.keys() == one.keys() and len(one) > 2  # the factors and the classifier head
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=FINETUNE_ATOL)
    steps = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert sum(line["event"] == "config" for line in steps) == 1  # one log, by rank 0


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl on CUDA needs two GPUs")
def test_two_gpus_under_nccl_make_the_one_process_run(tmp_path):
    _torchrun(str(WORKER), str(tmp_path), "ddp", "fsdp:nf4:uint8", "--device", "cuda")
    worker = _worker()
    worker.run(tmp_path / "single", None, None, None, "cuda")
    worker.run(tmp_path / "single-nf4", None, "nf4", None, "cuda")
    for name, reference in (("ddp", "single"), ("fsdp-nf4-uint8", "single-nf4")):
        (first, state), (second, _) = _read(tmp_path / name, 0), _read(tmp_path / name, 1)
        expected, expected_state = _read(tmp_path / reference, 0)
        assert first["losses"] == second["losses"]
        # float32 on CUDA (no autocast, no TF32 by default): other kernels, the same bound
        torch.testing.assert_close(
            torch.tensor(first["losses"], dtype=torch.float64),
            torch.tensor(expected["losses"], dtype=torch.float64),
            rtol=10 * LOSS_RTOL,
            atol=0,
        )
        for key, tensor in state.items():
            torch.testing.assert_close(tensor, expected_state[key], rtol=0, atol=10 * WEIGHT_ATOL)

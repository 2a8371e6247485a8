"""What each of N GPUs holds under DDP and FSDP: the per-GPU parts of a memory estimate.

Framework-free, like `lowrank.memory`, which calls `per_gpu_parts` when `estimate_memory` is
asked about several GPUs (`gpus=N, strategy="ddp" | "fsdp"`). The batch of a step is split:
each GPU runs `batch_size / N` sequences, so its activations are those of its share, and
what the rest of a step holds depends on the strategy:

- DDP (`torch.nn.parallel.DistributedDataParallel`; Li et al. 2020, arXiv:2006.15704): every
  GPU keeps a whole replica: weights, adapters, gradients and AdamW state. Only parameters that
  require grad are synchronised, so under LoRA (Hu et al. 2021, arXiv:2106.09685) only the
  adapters' gradients are all-reduced, and the frozen or 4-bit base costs no traffic. On top,
  DDP's reducer keeps its gradient buckets, flat copies of every trainable gradient
  (`gradient_as_bucket_view=False`, DDP's default and lowrank's: "DDP gradient buckets").
- FSDP (FSDP2's `fully_shard` per transformer block and on the root; Zhao et al. 2023,
  arXiv:2304.11277): every *parameter*, frozen or trained, is split in N shards, and so are its
  gradient and AdamW state. Buffers are not parameters and stay whole on every GPU: QLoRA's
  (Dettmers et al. 2023, arXiv:2305.14314) packed 4-bit codes shard only when they are stored as
  a parameter (`lowrank.torch.distributed.set_quant_storage`, after bitsandbytes'
  `quant_storage`), which lowrank's FSDP recipe does (uint8); their absmax and
  double-quantization constants stay buffers, replicated. Working memory added by FSDP: two
  blocks' parameters gathered whole at a time (the one running and the one prefetched), their
  unsharded gradients before the reduce-scatter, and the root (embeddings, head) gathered for
  the whole step, which FSDP2 does not reshard after the forward pass.

Not counted: NCCL's own buffers and communication streams' memory, the CUDA context (as for one
GPU), allocator fragmentation, padding each shard to a multiple of N rows.

    >>> from lowrank.memory import estimate_memory
    >>> llama2_7b = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
    ...              "num_attention_heads": 32, "intermediate_size": 11008, "vocab_size": 32000}
    >>> one = estimate_memory(llama2_7b, method="lora", batch_size=8, seq_len=512)
    >>> fsdp = estimate_memory(llama2_7b, method="lora", batch_size=8, seq_len=512, gpus=4,
    ...                        strategy="fsdp")
    >>> round(one.weights / fsdp.weights, 2)  # every weight is a sharded parameter
    4.0
"""

import math

from lowrank._validate import PARALLEL_MODES

__all__ = ["STRATEGIES", "per_gpu_parts", "sharded_weight_parts"]

STRATEGIES = PARALLEL_MODES  # the trainer's `parallel` modes, one vocabulary
REPLICATED_UNDER_FSDP = ("absmax, double-quant",)  # buffers: FSDP shards parameters only


def _shard(n_bytes: int, gpus: int) -> int:
    return math.ceil(n_bytes / gpus)


def sharded_weight_parts(weight_parts: dict[str, int], gpus: int, strategy: str) -> dict:
    """Each GPU's bytes of the weights, by kind (`MemoryEstimate.weight_parts`' kinds).

    Examples:
        >>> from lowrank.sharding import sharded_weight_parts
        >>> parts = {"4-bit packed weights": 800, "absmax, double-quant": 100}
        >>> sharded_weight_parts(parts, 4, "fsdp")  # constants are buffers: replicated
        {'4-bit packed weights': 200, 'absmax, double-quant': 100}
        >>> sharded_weight_parts(parts, 4, "ddp") == parts  # a whole replica per GPU
        True
    """
    if strategy == "ddp":
        return dict(weight_parts)
    return {
        kind: n if kind in REPLICATED_UNDER_FSDP else _shard(n, gpus)
        for kind, n in weight_parts.items()
    }


def per_gpu_parts(
    *,
    gpus: int,
    strategy: str,
    weight_parts: dict[str, int],
    adapters: int,
    gradients: int,
    n_layers: int,
    full: bool,
) -> dict[str, int]:
    """The memory one GPU adds for its strategy, beyond its share of the single-GPU parts.

    Args:
        gpus: how many GPUs share the step.
        strategy: "ddp" or "fsdp".
        weight_parts: the whole model's weights by kind, unsharded.
        adapters: the whole model's adapter bytes (0 for full fine-tuning).
        gradients: the whole model's trainable gradients, in bytes.
        n_layers: transformer blocks, FSDP's units besides the root.
        full: full fine-tuning, where the root's embeddings and head train too (their
            gradient is made whole before its reduce-scatter).

    Returns:
        {part: bytes} per GPU: DDP's gradient buckets, or FSDP's gathered root, gathered blocks
        and the unsharded gradients of what is gathered.

    Examples:
        >>> from lowrank.sharding import per_gpu_parts
        >>> per_gpu_parts(gpus=2, strategy="ddp", weight_parts={"linear weights (bf16)": 64},
        ...               adapters=8, gradients=8, n_layers=4, full=False)
        {'DDP gradient buckets': 8}
        >>> per_gpu_parts(gpus=2, strategy="fsdp", adapters=8, gradients=8, n_layers=4,
        ...               weight_parts={"linear weights (bf16)": 64, "embeddings and head": 40},
        ...               full=False)  # two of four blocks (64 + 8 bytes) gathered at a time
        {'FSDP gathered root': 40, 'FSDP gathered blocks': 36, 'FSDP whole gradients': 2}
    """
    if strategy == "ddp":
        return {"DDP gradient buckets": gradients}
    root = weight_parts.get("embeddings and head", 0)
    blocks = sum(n for kind, n in weight_parts.items() if kind != "embeddings and head")
    block = math.ceil((blocks + adapters) / n_layers)  # one block's parameters, whole
    block_gradients = math.ceil((gradients - (root if full else 0)) / n_layers)
    return {
        "FSDP gathered root": root,
        "FSDP gathered blocks": 2 * block,
        "FSDP whole gradients": block_gradients + (root if full else 0),
    }

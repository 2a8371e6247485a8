"""Peak memory of a real training step, to check `lowrank.memory.estimate_memory` against.

    peak = measure_peak_memory("Llama-2-7b/config.json", method="qlora", targets=["q_proj"])

The estimate (Hu et al. 2021, arXiv:2106.09685, for LoRA's parts; Dettmers et al. 2023,
arXiv:2305.14314, for the 4-bit weights) is only as good as what it is compared with, so the
comparison shares nothing with it: `measure_peak_memory` starts a fresh Python process
(`python -m lowrank.torch.measure '<case as JSON>'`, the `main` below), which builds the model
from its config with random weights, adds LoRA with `lowrank.torch.add_lora`, trains a few
AdamW steps on random tokens and prints the peak. A fresh process, because nothing this one
already holds or has freed should blur the number.

`PeakMemory` is the measurement itself, for any block of code:
- CUDA: the caching allocator's own peak (`torch.cuda.max_memory_allocated`) after a reset;
- CPU (Linux): the process's resident memory. The kernel keeps its peak (VmHWM in
  /proc/self/status), which `reset_peak_rss` sets back to the current resident memory
  (VmRSS). In the measuring process, MALLOC_MMAP_THRESHOLD_=65536 makes glibc return freed
  tensors to the OS at once, so resident memory follows what is allocated, and a warm-up step
  on a few tokens first loads code, tables and thread pools.
"""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lowrank._validate import METHODS, check_choice, check_int
from lowrank.shapes import MODEL_FAMILIES, read_config

__all__ = [
    "PeakMemory",
    "current_rss_bytes",
    "main",
    "measure_peak_memory",
    "peak_rss_bytes",
    "reset_peak_rss",
]

# --- the process's resident memory (Linux /proc) -----------------------------------------------


def _status_bytes(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"{field_name} not in /proc/self/status")


def current_rss_bytes() -> int:
    """This process's resident memory now, in bytes (Linux: VmRSS of /proc/self/status;
    elsewhere an OSError).

    Examples:
        >>> import sys
        >>> sys.platform != "linux" or current_rss_bytes() > 0
        True
    """
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """This process's peak resident memory since start or the last `reset_peak_rss`, in bytes
    (Linux: VmHWM of /proc/self/status; elsewhere an OSError).

    Examples:
        >>> import sys
        >>> sys.platform != "linux" or peak_rss_bytes() >= current_rss_bytes()
        True
    """
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Reset the peak (VmHWM) to the current resident memory (Linux >= 4.0: clear_refs 5;
    elsewhere an OSError).

    Examples:
        >>> import sys
        >>> if sys.platform == "linux":
        ...     reset_peak_rss()
        ...     print(peak_rss_bytes() - current_rss_bytes() < 2**20)  # peak = current again
        ... else:
        ...     print(True)
        True
    """
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


class PeakMemory:
    """Peak memory of a block: `with PeakMemory(device) as peak: ...`, then `peak.peak_bytes`
    (the highest the memory reached during the block) and `peak.rise_bytes` (how far above
    the start, >= 0). CUDA: the allocator's allocated bytes; CPU: the process's resident memory
    (Linux). Both are None where the peak cannot be measured (a CPU without Linux /proc).

    Examples:
        >>> import sys
        >>> with PeakMemory("cpu") as peak:
        ...     block = torch.ones(2**22)  # 16 MiB (resident unless reused memory was)
        >>> sys.platform != "linux" or peak.peak_bytes >= peak.rise_bytes >= 0  # None off Linux
        True
        >>> with PeakMemory("cuda") as peak:  # doctest: +SKIP
        ...     block = torch.ones(2**22, device="cuda")
        >>> peak.rise_bytes >= 2**24  # doctest: +SKIP
        True
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.rise_bytes: int | None = None
        self._start_bytes: int | None = None

    def __enter__(self) -> "PeakMemory":
        self.peak_bytes = self.rise_bytes = self._start_bytes = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            try:
                reset_peak_rss()
                self._start_bytes = current_rss_bytes()
            except OSError:  # not Linux: no way to reset the peak, so no measurement
                pass
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._start_bytes is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = peak_rss_bytes()
        self.rise_bytes = max(0, self.peak_bytes - self._start_bytes)


# --- the measuring process ----------------------------------------------------------------------


def measure_peak_memory(
    config: dict | str | os.PathLike,
    *,
    method: str = "lora",
    batch_size: int = 1,
    seq_len: int = 512,
    r: int = 8,
    targets: list[str] | None = None,
    gradient_checkpointing: bool = False,
    steps: int = 2,
    device: str = "cpu",
) -> int:
    """Measure what `estimate_memory(..., dtype="fp32")` estimates: the peak bytes of building
    the model (fp32, random weights from `config`) and training it `steps` AdamW steps.

    Runs in a fresh Python process (needs torch and transformers), so nothing this process
    already holds or has freed blurs the number. `targets` are layer names for `add_lora`
    (needed for "lora"/"qlora"). On "cpu" (Linux) it reads the rise of the peak resident memory,
    on "cuda" the caching allocator's peak (`torch.cuda.max_memory_allocated`).

    Args:
        config: a Hugging Face config (a dict, a config.json or its folder).
        method: "full", "lora" or "qlora" (4-bit NF4 base, Dettmers et al. 2023).
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        r: the LoRA rank.
        targets: layer names to adapt (`add_lora`), e.g. ["q_proj", "v_proj"].
        gradient_checkpointing: recompute activations in backward (non-reentrant).
        steps: AdamW steps measured.
        device: "cpu" or "cuda".

    Returns:
        The rise of the peak memory in bytes while building and training the model.

    Raises:
        ValueError: a bad argument, or "lora"/"qlora" without targets.
        RuntimeError: the measuring process failed (its stderr is in the message).

    Examples:
        >>> config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2,
        ...           "vocab_size": 128, "n_positions": 64}
        >>> rise = measure_peak_memory(config, seq_len=32, targets=["c_attn"])  # doctest: +SKIP
        >>> rise > 0  # bytes; a fresh process builds and trains the model  # doctest: +SKIP
        True
        >>> measure_peak_memory(config, method="lora")
        Traceback (most recent call last):
        ...
        ValueError: method 'lora' needs targets (layer names for add_lora)
    """
    check_choice("method", method, METHODS)
    sizes = dict(batch_size=batch_size, seq_len=seq_len, r=r, steps=steps)
    for name, value in sizes.items():
        check_int(name, value)
    if method != "full" and not targets:
        raise ValueError(f"method {method!r} needs targets (layer names for add_lora)")
    case = dict(
        config=read_config(config),
        method=method,
        batch_size=batch_size,
        seq_len=seq_len,
        r=r,
        targets=targets,
        gradient_checkpointing=gradient_checkpointing,
        steps=steps,
        device=device,
    )
    root = str(Path(__file__).resolve().parents[2])  # so the child imports this lowrank
    pythonpath = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": pythonpath}
    done = subprocess.run(
        [sys.executable, "-m", "lowrank.torch.measure", json.dumps(case)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process failed:\n{done.stderr[-3000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    """The measuring process: `python -m lowrank.torch.measure '<case as JSON>'` prints the
    rise in bytes (the keys of the case are `measure_peak_memory`'s arguments).

    Examples:
        >>> import json, subprocess, sys
        >>> config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2,
        ...           "vocab_size": 128, "n_positions": 64}
        >>> case = {"config": config, "method": "full", "batch_size": 1, "seq_len": 32, "r": 8,
        ...         "targets": None, "gradient_checkpointing": False, "steps": 2, "device": "cpu"}
        >>> command = [sys.executable, "-m", "lowrank.torch.measure", json.dumps(case)]
        >>> done = subprocess.run(command, capture_output=True, text=True)  # doctest: +SKIP
        >>> int(done.stdout.splitlines()[-1]) > 0  # the rise in bytes  # doctest: +SKIP
        True
    """
    import transformers  # only the measuring process builds models: the caller stays light

    from lowrank.torch import add_lora

    case = json.loads(sys.argv[1])
    config_dict, device = case["config"], torch.device(case["device"])
    decoder = MODEL_FAMILIES.get(config_dict["model_type"]) != "bert"
    torch.set_num_threads(1)

    def build(config: transformers.PretrainedConfig) -> torch.nn.Module:
        auto = transformers.AutoModelForCausalLM if decoder else transformers.AutoModel
        model = auto.from_config(config).to(device)
        if case["method"] != "full":
            quant_type = "nf4" if case["method"] == "qlora" else None
            add_lora(model, case["targets"], r=case["r"], alpha=16, quant_type=quant_type)
        if case["gradient_checkpointing"]:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        return model.train()

    def step(model: torch.nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        out = model(input_ids=ids, labels=ids) if decoder else model(input_ids=ids)
        loss = out.loss if decoder else out.last_hidden_state.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    torch.manual_seed(0)
    shape = (case["batch_size"], case["seq_len"])
    ids = torch.randint(0, config_dict["vocab_size"], shape).to(device)  # [batch, seq]
    config = transformers.AutoConfig.for_model(**config_dict)
    warm = build(config)  # a warm-up step on a few tokens; its memory is returned before measuring
    step(warm, ids[:1, :8], torch.optim.AdamW(trainable(warm)))
    del warm
    with PeakMemory(device) as peak:
        model = build(config)
        optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
        for _ in range(case["steps"]):
            step(model, ids, optimizer)
    if peak.rise_bytes is None:
        sys.exit("peak memory is not measurable here: CPU needs Linux /proc (or use CUDA)")
    print(json.dumps(peak.rise_bytes))


if __name__ == "__main__":
    main()

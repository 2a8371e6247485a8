"""Peak memory of a real training step, to check `lowrank.memory.estimate_memory` against.

    peak = measure_peak_memory("Llama-2-7b/config.json", method="qlora", targets=["q_proj"])
    receipt = measure_receipt(small_config, method="qlora", batch_size=8, seq_len=128)

The estimate (Hu et al. 2021, arXiv:2106.09685, for LoRA's parts; Dettmers et al. 2023,
arXiv:2305.14314, for the 4-bit weights) is only as good as what it is compared with, so the
comparison shares nothing with it: `measure_peak_memory` starts a fresh Python process
(`python -m lowrank.torch.measure '<case as JSON>'`, the `main` below), which builds the model
from its config with random weights (a BERT-style encoder without its pooler, as the estimate
counts it), adds LoRA with `lowrank.torch.add_lora`, trains a few AdamW steps on random tokens
keeping only the loss (as a training loop does) and prints the peak. A fresh process, because
nothing this one already holds or has freed should blur the number.

`measure_receipt` measures the same and itemises it, counted in the measuring process itself:
the weights by kind (packed 4-bit codes, their absmax and double-quantization constants,
embeddings and head, norms, biases and buffers, linear weights kept in full precision), the
adapters, gradients and AdamW state (read off the tensors), and the activations autograd saves,
by kind, recorded with `torch.autograd.graph.saved_tensors_hooks` during the first step's
forward pass (each storage once, the model's own parameters and buffers left out; with gradient
checkpointing, each block's input). What the peak holds beyond these is the backward pass's
working memory and the allocator's slack: `lowrank estimate CONFIG --measure` prints them all
next to the estimate. (This file is ~500 lines: the measuring process and its census are one
program, read together.)

`PeakMemory` is the measurement itself, for any block of code:
- CUDA: the caching allocator's own peak (`torch.cuda.max_memory_allocated`) after a reset;
- CPU (Linux): the process's resident memory. The kernel keeps its peak (VmHWM in
  /proc/self/status), which `reset_peak_rss` sets back to the current resident memory
  (VmRSS). In the measuring process, MALLOC_MMAP_THRESHOLD_=65536 makes glibc return freed
  tensors to the OS at once, so resident memory follows what is allocated, and a warm-up step
  on a few tokens first loads code, tables and thread pools.
"""

import contextlib
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lowrank._validate import FLOAT_DTYPES, METHODS, check_bool, check_choice, check_int
from lowrank.shapes import (
    ALL_LINEAR,
    MODEL_FAMILIES,
    config_to_shape,
    method_default_targets,
    read_config,
)

__all__ = [
    "PeakMemory",
    "current_rss_bytes",
    "main",
    "measure_peak_memory",
    "measure_receipt",
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
    targets: list[str] | str | None = None,
    gradient_checkpointing: bool = False,
    steps: int = 2,
    device: str = "cpu",
    dtype: str = "fp32",
    dora: bool = False,
) -> int:
    """Measure what `estimate_memory(..., dtype=dtype, device=device)` estimates: the peak bytes
    of building the model (random weights from `config`) and training it `steps` AdamW steps.

    Runs in a fresh Python process (needs torch and transformers), so nothing this process
    already holds or has freed blurs the number. On "cpu" (Linux) it reads the rise of the peak
    resident memory, on "cuda" the caching allocator's peak (`torch.cuda.max_memory_allocated`).

    Args:
        config: a Hugging Face config (a dict, a config.json or its folder).
        method: "full", "lora" or "qlora" (4-bit NF4 base, Dettmers et al. 2023).
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        r: the LoRA rank.
        targets: layer names to adapt (`add_lora`), e.g. ["q_proj", "v_proj"], or "all-linear";
            None: the method's default (`lowrank.shapes.method_default_targets`).
        gradient_checkpointing: recompute activations in backward (non-reentrant).
        steps: AdamW steps measured.
        device: "cpu" or "cuda".
        dtype: the model's weights and activations ("fp32", "bf16", "fp16").
        dora: DoRA adapters (`add_lora(..., use_dora=True)`; Liu et al. 2024) instead of LoRA.

    Returns:
        The rise of the peak memory in bytes while building and training the model.

    Raises:
        ValueError: a bad argument, or a model type without default LoRA targets.
        RuntimeError: the measuring process failed (its stderr is in the message).

    Examples:
        >>> config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2,
        ...           "vocab_size": 128, "n_positions": 64}
        >>> rise = measure_peak_memory(config, seq_len=32, targets=["c_attn"])  # doctest: +SKIP
        >>> rise > 0  # bytes; a fresh process builds and trains the model  # doctest: +SKIP
        True
        >>> measure_peak_memory(config, method="adam")
        Traceback (most recent call last):
        ...
        ValueError: method must be one of ['full', 'lora', 'qlora'], got 'adam'
    """
    return _run(_case(**locals(), receipt=False))  # locals(): the arguments, as given


def measure_receipt(
    config: dict | str | os.PathLike,
    *,
    method: str = "lora",
    batch_size: int = 1,
    seq_len: int = 512,
    r: int = 8,
    targets: list[str] | str | None = None,
    gradient_checkpointing: bool = False,
    steps: int = 2,
    device: str = "cpu",
    dtype: str = "fp32",
    dora: bool = False,
) -> dict:
    """`measure_peak_memory`, itemised: the peak and what the measuring process counted.

    Same arguments as `measure_peak_memory`. Returns {"peak": bytes, "weights": {kind: bytes},
    "adapters": bytes, "gradients": bytes, "optimizer (AdamW)": bytes, "activations":
    {kind: bytes}}; the kinds are `MemoryEstimate.weight_parts`' and
    `lowrank.activations.ACTIVATION_KINDS` (plus "other": what no kind describes, such as token
    ids). Gradients are read before the first optimizer step, the optimizer state after it.

    Examples:
        >>> config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2,
        ...           "vocab_size": 128, "n_positions": 64}
        >>> receipt = measure_receipt(config, seq_len=32)  # doctest: +SKIP
        >>> sorted(receipt)  # doctest: +SKIP
        ['activations', 'adapters', 'gradients', 'optimizer (AdamW)', 'peak', 'weights']
    """
    return _run(_case(**locals(), receipt=True))  # locals(): the arguments, as given


def _case(*, receipt: bool, **arguments) -> dict:
    """The measuring process's case, checked: what `main` reads from its argument."""
    check_choice("method", arguments["method"], METHODS)
    check_choice("device", arguments["device"], ("cpu", "cuda"))
    check_choice("dtype", arguments["dtype"], FLOAT_DTYPES)
    check_bool("dora", arguments["dora"])
    for name in ("batch_size", "seq_len", "r", "steps"):
        check_int(name, arguments[name])
    config = read_config(arguments.pop("config"))
    config_to_shape(config)  # an architecture lowrank knows, with sizes that fit together
    targets = arguments["targets"]
    if arguments["method"] == "full":
        if arguments["dora"]:
            raise ValueError(
                "dora=True needs method 'lora' or 'qlora': full fine-tuning has no adapter"
            )
        targets = None
    elif targets is None:
        targets = method_default_targets(arguments["method"], config.get("model_type"))
    if targets not in (None, ALL_LINEAR) and (isinstance(targets, str) or not targets):
        raise ValueError(f"targets must be layer names or {ALL_LINEAR!r}, got {targets!r}")
    return {**arguments, "config": config, "targets": targets, "receipt": receipt}


def _run(case: dict):
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
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """The measuring process: `python -m lowrank.torch.measure '<case as JSON>'` prints the
    rise in bytes, or with "receipt": true the receipt as JSON (the keys of the case are
    `measure_peak_memory`'s arguments, `config` a dict).

    Examples:
        >>> import json, subprocess, sys
        >>> config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2,
        ...           "vocab_size": 128, "n_positions": 64}
        >>> case = {"config": config, "method": "full", "batch_size": 1, "seq_len": 32, "r": 8,
        ...         "targets": None, "gradient_checkpointing": False, "steps": 2, "device": "cpu",
        ...         "dtype": "fp32", "dora": False, "receipt": False}
        >>> command = [sys.executable, "-m", "lowrank.torch.measure", json.dumps(case)]
        >>> done = subprocess.run(command, capture_output=True, text=True)  # doctest: +SKIP
        >>> int(done.stdout.splitlines()[-1]) > 0  # the rise in bytes  # doctest: +SKIP
        True
    """
    import transformers  # only the measuring process builds models: the caller stays light

    from lowrank.torch import add_lora
    from lowrank.torch.hf import all_linear_targets

    case = json.loads(sys.argv[1])
    config_dict, device = case["config"], torch.device(case["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device is visible to measure on (use device 'cpu')")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[case["dtype"]]
    decoder = MODEL_FAMILIES.get(config_dict["model_type"]) != "bert"
    torch.set_num_threads(1)

    def build(config: transformers.PretrainedConfig) -> torch.nn.Module:
        if decoder:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:  # the encoder alone, as the estimate counts it
            model = transformers.AutoModel.from_config(config, dtype=dtype, add_pooling_layer=False)
        model.to(device)
        if case["method"] != "full":
            targets = case["targets"]
            if targets in (ALL_LINEAR, [ALL_LINEAR]):
                targets = all_linear_targets(model)
            quant_type = "nf4" if case["method"] == "qlora" else None
            add_lora(model, targets, r=case["r"], alpha=16, quant_type=quant_type,
                     use_dora=case["dora"])  # fmt: skip
        if case["gradient_checkpointing"]:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        return model.train()

    def step(model, ids, optimizer, census=None) -> None:
        # only the loss is kept, as a training loop keeps it: the logits are freed at once
        with census if census is not None else contextlib.nullcontext():
            out = model(input_ids=ids, labels=ids) if decoder else model(input_ids=ids)
            loss = out.loss if decoder else out.last_hidden_state.pow(2).mean()
            del out
        loss.backward()
        if census is not None:
            census.gradients = _nbytes(p.grad for p in model.parameters() if p.grad is not None)
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
        census = _Census(model, case["seq_len"]) if case["receipt"] else None
        for index in range(case["steps"]):
            step(model, ids, optimizer, census if index == 0 else None)
    if peak.rise_bytes is None:
        sys.exit("peak memory is not measurable here: CPU needs Linux /proc (or use CUDA)")
    if not case["receipt"]:
        print(json.dumps(peak.rise_bytes))
        return
    states = (t for state in optimizer.state.values() for t in state.values())
    receipt = {
        "peak": peak.rise_bytes,
        "weights": _weight_kinds(model, case["dtype"]),
        "adapters": _nbytes(p for p in trainable(model)) if case["method"] != "full" else 0,
        "gradients": census.gradients,
        "optimizer (AdamW)": _nbytes(t for t in states if torch.is_tensor(t)),
        "activations": census.saved,
    }
    print(json.dumps(receipt))


def _nbytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _weight_kinds(model: torch.nn.Module, dtype: str) -> dict[str, int]:
    """The model's frozen or trained weights by kind (not the adapters), in bytes."""
    from lowrank.torch.lora import LoRALayer
    from lowrank.torch.model import is_conv1d
    from lowrank.torch.qlora import Linear4bit

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    adapters = {id(p) for m in model.modules() if isinstance(m, LoRALayer)
                for p in [*m.A.values(), *m.B.values()]}  # fmt: skip
    kinds: dict[str, dict[int, int]] = {}
    for module in model.modules():
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in tensors:
            if id(tensor) in adapters:
                continue
            if isinstance(module, Linear4bit):
                kind = "4-bit packed weights" if name == "weight_packed" else "absmax, double-quant"
                kind = "norms and biases" if name == "bias" else kind
            elif isinstance(module, torch.nn.Embedding) or module is output:
                kind = "embeddings and head"
            elif (isinstance(module, torch.nn.Linear) or is_conv1d(module)) and name == "weight":
                kind = f"linear weights ({dtype})"
            else:
                kind = "norms and biases"  # and buffers: rotary frequencies, position ids
            storage = tensor.untyped_storage()
            kinds.setdefault(kind, {})[storage.data_ptr()] = storage.nbytes()
    return {kind: sum(storages.values()) for kind, storages in kinds.items()}


class _Census:
    """Records, during one forward pass, every tensor autograd saves (each storage once, the
    model's own parameters and buffers left out) under the kind of the innermost module that
    saves it; with gradient checkpointing, each checkpointed block's input. A context manager."""

    def __init__(self, model: torch.nn.Module, seq_len: int) -> None:
        self.model, self.seq_len = model, seq_len
        self.names = {module: name for name, module in model.named_modules()}
        self.stack: list[torch.nn.Module] = []
        self.seen: dict[int, tuple[str, int]] = {}  # storage address -> (kind, bytes)
        self.gradients = 0

    @property
    def saved(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for kind, n_bytes in self.seen.values():
            kinds[kind] = kinds.get(kind, 0) + n_bytes
        return kinds

    def __enter__(self) -> "_Census":
        owned = [*self.model.parameters(), *self.model.buffers()]
        self.owned = {t.untyped_storage().data_ptr() for t in owned}
        self.handles = []
        for module in self.model.modules():
            self.handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._exit, always_call=True))
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.hooks.__exit__(*exc_info)
        for handle in self.handles:
            handle.remove()

    def _enter(self, module, args, kwargs) -> None:
        self.stack.append(module)
        if getattr(module, "gradient_checkpointing", False) and module.training:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if torch.is_tensor(hidden):
                self._record(hidden, "block inputs")

    def _exit(self, *args) -> None:
        self.stack.pop()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._record(tensor, self._kind(tensor))
        return tensor

    def _record(self, tensor: torch.Tensor, kind: str) -> None:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address not in self.owned and address not in self.seen:
            self.seen[address] = (kind, storage.nbytes())

    def _kind(self, tensor: torch.Tensor) -> str:
        """The `lowrank.activations.ACTIVATION_KINDS` kind of a saved tensor, or "other"."""
        from lowrank.torch.lora import LoRALayer
        from lowrank.torch.model import is_conv1d
        from lowrank.torch.qlora import Linear4bit

        module = self.stack[-1] if self.stack else self.model  # none: the loss, outside
        type_name = type(module).__name__
        if isinstance(module, LoRALayer):
            return "adapter inputs"
        if isinstance(module, torch.nn.Linear | Linear4bit) or is_conv1d(module):
            return "linear inputs"
        if isinstance(module, torch.nn.Dropout):
            return "dropout masks"
        if isinstance(module, torch.nn.LayerNorm) or type_name.endswith("RMSNorm"):
            return "norms"
        if "Attention" in type_name:
            square = tuple(tensor.shape[-2:]) == (self.seq_len, self.seq_len)
            return "attention scores" if square else "attention"
        if {"mlp", "intermediate"} & set(self.names.get(module, "").split(".")):
            return "MLP"
        if module is self.model:
            return "logits and loss"
        return "other"


if __name__ == "__main__":
    main()

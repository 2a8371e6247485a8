"""How much memory does fine-tuning this model need? An estimate from its config.json alone.

    >>> print(estimate_memory("Llama-2-7b/config.json", method="qlora", batch_size=1, seq_len=512))

Framework-free (no torch, no transformers, no weights): the config gives the shapes, and
`lowrank.accounting` turns shapes into bytes. The estimate adds up what sits in memory at the
peak of a training step:

- weights: every parameter in the storage dtype (fp32, bf16), or, for QLoRA, the blocks'
  linear weights in NF4 (4.5 bits per weight, 4.127 with double quantization; Dettmers et al.
  2023, arXiv:2305.14314, section 3) and the rest (embeddings, norms, biases) in `dtype`;
- adapters: LoRA's A and B in fp32 (Hu et al. 2021, arXiv:2106.09685);
- gradients: one per trainable number; optimizer state: AdamW's two fp32 moments per trainable
  number. Full fine-tuning pays these for every weight, LoRA only for the adapters;
- activations: what autograd keeps from the forward pass for the backward pass, proportional
  to batch_size * seq_len tokens. Per layer and token it is c_h * d_model + c_ff * d_ff numbers.
  The coefficients below were counted by recording every tensor autograd saves
  (torch.autograd.graph.saved_tensors_hooks) in transformers' PyTorch implementations with SDPA
  attention (which keeps no seq_len x seq_len score matrix). A frozen linear layer needs no copy
  of its input for the backward pass (only a trainable weight's gradient x^T dy does), which is
  why LoRA also saves fewer activations. A language model adds its logits and log-probabilities,
  tokens x vocab numbers each, often the largest single tensors of a step;
- working memory: the backward pass of one layer allocates about one layer's activations again
  (gradients of its inputs), and the gradient of the logits;
- with gradient checkpointing, only each block's input (d_model numbers per token) is kept, and
  one block at a time is recomputed during the backward pass.

Not counted: the CUDA context (~0.3-0.5 GB on a GPU), allocator fragmentation, the tokenizer and
data loader. The estimate is checked against measured peaks in tests/test_memory.py.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lowrank.accounting import (
    TransformerShape,
    format_bytes,
    lora_parameters,
    tensor_bytes,
)

METHODS = ("full", "lora", "qlora")
DTYPES = ("fp32", "bf16", "fp16")
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# model_type -> the attention projections the LoRA paper adapts (PEFT's table, for these types).
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "opt", "gptj"],
        ["q_proj", "v_proj"],
    ),
    "gpt2": ["c_attn"],  # GPT-2 fuses q, k and v into one Conv1D
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], ["query", "value"]),
    **dict.fromkeys(["gpt_neox", "falcon", "bloom"], ["query_key_value"]),
}

_LLAMA_LIKE = ("llama", "mistral", "qwen2")
_FAMILIES = {**dict.fromkeys(_LLAMA_LIKE, "llama"), "gpt2": "gpt2", "bert": "bert"}
_FAMILIES.update({"roberta": "bert", "xlm-roberta": "bert"})

# Saved activations per layer and token, in numbers: (c_h, c_ff) with the base trainable (full)
# and frozen (lora, qlora), plus numbers per token saved outside the blocks (embeddings, final
# norm), in units of d_model. Counted with saved_tensors_hooks (see the module doc).
_ACTIVATION_COEFFICIENTS = {
    # Llama: RMSNorm in fp32, rotary q and k, SwiGLU keeps gate, silu(gate), up, their product.
    "llama": {"full": (10, 4, 3), "frozen": (7, 3, 0)},
    # GPT-2: dropout masks, tanh-GELU keeps several intermediates of its d_ff input.
    "gpt2": {"full": (13, 5, 3), "frozen": (11, 4, 0)},
    # BERT: post-norm LayerNorms, GELU input and output.
    "bert": {"full": (13, 2, 3), "frozen": (11, 1, 0)},
}


def _read_config(config: dict | str | os.PathLike) -> dict:
    if isinstance(config, dict):
        return config
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face config at {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def config_to_shape(config: dict | str | os.PathLike) -> TransformerShape:
    """The TransformerShape of a Hugging Face config (dict, config.json, or model folder)."""
    config = _read_config(config)
    model_type = config.get("model_type")
    name = config.get("_name_or_path") or model_type or "model"
    if model_type in _LLAMA_LIKE:
        return TransformerShape(
            name,
            d_model=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            d_ff=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            n_kv_heads=config.get("num_key_value_heads"),
            gated_mlp=True,
            bias=bool(config.get("attention_bias", model_type == "qwen2")),
            norm="rmsnorm",
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    if model_type == "gpt2":
        return TransformerShape(
            name,
            d_model=config["n_embd"],
            n_layers=config["n_layer"],
            n_heads=config["n_head"],
            d_ff=config.get("n_inner"),
            vocab_size=config["vocab_size"],
            max_positions=config["n_positions"],
            tie_embeddings=bool(config.get("tie_word_embeddings", True)),
        )
    if model_type in ("bert", "roberta", "xlm-roberta"):
        return TransformerShape(
            name,
            d_model=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            d_ff=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            max_positions=config["max_position_embeddings"],
            n_token_types=config.get("type_vocab_size", 2),
        )
    raise ValueError(
        f"model_type {model_type!r} is not supported; supported: {sorted(_FAMILIES)} "
        "(Llama-style decoders, GPT-2, BERT-style encoders)"
    )


def hf_linear_shapes(config: dict | str | os.PathLike) -> dict[str, tuple[int, int]]:
    """The linear layers of one block under their Hugging Face names: name -> (out, in)."""
    config = _read_config(config)
    shape = config_to_shape(config)
    ours = shape.linear_shapes()
    family = _FAMILIES[config["model_type"]]
    if family == "llama":
        names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
        names |= {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        return {names[key]: value for key, value in ours.items()}
    d, ff = shape.d_model, shape.d_ff
    if family == "gpt2":  # q, k, v fused in one [3d, d] matrix
        return {"c_attn": (3 * d, d), "attn.c_proj": (d, d), "c_fc": (ff, d), "mlp.c_proj": (d, ff)}
    return {
        "query": (d, d),
        "key": (d, d),
        "value": (d, d),
        "attention.output.dense": (d, d),
        "intermediate.dense": (ff, d),
        "output.dense": (d, ff),
    }


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step's peak, by part; `str()` prints the table."""

    model: str
    method: str
    dtype: str
    batch_size: int
    seq_len: int
    r: int
    targets: tuple[str, ...]
    gradient_checkpointing: bool
    trainable_params: int
    total_params: int
    weights: int
    adapters: int
    gradients: int
    optimizer_states: int
    activations: int
    working: int  # the backward pass's temporaries

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.adapters
            + self.gradients
            + self.optimizer_states
            + self.activations
            + self.working
        )

    def fits(self, gpu_bytes: float) -> bool:
        """Whether the estimate fits in `gpu_bytes` (e.g. 12e9), leaving ~0.5 GB for the
        CUDA context and fragmentation."""
        return self.total + 0.5e9 <= gpu_bytes

    def __str__(self) -> str:
        adapted = "" if self.method == "full" else f", r={self.r} on {','.join(self.targets)}"
        checkpointing = ", gradient checkpointing" if self.gradient_checkpointing else ""
        weights = {"qlora": "NF4 linears + " + self.dtype}.get(self.method, self.dtype)
        lines = [
            f"{self.model}: {self.method}{adapted}, weights {weights}, batch {self.batch_size} "
            f"x {self.seq_len} tokens{checkpointing}",
            f"trainable parameters {self.trainable_params:,} of {self.total_params:,} "
            f"({self.trainable_params / self.total_params:.3%})",
        ]
        parts = {
            "weights": self.weights,
            "adapters": self.adapters,
            "gradients": self.gradients,
            "optimizer (AdamW)": self.optimizer_states,
            "activations": self.activations,
            "backward working": self.working,
        }
        for name, n_bytes in parts.items():
            lines.append(f"  {name:<18} {format_bytes(n_bytes):>24}")
        lines.append(f"  {'total':<18} {format_bytes(self.total):>24}")
        for gb in (8, 12, 16, 24, 48, 80):
            if self.fits(gb * 1e9):
                lines.append(
                    f"fits in {gb} GB of GPU memory (counting ~0.5 GB for the CUDA context)"
                )
                break
        else:
            lines.append("does not fit in 80 GB of GPU memory")
        return "\n".join(lines)


def estimate_memory(
    config: dict | str | os.PathLike,
    *,
    method: str = "lora",
    batch_size: int = 1,
    seq_len: int = 512,
    r: int = 8,
    targets: list[str] | None = None,
    gradient_checkpointing: bool = False,
    dtype: str = "bf16",
    double_quant: bool = True,
    lm_head: bool | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of one training step; see the module doc for each part.

    config: a Hugging Face config (dict, config.json path, or model folder).
    method: "full" (every weight trains), "lora" or "qlora" (adapters on `targets`; default:
        the architecture's query and value projections, `DEFAULT_TARGETS`; "all-linear" for
        every linear layer of the blocks). QLoRA stores the blocks' linear weights in NF4.
    dtype: storage of the weights that are not 4-bit, and of the activations.
    lm_head: count logits over the vocabulary (default: True for decoders, False for encoders).
    """
    _check_step(method, batch_size=batch_size, seq_len=seq_len, r=r)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    config = _read_config(config)
    shape = config_to_shape(config)
    family = _FAMILIES[config["model_type"]]
    per_layer = hf_linear_shapes(config)
    if targets is None or targets == "all-linear" or targets == ["all-linear"]:
        default = DEFAULT_TARGETS[config["model_type"]]
        targets = list(per_layer) if targets else default
    unknown = [t for t in targets if t not in per_layer]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; this architecture has {list(per_layer)}")
    n_params = shape.n_params()
    element = _BYTES[dtype]
    tokens = batch_size * seq_len

    if method == "full":
        trainable = n_params
        weights = n_params * element
        adapters = 0
        gradients = n_params * element
    else:
        trainable = lora_parameters([per_layer[t] for t in targets] * shape.n_layers, r)
        adapters = trainable * 4
        gradients = trainable * 4
        if method == "lora":
            weights = n_params * element
        else:
            linear = shape.param_groups()["linear weights"]
            quantized = shape.n_layers * sum(
                tensor_bytes(out * in_, "nf4", double_quant=double_quant)
                for out, in_ in shape.linear_shapes().values()
            )
            weights = quantized + (n_params - linear) * element
    optimizer_states = 2 * 4 * trainable

    c_h, c_ff, c_outside = _ACTIVATION_COEFFICIENTS[family][
        "full" if method == "full" else "frozen"
    ]
    layer_numbers = tokens * (c_h * shape.d_model + c_ff * shape.d_ff)
    outside_numbers = tokens * c_outside * shape.d_model
    if gradient_checkpointing:  # block inputs only, and one block recomputed at a time
        activations = (tokens * shape.d_model * shape.n_layers + outside_numbers) * element
    else:
        activations = (layer_numbers * shape.n_layers + outside_numbers) * element
    working = layer_numbers * element  # one block's recomputed activations or input gradients
    if lm_head if lm_head is not None else family != "bert":
        logits = tokens * shape.vocab_size * 4  # the loss is computed in fp32
        activations += 2 * logits  # logits and log-probabilities
        working += logits  # their gradient
    return MemoryEstimate(
        model=shape.name,
        method=method,
        dtype=dtype,
        batch_size=batch_size,
        seq_len=seq_len,
        r=r,
        targets=tuple(targets),
        gradient_checkpointing=gradient_checkpointing,
        trainable_params=trainable,
        total_params=n_params + (0 if method == "full" else trainable),
        weights=weights,
        adapters=adapters,
        gradients=gradients,
        optimizer_states=optimizer_states,
        activations=activations,
        working=working,
    )


def _check_step(method: str, **positive_ints: int) -> None:
    """The arguments `estimate_memory` and `measure_peak_memory` share: a known method and
    positive ints (batch_size, seq_len, r, ...)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, value in positive_ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


# --- measuring: the process's resident memory (Linux), used to check the estimate ----------


def _status_bytes(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"{field_name} not in /proc/self/status")


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux)."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """This process's peak resident memory since start or the last `reset_peak_rss` (Linux)."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Reset the peak (VmHWM) to the current resident memory (Linux >= 4.0: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


# Runs in a fresh Python process: builds the model from its config (random weights), trains
# `steps` AdamW steps on random tokens, prints the peak. On CPU the peak is the rise of resident
# memory (Linux VmHWM); MALLOC_MMAP_THRESHOLD_ (set by the caller) makes glibc return freed
# tensors to the OS at once, so resident memory follows what is allocated, and a warm-up step
# on a few tokens first loads code, tables and thread pools. On CUDA it is the caching
# allocator's own peak.
_PROBE = r"""
import gc, json, sys
import torch, transformers
from lowrank.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from lowrank.torch.lora import add_lora

case = json.loads(sys.argv[1])
cfg = case["config"]
decoder = cfg["model_type"] not in ("bert", "roberta", "xlm-roberta")
cuda = case["device"] == "cuda"
torch.set_num_threads(1)


def build(config):
    auto = transformers.AutoModelForCausalLM if decoder else transformers.AutoModel
    model = auto.from_config(config).to(case["device"])
    if case["method"] != "full":
        quant_type = "nf4" if case["method"] == "qlora" else None
        add_lora(model, case["targets"], r=case["r"], alpha=16, quant_type=quant_type)
    if case["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def step(model, ids, optimizer):
    out = model(input_ids=ids, labels=ids) if decoder else model(input_ids=ids)
    loss = out.loss if decoder else out.last_hidden_state.pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


torch.manual_seed(0)
ids = torch.randint(0, cfg["vocab_size"], (case["batch_size"], case["seq_len"]))
ids = ids.to(case["device"])
config = transformers.AutoConfig.for_model(**cfg)
warm = build(config)  # a warm-up step on a few tokens; its memory is returned before measuring
step(warm, ids[:1, :8], torch.optim.AdamW([p for p in warm.parameters() if p.requires_grad]))
del warm
gc.collect()
if cuda:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
else:
    reset_peak_rss()
    start = current_rss_bytes()
model = build(config)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
for _ in range(case["steps"]):
    step(model, ids, optimizer)
if cuda:
    torch.cuda.synchronize()
print(json.dumps((torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - start))
"""


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
    (needed for "lora"/"qlora"). On "cpu" (Linux) it reads the peak resident memory, on "cuda"
    the caching allocator's peak (`torch.cuda.max_memory_allocated`).
    """
    _check_step(method, batch_size=batch_size, seq_len=seq_len, r=r, steps=steps)
    if method != "full" and not targets:
        raise ValueError(f"method {method!r} needs targets (layer names for add_lora)")
    case = dict(
        config=_read_config(config),
        method=method,
        batch_size=batch_size,
        seq_len=seq_len,
        r=r,
        targets=targets,
        gradient_checkpointing=gradient_checkpointing,
        steps=steps,
        device=device,
    )
    root = str(Path(__file__).resolve().parents[1])  # so the child imports this lowrank
    pythonpath = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": pythonpath}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(case)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process failed:\n{done.stderr[-3000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1]))


__all__ = [
    "DEFAULT_TARGETS",
    "MemoryEstimate",
    "config_to_shape",
    "current_rss_bytes",
    "estimate_memory",
    "hf_linear_shapes",
    "measure_peak_memory",
    "peak_rss_bytes",
    "reset_peak_rss",
]

"""Rows: one fine-tuning step (forward, backward, AdamW) of a whole model, lowrank against
PEFT (LoRA) and PEFT over bitsandbytes' Linear4bit (QLoRA), time and peak memory.

On CPU the model is the demo's all-MiniLM-L6-v2 (real weights, `lowrank.torch.hf.minilm_path`,
offline), on CUDA also a ~1.1B-parameter Llama-shaped model (TinyLlama's shape, random weights
from a config). Adapters r = 16 on every linear layer (QLoRA's choice); for QLoRA those layers
are frozen in NF4 with double quantization on both sides. The loss is the mean square of the
last hidden states (MiniLM) or the language-model loss (Llama). Both sides start from the same
weights and factors; their first losses are compared before timing.
"""

import torch
from torch import nn

from benchmarks.common import Row, Settings, peer
from benchmarks.floors import copy_floor, count_flops, matmul_floor
from benchmarks.timing import race

R, ALPHA = 16, 32
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}


def _base_model(case: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    if case["model"] == "minilm":
        from lowrank.torch.hf import load_model, minilm_path

        return load_model(minilm_path(), dtype=dtype).to(device)
    config = transformers.LlamaConfig(**dict(LLAMA_1B, num_hidden_layers=case.get("layers", 22)))
    with torch.device(device):
        return transformers.LlamaForCausalLM(config).to(dtype)


def _targets(model: nn.Module) -> list[str]:
    from lowrank.torch.hf import all_linear_targets

    return [n for n in all_linear_targets(model) if "pooler" not in n]


def _same_factors(model: nn.Module, targets: list[str]) -> None:
    """Every adapter's A and B from a seed of its layer's name (B nonzero), whatever the
    library calls them: found by the layer's name in the parameter's and by shape."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            owner = max((t for t in targets if f".{t}." in f".{name}"), key=len, default=None)
            if owner is None:
                continue
            which = 0 if p.shape[0] == R else 1  # A [r, in], B [out, r]
            seed = sum(ord(c) * 31**i for i, c in enumerate(owner)) % 2**31 + which
            g = torch.Generator().manual_seed(seed)
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def build_step(case: dict, device: torch.device):
    """(step, model): one training step of case's contender, AdamW on the adapters."""
    from benchmarks.rows_lora import bnb_linear4bit
    from lowrank.torch import add_lora

    dtype = getattr(torch, case.get("dtype", "float32"))
    model = _base_model(case, device, dtype)
    targets = _targets(model)
    qlora = case["method"] == "qlora"
    if case["who"] == "lowrank":
        model = add_lora(model, targets, r=R, alpha=ALPHA, quant_type="nf4" if qlora else None)
    else:
        from peft import LoraConfig, get_peft_model

        if qlora:
            for name in targets:
                parent, _, child = name.rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                setattr(owner, child, bnb_linear4bit(getattr(owner, child), device, dtype))
        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets))
    _same_factors(model, targets)
    model.train()
    g = torch.Generator().manual_seed(3)
    vocab = 30000 if case["model"] == "minilm" else LLAMA_1B["vocab_size"]
    ids = torch.randint(0, vocab, (case["batch"], case["seq"]), generator=g).to(device)
    mask = torch.ones_like(ids)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def loss() -> torch.Tensor:
        if case["model"] == "minilm":
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            return out.float().pow(2).mean()
        return model(input_ids=ids, labels=ids).loss

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    def eval_loss() -> float:  # without dropout: comparable across contenders
        model.eval()
        with torch.no_grad():
            value = float(loss())
        model.train()
        return value

    step.loss = eval_loss  # type: ignore[attr-defined]
    return step, model


def step_rows(settings: Settings, dtype: torch.dtype, memory, model: str = "minilm") -> list[Row]:
    device = settings.device
    if model == "minilm":
        case = {
            "kind": "step",
            "model": "minilm",
            "batch": settings.size(16, 2),
            "seq": settings.size(128, 16),
        }
        hidden, label = 384, "MiniLM-L6"
    else:
        case = {
            "kind": "step",
            "model": "llama",
            "batch": settings.size(4, 1),
            "seq": settings.size(512, 32),
            "layers": settings.size(22, 2),
        }
        hidden, label = LLAMA_1B["hidden_size"], f"Llama-shaped {case['layers']} layers"
    rows = []
    for method, peer_name in (("lora", "PEFT"), ("qlora", "PEFT+bitsandbytes")):
        needs = ["peft"] + ["bitsandbytes"] * (method == "qlora")
        names = ["lowrank"] + [peer_name] * all(peer(m) for m in needs)
        who = {"lowrank": "lowrank", peer_name: "PEFT"}
        steps, losses, nets = {}, {}, {}
        for n in names:
            step, nets[n] = build_step(dict(case, method=method, who=who[n]), device)
            losses[n] = step.loss()
            steps[n] = step
        check = ", ".join(f"{n} first loss {v:.6g}" for n, v in losses.items())
        flops = count_flops(steps["lowrank"])
        tokens = case["batch"] * case["seq"]
        mm = matmul_floor(tokens, hidden, hidden, dtype, device)
        timed = dict(steps, matmul=mm)
        q_bytes = w_bytes = 0  # one decode of every 4-bit layer: read the 4-bit state, write W
        if method == "qlora":
            per_elem = torch.tensor([], dtype=dtype).element_size()
            for name, b in nets["lowrank"].named_buffers():
                if name.endswith("weight_packed"):
                    w_bytes += 2 * b.numel() * per_elem
                if name.rsplit(".", 1)[-1].startswith("weight_"):
                    q_bytes += b.numel() * b.element_size()
        del nets
        timed["copy"] = copy_floor(max(q_bytes, 8), max(w_bytes, 8), device)
        times = race(
            timed, repeats=settings.repeats, device=device, min_sample_s=settings.min_sample_s
        )
        rate = mm.flops / times.pop("matmul").median
        decode = times.pop("copy").median
        floor = flops / rate + (2 * decode if method == "qlora" else 0.0)
        # one fresh process per contender (on CPU)
        peaks = {n: memory([dict(case, method=method, who=who[n])])[0] for n in names}
        has_peer = len(names) > 1
        rows.append(
            Row(
                group="step",
                name=f"{method.upper()} step {label}, {case['batch']}x{case['seq']} tokens",
                times=times,
                floor_s=floor,
                floor_what=f"{flops / 1e9:.3g} GFLOP at {rate / 1e9:.3g} GFLOP/s"
                + (
                    f" + 2 decodes' bytes ({(q_bytes + w_bytes) / 2**20:.3g} MiB each) copied"
                    if method == "qlora"
                    else ""
                ),
                targets=[(peer_name, 1.0 if device.type == "cpu" else 1 / 1.5)]
                * (has_peer and method == "qlora"),
                memory=peaks,
                memory_targets=[(peer_name, 1.0)] * has_peer if method == "qlora" else [],
                check=check,
                profile_fn=steps["lowrank"],
            )
        )
        del timed
    return rows

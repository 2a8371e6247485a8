"""Checks for "What does fine-tuning change?", part 2: gradient checkpointing that still trains
LoRA, and gradient accumulation that still averages correctly.

Activation checkpointing: Chen et al. 2016, arXiv:1604.06174; LoRA: Hu et al. 2021,
arXiv:2106.09685.

Oracles: for checkpointing, the model's own forward (logits within 1e-5 in float32) and plain
autograd through it (gradients within 1e-4 relative), plus two facts that need no reference:
every LoRA B receives a non-zero gradient, and the encoder runs a second time during backward.
The model under test (a 2-layer random BERT with LoRA, built with lowrank.torch) is the
subject, not the oracle. For accumulation, one backward pass over the whole batch in float64
(1e-10). torch is imported inside the checks.

    check_accumulate_gradients(accumulate_gradients, student_id="ada@example.edu")  # or CheckFailed
"""

import math

from ._feedback import (
    as_number,
    call,
    check_callable,
    check_own_work,
    fail,
)
from .finetune import finetune_variant

__all__ = ["check_accumulate_gradients", "check_checkpointed_logits"]


def _tiny_classifier(seed: int):
    """A 2-layer random BERT (no dropout), mean-pool head, LoRA (r=2) on query and value with
    B made non-zero, base and embeddings frozen, head trainable: a frozen-base fine-tune."""
    import torch
    from transformers import BertConfig, BertModel

    from lowrank.torch import add_lora  # the model under test is built with the library
    from lowrank.torch.hf import MeanPoolClassifier
    from lowrank.torch.model import lora_layers

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = MeanPoolClassifier(BertModel(config, add_pooling_layer=False), num_labels=2)
    add_lora(model, ["query", "value"], r=2, alpha=4)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.B[layer.active_adapter].normal_(0, 0.5)  # as after some training
    model.head.requires_grad_(True)
    ids = torch.randint(1, 50, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = mask[3, 2:] = 0
    ids[mask == 0] = 0
    return model, ids, mask, torch.tensor([0, 1, 1, 0])


def check_checkpointed_logits(checkpointed_logits, *, student_id: str | None = None) -> None:
    """checkpointed_logits(model, input_ids, attention_mask) -> (batch, labels) logits of a
    MeanPoolClassifier whose encoder runs under reentrant activation checkpointing, with
    gradients reaching every LoRA factor.

    input_ids and attention_mask are (batch, tokens). Activation checkpointing (Chen et al.
    2016, arXiv:1604.06174) on a frozen base with LoRA adapters (Hu et al. 2021,
    arXiv:2106.09685): the logits must match the model's own forward, every LoRA B must get a
    gradient, and the encoder must run again during backward.

    Examples:
        >>> from torch.utils.checkpoint import checkpoint
        >>> def checkpointed_logits(model, input_ids, attention_mask):
        ...     embeds = model.encoder.get_input_embeddings()(input_ids)  # (batch, tokens, h)
        ...     embeds.requires_grad_(True)  # else reentrant checkpointing skips the encoder
        ...     def encode(embeds):
        ...         out = model.encoder(inputs_embeds=embeds, attention_mask=attention_mask)
        ...         return out.last_hidden_state
        ...     states = checkpoint(encode, embeds, use_reentrant=True)  # (batch, tokens, h)
        ...     mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (batch, tokens, 1)
        ...     pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)  # (batch, h)
        ...     return model.head(pooled)  # (batch, labels)
        >>> check_checkpointed_logits(checkpointed_logits, student_id="ada@example.edu")
        >>> check_checkpointed_logits(lambda model, input_ids, mask: model(input_ids, mask))
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_checkpointed_logits: the encoder was not
        checkpointed
          case:     a 2-layer BERT (hidden 16), LoRA r=2 on query/value, frozen base, trainable
                    head
          expected: layer 0 runs twice per step: in the forward pass, and again in backward
          got:      it ran 1 time(s)
          hint:     run the encoder inside torch.utils.checkpoint.checkpoint(fn, embeds,
                    use_reentrant=True): it keeps only the inputs and recomputes the rest in
                    backward
    """
    import torch
    import torch.nn.functional as F

    from lowrank.torch.model import lora_layers

    check = "check_checkpointed_logits"
    check_callable(check, checkpointed_logits)
    check_own_work(check, checkpointed_logits)
    seed = finetune_variant(student_id).seed
    with torch.random.fork_rng():  # the student's own random stream is left as it was
        model, ids, mask, labels = _tiny_classifier(seed)
    case = "a 2-layer BERT (hidden 16), LoRA r=2 on query/value, frozen base, trainable head"
    model.eval()
    with torch.no_grad():
        want = model(ids, mask)
        got = call(check, checkpointed_logits, model, ids, mask, case=case + ", eval mode")
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        fail(
            check,
            "wrong output",
            expected=f"logits {tuple(want.shape)}",
            got=getattr(got, "shape", type(got).__name__),
            hint="mean-pool the encoder's token states over the mask, then model.head",
            case=case,
        )
    if not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
        fail(
            check,
            "logits differ from the model's own forward",
            expected=want[0].tolist(),
            got=got[0].tolist(),
            hint="checkpointing changes memory, never values: pool the "
            "states of real tokens only (the mask), as MeanPoolClassifier does",
            case=case,
        )
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(ids, mask), labels).backward()
    reference = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    calls = []
    hook = model.encoder.encoder.layer[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        logits = call(check, checkpointed_logits, model, ids, mask, case=case + ", train mode")
        try:
            F.cross_entropy(logits, labels).backward()
        except RuntimeError as error:
            fail(
                check,
                f"loss.backward() failed: {error}",
                expected="a backward pass",
                got="nothing in the graph requires grad",
                hint="see the B hint: the checkpointed encoder's output must require grad",
                case=case,
            )
    finally:
        hook.remove()
    for name, layer in lora_layers(model):
        B = layer.B[layer.active_adapter]
        if B.grad is None or not torch.any(B.grad != 0):
            fail(
                check,
                f"{name}'s LoRA B got no gradient: B never moves",
                expected="a non-zero gradient for every lora B",
                got="None" if B.grad is None else "all zeros",
                hint="reentrant checkpointing (use_reentrant=True) only back-propagates into a "
                "segment if one of its tensor inputs requires grad; with the embeddings frozen "
                "none does, so autograd skips the whole encoder. Make the embedding output "
                "require grad (embeds.requires_grad_(True), what enable_input_require_grads does)",
                case=case,
            )
    if len(calls) != 2:
        fail(
            check,
            "the encoder was not checkpointed",
            expected="layer 0 runs twice per step: in the forward pass, and again in backward",
            got=f"it ran {len(calls)} time(s)",
            hint="run the encoder inside torch.utils.checkpoint.checkpoint(fn, embeds, "
            "use_reentrant=True): it keeps only the inputs and recomputes the rest in backward",
            case=case,
        )
    for n, p in params.items():
        if p.grad is None or not torch.allclose(p.grad, reference[n], rtol=1e-4, atol=1e-6):
            fail(
                check,
                f"the gradient of {n} differs from plain backprop",
                expected=reference[n].flatten()[:3].tolist(),
                got=None if p.grad is None else p.grad.flatten()[:3].tolist(),
                hint="checkpointing must give the same gradients as the plain forward",
                case=case,
            )


def _same(got: list, want: list, rtol: float) -> bool:
    """Two lists of gradients agree tensor by tensor."""
    import torch

    return all(torch.allclose(a, b, rtol=rtol, atol=1e-12) for a, b in zip(got, want, strict=True))


def check_accumulate_gradients(accumulate_gradients, *, student_id: str | None = None) -> None:
    """accumulate_gradients(model, examples, micro_batch_size, loss_fn, collate) adds to each
    parameter's .grad the gradient of the MEAN loss over all examples, working through them in
    micro-batches (the last may be shorter), and returns that mean loss as a float.

    loss_fn(model, batch) is a micro-batch's mean loss, collate(examples) makes the batch;
    checked on 11 examples in micro-batches of 4, 3 and 11 against one full-batch backward
    pass in float64.

    Examples:
        >>> def accumulate_gradients(model, examples, micro_batch_size, loss_fn, collate):
        ...     n, total = len(examples), 0.0
        ...     for start in range(0, n, micro_batch_size):
        ...         chunk = examples[start : start + micro_batch_size]
        ...         loss = loss_fn(model, collate(chunk)) * (len(chunk) / n)  # its share
        ...         loss.backward()  # adds into .grad
        ...         total += loss.item()
        ...     return total
        >>> check_accumulate_gradients(accumulate_gradients, student_id="ada@example.edu")
        >>> def mean_of_means(model, examples, micro_batch_size, loss_fn, collate):
        ...     starts = range(0, len(examples), micro_batch_size)
        ...     chunks = [examples[s : s + micro_batch_size] for s in starts]
        ...     losses = [loss_fn(model, collate(chunk)) / len(chunks) for chunk in chunks]
        ...     sum(losses).backward()
        ...     return sum(losses).item()
        >>> check_accumulate_gradients(mean_of_means)
        Traceback (most recent call last):
        ...
        lowrank.checks._feedback.CheckFailed: check_accumulate_gradients: the accumulated
        gradient is not the full batch's (float64, allowed 1e-10)
          case:     11 examples, micro_batch_size=4 (micro-batches of [4, 4, 3])
          expected: [...]
          got:      [...]
          hint:     a mean of micro-batch means: with a short last micro-batch its examples
                    weigh more than the others'. Scale each micro-batch's mean loss by
                    len(chunk) / n
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    check = "check_accumulate_gradients"
    check_callable(check, accumulate_gradients)
    check_own_work(check, accumulate_gradients)
    v = finetune_variant(student_id)
    g = torch.Generator().manual_seed(v.seed)
    model = nn.Linear(5, 3).double()
    xs = torch.randn(11, 5, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (11,), generator=g)
    examples = [(xs[k], int(ys[k])) for k in range(11)]

    def collate(batch):
        return {"x": torch.stack([x for x, _ in batch]), "y": torch.tensor([y for _, y in batch])}

    def loss_fn(net, batch):
        return F.cross_entropy(net(batch["x"]), batch["y"])

    def grads_of(losses):
        model.zero_grad(set_to_none=True)
        sum(losses).backward()
        return [p.grad.clone() for p in model.parameters()]

    full_loss = loss_fn(model, collate(examples))
    want = grads_of([full_loss])
    for micro in (4, 3, 11):
        chunks = [examples[s : s + micro] for s in range(0, 11, micro)]
        sizes = [len(c) for c in chunks]
        case = f"11 examples, micro_batch_size={micro} (micro-batches of {sizes})"
        model.zero_grad(set_to_none=True)
        loss = call(
            check, accumulate_gradients, model, examples, micro, loss_fn, collate, case=case
        )
        got = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        loss = as_number(
            check,
            loss.item() if isinstance(loss, torch.Tensor) else loss,
            "the returned loss",
            case=case,
        )
        if any(x is None for x in got):
            fail(
                check,
                "no gradient",
                expected="gradients in .grad",
                got="None",
                hint="call .backward() on each micro-batch's (scaled) loss",
                case=case,
            )
        if _same(got, want, 1e-10):
            if not math.isclose(loss, full_loss.item(), rel_tol=1e-9):
                fail(
                    check,
                    "wrong returned loss",
                    expected=f"{full_loss.item():.6f}",
                    got=f"{loss:.6f}",
                    hint="return the mean loss over all examples (a float)",
                    case=case,
                )
            continue
        hint = "weight each micro-batch's mean loss by its share of the examples: len(chunk) / n"
        suspects = [
            (
                lambda ms, sizes: [m / len(ms) for m in ms],
                "a mean of micro-batch means: with a short last micro-batch its examples weigh "
                "more than the others'. Scale each micro-batch's mean loss by len(chunk) / n",
            ),
            (
                lambda ms, sizes: [ms[-1] * sizes[-1] / sum(sizes)],
                "only the last micro-batch's gradient survived: do not zero the gradients inside "
                "the loop; accumulation means adding them up",
            ),
            (lambda ms, sizes: ms, "the micro-batch losses were added, not averaged: divide by n"),
        ]
        for combine, text in suspects:
            grads = grads_of(combine([loss_fn(model, collate(c)) for c in chunks], sizes))
            if _same(got, grads, 1e-8):
                hint = text
                break
        fail(
            check,
            "the accumulated gradient is not the full batch's (float64, allowed 1e-10)",
            expected=want[0].flatten()[:3].tolist(),
            got=got[0].flatten()[:3].tolist(),
            hint=hint,
            case=case,
        )

"""The gradients zeroed inside the accumulation loop: only the last micro-batch survives.

A training loop's zero_grad() moved into the micro-batch loop by habit; the weights then step
on a fraction of the batch.
"""

QUESTION = "q4"
MESSAGE = "only the last micro-batch's gradient survived"


def accumulate_gradients(model, examples, micro_batch_size, loss_fn, collate):
    n = len(examples)
    total = 0.0
    for start in range(0, n, micro_batch_size):
        chunk = examples[start : start + micro_batch_size]
        model.zero_grad()
        loss = loss_fn(model, collate(chunk)) * (len(chunk) / n)
        loss.backward()
        total += loss.item()
    return total

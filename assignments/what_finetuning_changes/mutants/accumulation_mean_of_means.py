"""A mean-of-means loss under gradient accumulation: each micro-batch's mean divided by the
number of micro-batches.

Right only when every micro-batch has the same size; with a short last micro-batch its
examples weigh more than the others', and the accumulated gradient is not the batch's.
"""

QUESTION = "q4"
MESSAGE = "a mean of micro-batch means"


def accumulate_gradients(model, examples, micro_batch_size, loss_fn, collate):
    chunks = [examples[s : s + micro_batch_size] for s in range(0, len(examples), micro_batch_size)]
    total = 0.0
    for chunk in chunks:
        loss = loss_fn(model, collate(chunk)) / len(chunks)
        loss.backward()
        total += loss.item()
    return total

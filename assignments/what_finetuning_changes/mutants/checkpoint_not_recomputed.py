"""No checkpointing at all: the plain forward pass returned as "checkpointed".

The logits and gradients are right, so only memory shows the difference: every activation of
every layer is kept for backward, which is what checkpointing was asked to avoid.
"""

QUESTION = "q3"
MESSAGE = "the encoder was not checkpointed"


def checkpointed_logits(model, input_ids, attention_mask):
    return model(input_ids, attention_mask)

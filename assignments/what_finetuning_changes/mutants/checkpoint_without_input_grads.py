"""Gradient checkpointing without input gradients: reentrant checkpointing of a frozen model.

Nothing entering the checkpointed encoder requires grad (the embeddings are frozen), so the
reentrant checkpoint returns an output outside the graph: the loss still falls (the head
trains) while every LoRA B stays exactly zero. B never moves.
"""

from torch.utils.checkpoint import checkpoint

QUESTION = "q3"
MESSAGE = "B never moves"


def checkpointed_logits(model, input_ids, attention_mask):
    embeds = model.encoder.get_input_embeddings()(input_ids)

    def encode(embeds):
        return model.encoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state

    states = checkpoint(encode, embeds, use_reentrant=True)
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
    return model.head(pooled)

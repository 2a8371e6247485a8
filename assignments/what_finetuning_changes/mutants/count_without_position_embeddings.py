"""The embeddings counted as the vocabulary table alone: position embeddings forgotten.

BERT learns one vector per position (max_position_embeddings of them), unlike models with
rotary or sinusoidal positions; leaving them out undercounts by 512 x h for MiniLM.
"""

QUESTION = "q1"
MESSAGE = "you left out the position embeddings"


def bert_parameter_count(config):
    h, i = config.hidden_size, config.intermediate_size
    embeddings = (config.vocab_size + config.type_vocab_size) * h + 2 * h
    attention = 4 * (h * h + h) + 2 * h
    feed_forward = (h * i + i) + (i * h + h) + 2 * h
    return embeddings + config.num_hidden_layers * (attention + feed_forward)

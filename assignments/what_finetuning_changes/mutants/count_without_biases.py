"""Parameters counted as weight matrices only: the linear layers' biases forgotten.

h * h per projection is the part everyone remembers; the h (or i) biases next to each matrix
are small, but they are parameters, and a count that misses them is not the model's.
"""

QUESTION = "q1"
MESSAGE = "you left out the biases of the linear layers"


def bert_parameter_count(config):
    h, i = config.hidden_size, config.intermediate_size
    embeddings = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * h
    embeddings += 2 * h
    attention = 4 * h * h + 2 * h
    feed_forward = 2 * h * i + 2 * h
    return embeddings + config.num_hidden_layers * (attention + feed_forward)

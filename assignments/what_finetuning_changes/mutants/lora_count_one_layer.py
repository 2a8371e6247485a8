"""LoRA's trainable count for one layer only: the per-layer sum never multiplied by the depth.

"r (in + out) per target" is right per layer; every one of the num_hidden_layers blocks has its
own adapters, so the count is num_hidden_layers times larger.
"""

QUESTION = "q2"
MESSAGE = "that is one layer's count"


def lora_parameter_count(config, r, targets):
    h, i = config.hidden_size, config.intermediate_size
    shapes = {"intermediate.dense": (i, h), "output.dense": (h, i)}  # the rest are h -> h
    return sum(r * sum(shapes.get(t, (h, h))) for t in targets)

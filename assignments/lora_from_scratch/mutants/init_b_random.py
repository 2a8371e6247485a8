"""B not zero at start: both factors drawn at random.

A new adapter then changes the pre-trained model's outputs before any training (the update
B A is a random rank-r matrix), which is exactly what LoRA's zero B avoids.
"""

import math

QUESTION = "q3"
MESSAGE = "B is not zero at start"


def init_lora(in_features, out_features, r, rng):
    bound = 1 / math.sqrt(in_features)
    A = rng.uniform(-bound, bound, size=(r, in_features))
    B = rng.uniform(-bound, bound, size=(out_features, r))
    return A, B

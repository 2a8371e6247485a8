"""The budget without the second level: 4 + 8 / blocksize, forgetting absmax2 and the offset.

Double quantization stores each block's scale in 8 bits, but those codes need their own float32
scales and an offset: 4.125 instead of QLoRA's 4.127 bits per weight.
"""

QUESTION = "q5"
MESSAGE = "leaves out the second level"


def bits_per_weight(n, blocksize=64, double_quant=True):
    return 4 + (8 if double_quant else 32) / blocksize

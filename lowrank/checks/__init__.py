"""Feedback for students: checks that take a student's implementation and say, in plain words,
what is wrong with it. They are the hidden (and public) tests of the classroom assignments in
`assignments/` (docs/instructors.md), and anyone can call them on their own code:

    from lowrank import checks
    checks.check_lora_backward(my_backward, student_id="ada@example.edu")   # silent when right

A check returns None when the function is right and raises `CheckFailed` (an AssertionError)
when it is not, with what it checked, what it expected, what came back, and a hint that names
the usual mistake: the wrong shape, alpha instead of alpha / r, B not zero at start, a gradient
off by a transpose, ties broken the wrong way, nibbles in the wrong order, per-tensor instead
of per-block absmax, double quantization applied twice, a merge done in low precision, reentrant
checkpointing that leaves B without a gradient, a mean of micro-batch means. A wrong-typed
argument to a check itself (not a function, a student id that is not a str) is a TypeError.

Each check compares with an independent value (finite differences, hand-derived formulas,
bitsandbytes, transformers building the model) and never with lowrank's own implementation;
a graded function that calls lowrank, bitsandbytes (or, for counting questions, torch and
transformers) is refused. `student_id` seeds the sizes and data (None: the public variant), so
hidden tests differ from student to student.

- LoRA from scratch (NumPy): `lora` (scale, forward, init), `lora_backward` (backward, merge)
  and `gradcheck`
  (the student's numerical gradient and relative error).
- NF4 by hand: `nf4` (levels; the variant and the test tensors), `nf4_blockwise` (codes) and
  `nf4_storage` (nibble packing, double quantization, bits per weight). Oracle: bitsandbytes.
- What does fine-tuning change?: `finetune` (the variant; parameter and memory counts),
  `training` (checkpointing, gradient accumulation) and `spectra` (energy rank, subspace
  similarity). torch and transformers are imported only inside these checks.

Papers: Hu et al. 2021, arXiv:2106.09685 (LoRA); Dettmers et al. 2023, arXiv:2305.14314 (QLoRA);
Kalajdzievski 2023, arXiv:2312.03732 (rsLoRA).
"""

from ._feedback import CheckFailed, is_implemented
from .finetune import (
    FinetuneVariant,
    check_bert_parameter_count,
    check_lora_count_answer,
    check_lora_parameter_count,
    check_training_memory,
    finetune_variant,
)
from .gradcheck import check_numerical_gradient, check_relative_error
from .lora import LoRAVariant, check_lora_forward, check_lora_init, check_lora_scale, lora_variant
from .lora_backward import check_lora_backward, check_merge, check_trainable_answer
from .nf4 import (
    NF4Variant,
    check_nf4_levels,
    dynamic_map_table,
    nf4_table,
    nf4_variant,
)
from .nf4_blockwise import check_quantize_blockwise
from .nf4_storage import (
    check_bits_answer,
    check_bits_per_weight,
    check_double_quantize,
    check_pack_nibbles,
)
from .spectra import check_energy_rank, check_subspace_similarity
from .training import check_accumulate_gradients, check_checkpointed_logits

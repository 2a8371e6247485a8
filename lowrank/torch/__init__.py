"""lowrank.torch: LoRA and QLoRA as PyTorch modules, on CPU and CUDA."""

from .adapters import (
    combine_adapters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    load_adapter,
    lora_state_dict,
    save_adapter,
    set_active_adapter,
)
from .analysis import (
    best_rank_r,
    effective_rank,
    energy_captured,
    energy_rank,
    singular_values,
    stable_rank,
    subspace_similarity,
    subspace_similarity_grid,
)
from .hf import (
    all_linear_targets,
    default_targets,
    finetune,
    load_model,
    load_tokenizer,
    minilm_path,
    prepare_for_kbit_training,
)
from .lora import (
    LoRAConv1D,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    add_lora,
    count_parameters,
    lora_layers,
    mark_only_lora_trainable,
    merge_lora,
    merged_copy,
    unmerge_lora,
)
from .qlora import Linear4bit
from .quant import (
    Quantized4bit,
    dequantize_4bit,
    dynamic_map,
    fp4_code,
    from_bnb_state_dict,
    int4_code,
    nf4_code,
    quantize_4bit,
    to_bnb_state_dict,
)
from .train import (
    TrainConfig,
    TrainResult,
    cosine_with_warmup,
    load_trainable,
    save_trainable,
    seed_everything,
    train,
)

"""lowrank.torch: LoRA and QLoRA as PyTorch modules, on CPU and CUDA."""

from .adapter_files import read_adapter
from .adapter_report import inspect_adapter
from .adapters import (
    combine_adapters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    set_active_adapter,
)
from .agreement import TorchMLP, numpy_torch_agreement
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
from .bnb_format import from_bnb_state_dict, to_bnb_state_dict
from .checkpoint import load_trainable, save_trainable
from .codebooks import dynamic_map, fp4_code, int4_code, nf4_code
from .conv import LoRAConv
from .convert import convert_adapter
from .distributed import is_main_process, set_quant_storage, trainable_state
from .dora import DoRALinear
from .extract import extract_adapter
from .factored import factored_best_rank_r, factored_core, factored_svd
from .hf import (
    MeanPoolClassifier,
    accuracy,
    all_linear_targets,
    classification_loss,
    collate_token_ids,
    default_targets,
    load_model,
    load_tokenizer,
    logits,
    minilm_path,
    prepare_for_kbit_training,
    tokenize_examples,
)
from .loftq import loftq_init
from .lora import LoRAConv1D, LoRAEmbedding, LoRALayer, LoRALinear
from .merge_audit import merge_audit
from .model import (
    add_lora,
    count_parameters,
    lora_layers,
    mark_only_lora_trainable,
    merge_lora,
    merged_copy,
    unmerge_lora,
)
from .modules_to_save import ModulesToSaveWrapper
from .peft_format import adapter_config, lora_state_dict, save_adapter
from .peft_load import load_adapter
from .pissa import olora_init, pissa_init, plain_lora_copy
from .qlora import Linear4bit
from .quant import dequantize_4bit, quantize_4bit
from .quantized import Quantized4bit
from .resize import resize_adapter
from .train import TrainConfig, TrainResult, cosine_with_warmup, seed_everything, train

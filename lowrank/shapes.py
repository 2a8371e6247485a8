"""What a transformer is, in the sizes that decide its parameter count and its LoRA targets.

Framework-free (no numpy, no torch): `TransformerShape` describes one decoder or encoder stack,
the presets are the models the LoRA paper (Hu et al. 2021, arXiv:2106.09685) and the QLoRA paper
(Dettmers et al. 2023, arXiv:2305.14314) report on, and `config_to_shape` reads the same sizes
from a Hugging Face config.json, so nothing needs downloading or building.

Names. `TransformerShape.linear_shapes()` calls one block's linear layers q, k, v, o (the
paper's W_q, W_k, W_v, W_o), gate, up and down, or qkv where the model fuses the three
attention projections in one matrix (GPT-2's c_attn). `HF_LINEAR_NAMES` maps each family's
Hugging Face layer names onto these keys; `DEFAULT_TARGETS` holds the layers PEFT adapts by
default, the LoRA paper's W_q and W_v; `method_default_targets` is the one default that
`lowrank estimate` and `lowrank finetune` share (LoRA: `DEFAULT_TARGETS`; QLoRA: `ALL_LINEAR`,
every linear layer of the blocks, the QLoRA paper's recipe); `MODEL_FAMILIES` maps each Hugging
Face `model_type` that `config_to_shape` reads onto its family ("llama", "gpt2", "bert").

Presets: `GPT3_175B`, `ROBERTA_BASE`, `ROBERTA_LARGE`, `LLAMA_7B` and `LLAMA_65B`.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lowrank._validate import METHODS, check_choice, check_int

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_TARGETS",
    "GPT3_175B",
    "HF_LINEAR_NAMES",
    "LLAMA_7B",
    "LLAMA_65B",
    "MODEL_FAMILIES",
    "ROBERTA_BASE",
    "ROBERTA_LARGE",
    "TransformerShape",
    "config_to_shape",
    "hf_linear_shapes",
    "method_default_targets",
    "read_config",
]


@dataclass(frozen=True)
class TransformerShape:
    """The sizes that decide a decoder or encoder transformer's parameter count.

    Each of the n_layers blocks holds attention projections q, k, v, o (q, k, v fused in one
    qkv matrix when fused_qkv) and an MLP (up/down, or Llama's gate/up/down when gated_mlp),
    plus two norms. Outside the blocks: token embeddings, learned position and token-type
    embeddings if any, one more norm (GPT and Llama's final norm, BERT's embedding norm) and an
    output head unless it is tied to the token embeddings.
    d_ff and n_kv_heads are filled in when left as None, so `shape.d_ff` is always the width
    (and `dataclasses.replace(shape, d_model=...)` keeps the old d_ff: pass both).

    Examples:
        >>> from lowrank.shapes import LLAMA_7B, TransformerShape
        >>> tiny = TransformerShape("tiny", d_model=64, n_layers=2, n_heads=4, vocab_size=100)
        >>> tiny.d_ff, tiny.head_dim  # d_ff defaults to 4 * d_model
        (256, 16)
        >>> tiny.param_groups()
        {'linear weights': 98304, 'linear biases': 1152, 'norms': 640, 'embeddings': 6400,
         'output head': 0}
        >>> tiny.n_params()
        106496
        >>> f"{LLAMA_7B.n_params():,}"
        '6,738,415,616'
    """

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int | None = None  # MLP width; None means 4 * d_model
    vocab_size: int = 0
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads (multi-head)
    gated_mlp: bool = False  # Llama: down(silu(gate(x)) * up(x))
    bias: bool = True  # linear layers carry biases (GPT, BERT) or not (Llama)
    norm: str = "layernorm"  # "layernorm" (weight and bias) or "rmsnorm" (weight only)
    max_positions: int = 0  # learned position embeddings (GPT, BERT); 0 for rotary (Llama)
    n_token_types: int = 0  # BERT's segment embeddings
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    fused_qkv: bool = False  # GPT-2: q, k and v are one matrix (c_attn), adapted as one

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads"):
            check_int(name, getattr(self, name), low=1)
        # fill in the defaults that depend on other fields (frozen, hence object.__setattr__)
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("d_ff", "n_kv_heads"):
            check_int(name, getattr(self, name), low=1)
        for name in ("vocab_size", "max_positions", "n_token_types"):
            check_int(name, getattr(self, name), low=0)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """The linear layers of ONE block: name -> (out, in), the shape of the weight W.

        q, k, v, o are the paper's W_q, W_k, W_v, W_o; up and down the MLP (plus gate if gated).
        With grouped-query attention k and v map d_model to n_kv_heads * head_dim. A fused qkv
        stacks the rows of q, k and v: (d_model + 2 * n_kv_heads * head_dim, d_model).

        Examples:
            >>> from lowrank.shapes import LLAMA_7B
            >>> LLAMA_7B.linear_shapes()
            {'q': (4096, 4096), 'k': (4096, 4096), 'v': (4096, 4096), 'o': (4096, 4096),
             'gate': (11008, 4096), 'up': (11008, 4096), 'down': (4096, 11008)}
        """
        d, kv, ff = self.d_model, self.n_kv_heads * self.head_dim, self.d_ff
        if self.fused_qkv:
            shapes = {"qkv": (d + 2 * kv, d), "o": (d, d)}
        else:
            shapes = {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d)}
        if self.gated_mlp:
            shapes["gate"] = (ff, d)
        shapes["up"] = (ff, d)
        shapes["down"] = (d, ff)
        return shapes

    def param_groups(self) -> dict[str, int]:
        """Where the parameters live, by kind; the values sum to n_params()."""
        linears = self.linear_shapes().values()
        norm_size = 2 * self.d_model if self.norm == "layernorm" else self.d_model
        embedding_rows = self.vocab_size + self.max_positions + self.n_token_types
        return {
            "linear weights": self.n_layers * sum(out * in_ for out, in_ in linears),
            "linear biases": self.n_layers * sum(out for out, _ in linears) if self.bias else 0,
            "norms": (2 * self.n_layers + 1) * norm_size,
            "embeddings": embedding_rows * self.d_model,
            "output head": 0 if self.tie_embeddings else self.vocab_size * self.d_model,
        }

    def n_params(self) -> int:
        """Every parameter of the model: blocks, embeddings, norms and an untied output head.

        Matches Hugging Face's base models (BertModel without its pooler) and causal-LM models
        (GPT2LMHeadModel, LlamaForCausalLM); task heads and poolers are not counted.
        """
        return sum(self.param_groups().values())


# Presets. Sources: GPT-3 (Brown et al. 2020, arXiv:2005.14165, Table 2.1: d_model 12288,
# 96 layers, 96 heads, d_ff = 4 d_model, context 2048, GPT-2's 50257-token vocabulary; kept
# unfused, since the LoRA paper adapts W_q and W_v one by one);
# RoBERTa (Liu et al. 2019, arXiv:1907.11692, and Hugging Face's roberta-base/large configs:
# vocab 50265, 514 positions, 1 token type); LLaMA (Touvron et al. 2023, arXiv:2302.13971,
# Table 2, and Hugging Face's LlamaConfig: vocab 32000, SwiGLU MLP, RMSNorm, untied head).
GPT3_175B = TransformerShape(
    "GPT-3 175B", d_model=12288, n_layers=96, n_heads=96, vocab_size=50257, max_positions=2048
)
ROBERTA_BASE = TransformerShape(
    "RoBERTa-base", d_model=768, n_layers=12, n_heads=12, vocab_size=50265, max_positions=514,
    n_token_types=1,
)  # fmt: skip
ROBERTA_LARGE = TransformerShape(
    "RoBERTa-large", d_model=1024, n_layers=24, n_heads=16, vocab_size=50265, max_positions=514,
    n_token_types=1,
)  # fmt: skip
_LLAMA = dict(vocab_size=32000, gated_mlp=True, bias=False, norm="rmsnorm", tie_embeddings=False)
LLAMA_7B = TransformerShape("LLaMA-7B", d_model=4096, n_layers=32, n_heads=32, d_ff=11008, **_LLAMA)
LLAMA_65B = TransformerShape(
    "LLaMA-65B", d_model=8192, n_layers=80, n_heads=64, d_ff=22016, **_LLAMA
)


# --- Hugging Face configs ---------------------------------------------------------------------

# model_type -> the attention projections the LoRA paper adapts (PEFT's table, for these types).
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "opt", "gptj"],
        ["q_proj", "v_proj"],
    ),
    "gpt2": ["c_attn"],  # GPT-2 fuses q, k and v into one Conv1D
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], ["query", "value"]),
    **dict.fromkeys(["gpt_neox", "falcon", "bloom"], ["query_key_value"]),
}

# Every linear layer of the blocks (not the embeddings, not the output or classification head).
ALL_LINEAR = "all-linear"


def method_default_targets(method: str, model_type: str) -> list[str] | str:
    """The layers `method` adapts when none are named, shared by `lowrank estimate` and
    `lowrank finetune`: "qlora" every linear layer (`ALL_LINEAR`; the QLoRA paper, Dettmers et
    al. 2023, arXiv:2305.14314, section 4, finds adapters on all of them necessary to match
    16-bit fine-tuning), "lora" the query and value projections (`DEFAULT_TARGETS`, the LoRA
    paper's W_q and W_v, Hu et al. 2021, arXiv:2106.09685, section 7.1), "full" none ([]).

    Raises ValueError for "lora" on a `model_type` without a known default.

    Examples:
        >>> from lowrank.shapes import method_default_targets
        >>> method_default_targets("qlora", "llama"), method_default_targets("lora", "llama")
        ('all-linear', ['q_proj', 'v_proj'])
        >>> method_default_targets("lora", "t5")
        Traceback (most recent call last):
        ...
        ValueError: no default LoRA targets for model_type 't5' (known: bert, ...); name the ...
    """
    check_choice("method", method, METHODS)
    if method == "full":
        return []
    if method == "qlora":
        return ALL_LINEAR
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"no default LoRA targets for model_type {model_type!r} (known: "
            f"{', '.join(sorted(DEFAULT_TARGETS))}); name the targets or use {ALL_LINEAR}"
        )
    return list(DEFAULT_TARGETS[model_type])


# model_type -> family, for the model types `config_to_shape` reads.
MODEL_FAMILIES: dict[str, str] = {
    **dict.fromkeys(["llama", "mistral", "qwen2"], "llama"),
    "gpt2": "gpt2",
    **dict.fromkeys(["bert", "roberta", "xlm-roberta"], "bert"),
}

# family -> {Hugging Face layer name in a block: its key in TransformerShape.linear_shapes()}.
# GPT-2 names c_proj twice, so its two are told apart by their parent (attn, mlp).
HF_LINEAR_NAMES: dict[str, dict[str, str]] = {
    "llama": {
        "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
        "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    },
    "gpt2": {"c_attn": "qkv", "attn.c_proj": "o", "c_fc": "up", "mlp.c_proj": "down"},
    "bert": {
        "query": "q", "key": "k", "value": "v", "attention.output.dense": "o",
        "intermediate.dense": "up", "output.dense": "down",
    },
}  # fmt: skip


def read_config(config: dict | str | os.PathLike) -> dict:
    """A Hugging Face config as a dict: given as one, as a config.json path, or a model folder.

    Raises FileNotFoundError when the path holds no config.json.

    Examples:
        >>> from lowrank.shapes import read_config
        >>> read_config({"model_type": "gpt2"})  # a dict is returned as it is
        {'model_type': 'gpt2'}
        >>> read_config("no/such/model")
        Traceback (most recent call last):
            ...
        FileNotFoundError: no Hugging Face config at no/such/model
    """
    if isinstance(config, dict):
        return config
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face config at {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def config_to_shape(config: dict | str | os.PathLike) -> TransformerShape:
    """The TransformerShape of a Hugging Face config (dict, config.json, or model folder).

    Reads Llama-style decoders (llama, mistral, qwen2), GPT-2 and BERT-style encoders (bert,
    roberta, xlm-roberta); any other `model_type` is a ValueError naming the supported ones.

    Examples:
        >>> from lowrank.shapes import config_to_shape
        >>> gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
        ...         "vocab_size": 50257, "n_positions": 1024}
        >>> shape = config_to_shape(gpt2)
        >>> shape.fused_qkv, shape.d_ff, f"{shape.n_params():,}"  # GPT-2 small, "124M"
        (True, 3072, '124,439,808')
    """
    config = read_config(config)
    model_type = config.get("model_type")
    name = config.get("_name_or_path") or model_type or "model"
    family = MODEL_FAMILIES.get(model_type)
    if family == "llama":
        return TransformerShape(
            name,
            d_model=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            d_ff=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            n_kv_heads=config.get("num_key_value_heads"),
            gated_mlp=True,
            bias=bool(config.get("attention_bias", model_type == "qwen2")),
            norm="rmsnorm",
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    if family == "gpt2":
        return TransformerShape(
            name,
            d_model=config["n_embd"],
            n_layers=config["n_layer"],
            n_heads=config["n_head"],
            d_ff=config.get("n_inner"),
            vocab_size=config["vocab_size"],
            max_positions=config["n_positions"],
            tie_embeddings=bool(config.get("tie_word_embeddings", True)),
            fused_qkv=True,
        )
    if family == "bert":
        return TransformerShape(
            name,
            d_model=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            d_ff=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            max_positions=config["max_position_embeddings"],
            n_token_types=config.get("type_vocab_size", 2),
        )
    raise ValueError(
        f"model_type {model_type!r} is not supported; supported: {sorted(MODEL_FAMILIES)} "
        "(Llama-style decoders, GPT-2, BERT-style encoders)"
    )


def hf_linear_shapes(config: dict | str | os.PathLike) -> dict[str, tuple[int, int]]:
    """The linear layers of one block under their Hugging Face names: name -> (out, in).

    Examples:
        >>> from lowrank.shapes import hf_linear_shapes
        >>> gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
        ...         "vocab_size": 50257, "n_positions": 1024}
        >>> hf_linear_shapes(gpt2)
        {'c_attn': (2304, 768), 'attn.c_proj': (768, 768), 'c_fc': (3072, 768),
         'mlp.c_proj': (768, 3072)}
    """
    config = read_config(config)
    ours = config_to_shape(config).linear_shapes()
    names = HF_LINEAR_NAMES[MODEL_FAMILIES[config["model_type"]]]
    return {hf_name: ours[key] for hf_name, key in names.items()}

"""Small models the torch tests share (imported by name: conftest.py puts tests/ on sys.path)."""

import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from lowrank.torch import add_lora, lora_layers


class Block(nn.Module):
    """A toy transformer-ish block: every kind of layer add_lora can wrap."""

    def __init__(self, dim: int = 8, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.c_fc = Conv1D(2 * dim, dim)  # GPT-2 style: weight (in, out) = (dim, 2 dim)
        self.out = nn.Linear(2 * dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (batch, seq, dim)
        h = torch.tanh(self.q_proj(h) + self.v_proj(h))
        return self.out(torch.relu(self.c_fc(h)))  # (batch, seq, 3)


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """Give every adapter nonzero A and B (fresh adapters have B = 0 or A = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.A:
                layer.A[name].copy_(torch.randn(layer.A[name].shape, generator=generator))
                layer.B[name].copy_(torch.randn(layer.B[name].shape, generator=generator) * 0.1)


def make_block(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    return Block()


ALL = ["embed", "q_proj", "v_proj", "c_fc"]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Embedding(13, 8), nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6), nn.Linear(6, 4)
    ).double()


def randomize(model: nn.Module, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.A:
                layer.A[name].copy_(torch.randn(layer.A[name].shape, generator=generator))
                layer.B[name].copy_(torch.randn(layer.B[name].shape, generator=generator))


def two_adapters() -> nn.Module:
    model = add_lora(make_model(), ["0", "1", "3"], r=2, alpha=3)
    add_lora(model, ["1", "3", "4"], r=3, alpha=5, use_rslora=True, adapter_name="b")
    randomize(model, "default", 1)
    randomize(model, "b", 2)
    return model


IDS = torch.tensor([[1, 4, 7], [12, 0, 3]])


def state(model: nn.Module) -> dict:
    """Everything a failed call must not change: module types, tensors, flags."""
    return {
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "tensors": {n: t.detach().clone() for n, t in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "active": [(n, layer.active_adapter) for n, layer in lora_layers(model)],
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert after["types"] == before["types"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][name], tensor), name
    assert after["grad"] == before["grad"] and after["active"] == before["active"]


TINY_VOCAB = 40  # the tiny Hugging Face models' vocabulary


def tiny_llama() -> LlamaForCausalLM:
    """A random 2-layer Llama, hidden 16 (PEFT interop tests)."""
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=TINY_VOCAB,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )


def tiny_bert() -> BertModel:
    """A random 2-layer BERT encoder, hidden 16 (PEFT interop tests)."""
    return BertModel(
        BertConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=TINY_VOCAB,
            max_position_embeddings=16,
            pad_token_id=0,
        )
    )

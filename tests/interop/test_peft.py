"""lowrank's adapters and Hugging Face PEFT, both directions, on tiny random HF models.

GPT-2 (Conv1D layers, fan_in_fan_out; tied wte), Llama (separate q/v projections) and BERT,
built from configs with random weights (no downloads). An adapter saved by lowrank must load
in PEFT (`PeftModel.from_pretrained`) and give the same outputs, and a PEFT-saved adapter must
load in lowrank and give the same outputs, with non-default alpha, rsLoRA and per-layer
rank/alpha patterns, and a classifier whose head trains in full (modules_to_save). Tolerance:
both compute base(x) + (x A^T B^T) * scale with the same ops, so outputs agree to float32
rounding (in practice bit for bit); we allow 1e-6.
"""

import copy
import dataclasses

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from toy_models import TINY_VOCAB, tiny_bert, tiny_llama
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from lowrank.torch import (
    add_lora,
    count_parameters,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)

VOCAB = TINY_VOCAB


def gpt2():
    return GPT2LMHeadModel(
        GPT2Config(
            n_embd=16,
            n_layer=2,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


# (model, targets, use_rslora, rank_pattern, alpha_pattern), all with a non-default alpha
CASES = {
    "gpt2": (gpt2, ["c_attn", "c_fc", "wte"], True, {"h.1.attn.c_attn": 2}, {"h.0.mlp.c_fc": 3}),
    "llama": (
        tiny_llama,
        ["q_proj", "v_proj", "embed_tokens"],
        False,
        {"0.self_attn.v_proj": 2},
        {},
    ),
    "bert": (
        tiny_bert,
        ["query", "value", "output.dense"],
        True,
        {},
        {"1.attention.self.value": 9},
    ),
}
IDS = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def output(model) -> torch.Tensor:
    out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def base_model(kind: str):
    torch.manual_seed(0)
    return CASES[kind][0]().eval()


def randomize(parameters, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_lowrank_adapter_loads_in_peft(kind, tmp_path):
    _, targets, use_rslora, rank_pattern, alpha_pattern = CASES[kind]
    base = base_model(kind)
    ours = add_lora(
        copy.deepcopy(base),
        targets,
        r=4,
        alpha=7,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    randomize([p for p in ours.parameters() if p.requires_grad], seed=1)
    save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(output(theirs), output(ours), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(output(base), output(ours))  # the adapter does something
    config = dataclasses.replace(theirs.peft_config["default"], inference_mode=False)
    trainable_theirs = get_peft_model(copy.deepcopy(base), config)
    assert count_parameters(ours)[0] == trainable_theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("kind", sorted(CASES))
def test_peft_adapter_loads_in_lowrank(kind, tmp_path):
    _, targets, use_rslora, rank_pattern, alpha_pattern = CASES[kind]
    base = base_model(kind)
    config = LoraConfig(
        r=3,
        lora_alpha=5,
        target_modules=targets,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    theirs = get_peft_model(copy.deepcopy(base), config)
    randomize([p for n, p in theirs.named_parameters() if "lora_" in n], seed=2)
    theirs.eval().save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(output(ours), output(theirs), rtol=1e-6, atol=1e-6)
    assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    # merging folds the same update into the same weights as PEFT's merge_and_unload
    merged_theirs = theirs.merge_and_unload()
    merge_lora(ours)
    torch.testing.assert_close(output(ours), output(merged_theirs), rtol=1e-5, atol=1e-5)
    assert len(list(lora_layers(ours))) > 0


def test_a_peft_adapter_whose_rank_exceeds_a_layer_loads_with_identical_outputs(tmp_path):
    """PEFT's default r=8 on BERT's 16-wide layers and on a 2-class head: r > min(in, out)."""
    torch.manual_seed(3)
    base = torch.nn.Sequential(torch.nn.Linear(16, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    base.eval()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=["0", "2"]))
    randomize([p for n, p in theirs.named_parameters() if "lora_" in n], seed=4)
    theirs.eval().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="exceeds min"):
        ours = load_adapter(copy.deepcopy(base), tmp_path).eval()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


def test_a_peft_adapter_with_dropout_loads_into_an_eval_model_with_identical_outputs(tmp_path):
    """New wrappers take the mode of what they wrap: no dropout in a model in eval mode."""
    base = base_model("bert")  # eval mode
    config = LoraConfig(r=3, lora_alpha=5, lora_dropout=0.5, target_modules=["query", "value"])
    theirs = get_peft_model(copy.deepcopy(base), config)
    randomize([p for n, p in theirs.named_parameters() if "lora_" in n], seed=6)
    theirs.eval().save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)  # no .eval() afterwards
    assert not any(layer.training for _, layer in lora_layers(ours))
    torch.testing.assert_close(output(ours), output(theirs), rtol=1e-6, atol=1e-6)


# ---- modules_to_save: a classifier's head trained in full, saved with the adapter -------------


def bert_classifier():
    """A tiny BERT classifier whose 3-class head is new (random), as a user's fine-tune has."""
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        pad_token_id=0,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def test_lowrank_adapter_with_a_trained_head_loads_in_peft(tmp_path):
    # Oracle: PEFT's ModulesToSaveWrapper reading our file; without the head the outputs differ.
    base = bert_classifier()
    ours = add_lora(
        copy.deepcopy(base), ["query", "value"], r=4, alpha=7, modules_to_save=["classifier"]
    )
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert len(trainable) == 4 * 2 + 2  # A, B on 4 layers; the head's weight and bias
    randomize(trainable, seed=7)
    save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert type(theirs.base_model.model.classifier).__name__ == "ModulesToSaveWrapper"
    torch.testing.assert_close(output(theirs), output(ours), rtol=1e-6, atol=1e-6)
    without_head = add_lora(copy.deepcopy(base), ["query", "value"], r=4, alpha=7)
    with torch.no_grad():
        for name, parameter in without_head.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(ours.get_parameter(name))
    assert not torch.allclose(output(without_head), output(ours))  # the head is what differs
    config = dataclasses.replace(theirs.peft_config["default"], inference_mode=False)
    trainable_theirs = get_peft_model(copy.deepcopy(base), config)
    assert count_parameters(ours)[0] == trainable_theirs.get_nb_trainable_parameters()[0]


def test_peft_seq_cls_adapter_loads_in_lowrank_with_its_head(tmp_path):
    # PEFT's task_type="SEQ_CLS" puts ["classifier", "score"] in modules_to_save ("score"
    # selects nothing in BERT). A few real training steps in PEFT, then lowrank loads it.
    base = bert_classifier()
    config = LoraConfig(r=3, lora_alpha=5, target_modules=["query", "value"], task_type="SEQ_CLS")
    theirs = get_peft_model(copy.deepcopy(base), config)
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=5e-2)
    labels = torch.tensor([0, 2])
    for _ in range(3):
        theirs(input_ids=IDS, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    theirs.eval().save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(output(ours), output(theirs), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(output(ours), output(base))
    head = ours.classifier.modules_to_save["default"]
    assert torch.equal(
        head.weight, theirs.base_model.model.classifier.modules_to_save.default.weight
    )
    assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    # and back: lowrank saves what it loaded, PEFT reads it to the same outputs
    save_adapter(ours, tmp_path / "again")
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval()
    torch.testing.assert_close(output(again), output(theirs), rtol=1e-6, atol=1e-6)

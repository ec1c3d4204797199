"""Our Llama equals transformers.LlamaForCausalLM (same weights) for every Llama generation, in float32."""

from __future__ import annotations

import pytest
import torch

from neox_llama.config import load_config
from neox_llama.convert.hf_names import copy_into_hf, hf_config_dict, hf_to_ours
from neox_llama.model.args import LlamaArgs
from neox_llama.model.llama import build_model
from neox_llama.model.loss import CausalLMLoss, token_weights

transformers = pytest.importorskip("transformers")

BASE = ["num_layers=2", "hidden_size=64", "num_attention_heads=4", "seq_length=24", "vocab_size=256",
        "make_vocab_size_divisible_by=1", "seed=7"]
CASES = {
    "llama2-mha": ["num_kv_heads=4", "intermediate_size=176", "rotary_emb_base=10000.0", "rms_norm_epsilon=1e-6"],
    "llama3-gqa": ["num_kv_heads=2", "intermediate_size=192", "rotary_emb_base=500000.0"],
    "llama3.1-rope-scaling": ["num_kv_heads=2", "intermediate_size=192", "rotary_emb_base=500000.0",
                              "max_position_embeddings=256",
                              "rope_scaling={factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 16}"],
    "llama3.2-tied": ["num_kv_heads=1", "intermediate_size=128", "rotary_emb_base=500000.0", "no_weight_tying=false",
                      "rope_scaling={factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8}"],
    "biases": ["num_kv_heads=2", "intermediate_size=96", "use_bias_in_attn_linear=true", "use_bias_in_mlp=true"],
}


def pair(case: str, write_yaml):
    cfg = load_config([write_yaml("m.yml", "precision: fp32\n")], BASE + CASES[case])
    args = LlamaArgs.from_config(cfg)
    ours = build_model(args).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(args), attn_implementation="eager")).eval()
    copy_into_hf(hf, ours, args)
    return args, ours, hf


@pytest.mark.parametrize("case", list(CASES))
def test_logits_loss_and_gradients_equal_transformers(case, write_yaml):
    args, ours, hf = pair(case, write_yaml)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (2, 24))
    ours_logits, hf_out = ours(ids), hf(input_ids=ids, labels=ids)
    assert (ours_logits - hf_out.logits).abs().max().item() <= 1e-5

    mask = torch.ones(2, 23)
    loss = CausalLMLoss()(ours_logits[:, :-1], (ids[:, 1:], token_weights(mask, mask.sum())))
    assert abs(loss.item() - hf_out.loss.item()) <= 1e-5
    loss.backward()
    hf_out.loss.backward()
    table = hf_to_ours(args)
    ours_params = dict(ours.named_parameters())
    for hf_name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                    "model.layers.1.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        hf_grad = hf.get_parameter(hf_name).grad
        assert (ours_params[table[hf_name]].grad - hf_grad).abs().max().item() <= 1e-5, hf_name


def test_masked_tokens_do_not_count(write_yaml):
    args, ours, _ = pair("llama3-gqa", write_yaml)
    ids = torch.randint(0, args.vocab_size, (2, 24))
    logits = ours(ids)[:, :-1]
    labels = ids[:, 1:].clone()
    mask = torch.ones(2, 23)
    mask[1, 10:] = 0
    labels[1, 10:] = -100  # whatever sits in masked slots must not matter
    loss = CausalLMLoss()(logits, (labels, token_weights(mask, mask.sum())))
    flat = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    expected = (flat * mask.reshape(-1)).sum() / mask.sum()  # mean over valid tokens, not a mean of row means
    assert abs(loss.item() - expected.item()) <= 1e-6

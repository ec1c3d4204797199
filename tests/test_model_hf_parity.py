"""Our Llama equals transformers.LlamaForCausalLM (same weights) for every Llama generation, in float32."""

from __future__ import annotations

import pytest
import torch
import transformers  # a pinned requirement: missing, the parity tests fail rather than skip

from neox_llama.config import load_config
from neox_llama.convert.hf_names import copy_into_hf, hf_config_dict, hf_to_ours
from neox_llama.model.args import LlamaArgs
from neox_llama.model.llama import build_model
from neox_llama.model.loss import CausalLMLoss, token_weights

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
    # Context extension: every rope_type transformers implements for Llama, trained length 8 < the 24 run.
    "rope-linear": ["num_kv_heads=2", "intermediate_size=96", "rope_scaling={rope_type: linear, factor: 4.0}"],
    "rope-dynamic": ["num_kv_heads=2", "intermediate_size=96", "max_position_embeddings=24",
                     "rope_scaling={rope_type: dynamic, factor: 3.0}"],
    "rope-yarn": ["num_kv_heads=2", "intermediate_size=96", "rotary_emb_base=500000.0", "max_position_embeddings=32",
                  "rope_scaling={rope_type: yarn, factor: 4.0, original_max_position_embeddings: 8}"],
    "rope-yarn-mscale": ["num_kv_heads=2", "intermediate_size=96", "max_position_embeddings=32",
                         "rope_scaling={rope_type: yarn, factor: 4.0, original_max_position_embeddings: 8, "
                         "beta_fast: 16.0, beta_slow: 2.0, mscale: 1.0, mscale_all_dim: 0.5, truncate: false}"],
    "rope-longrope": ["num_kv_heads=2", "intermediate_size=96", "max_position_embeddings=32",
                      "rope_scaling={rope_type: longrope, original_max_position_embeddings: 8, "
                      "long_factor: [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0], "
                      "short_factor: [1.0, 1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0]}"],
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


@pytest.mark.parametrize("length", [12, 40])
def test_length_dependent_rope_within_and_past_the_trained_length(length, write_yaml):
    """dynamic grows its base past max_position_embeddings and longrope switches to its long factors past the
    original length: both decide by the length run, as transformers does."""
    for case in ("rope-dynamic", "rope-longrope"):
        args, ours, hf = pair(case, write_yaml)
        ids = torch.randint(0, args.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            assert (ours(ids) - hf(input_ids=ids).logits).abs().max().item() <= 1e-5, case


def test_rope_scaling_round_trips_through_config_json(write_yaml, tmp_path):
    from neox_llama.convert.hf_import import _model_settings

    for case in ("rope-linear", "rope-yarn-mscale", "rope-longrope", "llama3.1-rope-scaling"):
        args, _, hf = pair(case, write_yaml)
        hf.config.save_pretrained(tmp_path / case)
        saved = __import__("json").loads((tmp_path / case / "config.json").read_text())
        settings = _model_settings(saved, tmp_path / case, 1, 1)
        cfg = load_config([write_yaml(f"{case}.yml", "precision: fp32\n")],
                          [*BASE, *(f"{k}={v}" for k, v in settings.items() if k in ("rope_scaling",)),
                           *CASES[case][:2], f"max_position_embeddings={args.max_position_embeddings}",
                           f"rotary_emb_base={args.rotary_emb_base}"])
        assert LlamaArgs.from_config(cfg).rope_scaling == args.rope_scaling, case


def test_a_longrope_factor_list_of_the_wrong_length_is_refused(write_yaml):
    from neox_llama.config import ConfigError

    with pytest.raises(ConfigError, match=r"rope_scaling.long_factor has 2 values; longrope needs one per rotary"):
        load_config([write_yaml("m.yml", "precision: fp32\n")],
                    [*BASE, "rope_scaling={rope_type: longrope, long_factor: [1.0, 2.0], short_factor: [1.0, 1.0, 1.0, "
                            "1.0, 1.0, 1.0, 1.0, 1.0]}"])


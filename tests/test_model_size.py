"""Parameter counts on the meta device, FLOPs by hand, memory estimate arithmetic, names and init."""

from __future__ import annotations

import pytest
import torch
from helpers.presets import OFFICIAL_TOTALS

from neox_llama.config import ConfigError, load_config
from neox_llama.config.presets import CONFIG_DIR, PRESETS
from neox_llama.model.args import LlamaArgs
from neox_llama.model.llama import build_model
from neox_llama.planning.flops import count_parameters, flops_per_token, recompute_flops_per_token
from neox_llama.planning.memory import estimate_memory
from neox_llama.utils.peak import known_peak_tflops

TINY = ["num_layers=2", "hidden_size=64", "num_attention_heads=4", "num_kv_heads=2", "intermediate_size=192",
        "seq_length=16", "vocab_size=256", "make_vocab_size_divisible_by=1"]


@pytest.mark.parametrize("name", list(OFFICIAL_TOTALS))
def test_model_built_on_the_meta_device_has_the_official_parameter_count(name):
    cfg = load_config([CONFIG_DIR / PRESETS[name]])
    model = build_model(LlamaArgs.from_config(cfg), device="meta")
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_TOTALS[name] == count_parameters(cfg).total


def test_flops_per_token_by_hand(write_yaml):
    cfg = load_config([write_yaml("a.yml", "precision: fp32\n")], TINY)
    # per block: norms 2*64, q 64*64, k and v 64*32 each, o 64*64, SwiGLU 3*64*192 = 49,280; two blocks,
    # final norm 64, head 256*64 -> non-embedding 115,008; attention term 12 * 2 layers * 4 heads * 16 * 16.
    assert count_parameters(cfg).non_embedding == 115_008
    assert flops_per_token(cfg) == 6 * 115_008 + 12 * 2 * 4 * 16 * 16


def test_recomputed_flops_by_hand(write_yaml):
    """HFU adds what checkpointing recomputes: a second forward of every block (2 x 49,280 per block and the
    scores' forward 4 x 2 layers x 4 heads x 16 x 16), only the attention cores when selective, LoRA adapters too
    (query A 4x64 + B 64x4, value A 4x64 + B 32x4 = 896 per block); MFU's FLOPs stay the model's."""
    def cfg(*extra):
        return load_config([write_yaml("a.yml", "precision: fp32\n")], [*TINY, *extra])

    scores = 4 * 2 * 4 * 16 * 16
    assert recompute_flops_per_token(cfg()) == 0
    assert recompute_flops_per_token(cfg("checkpoint_activations=true")) == 2 * 2 * 49_280 + scores
    assert recompute_flops_per_token(cfg("checkpoint_activations=true", "checkpoint_granularity=selective")) == scores
    lora = ["lora_r=4", "lora_targets=[query,value]", "finetune=true", "load=/nonexistent/base"]
    assert recompute_flops_per_token(cfg("checkpoint_activations=true", *lora)) == 2 * 2 * (49_280 + 896) + scores
    assert flops_per_token(cfg("checkpoint_activations=true")) == flops_per_token(cfg())
    # Adapter from block 1, 5 prompt tokens: the base's matrices are frozen (4 FLOPs per parameter), the prompt
    # attention of 1 block costs 4 x 4 heads x 16 x 5 forward, 3x that with backward; v2's norms (2 x 2 x 64 + 64)
    # train, so they are no frozen compute
    attention = 12 * 2 * 4 * 16 * 16
    prompt = 4 * 1 * 4 * 16 * 5
    adapter = ["peft_method=adapter", "adapter_start_layer=1", "adapter_prompt_length=5", "finetune=true",
               "load=/nonexistent/base"]
    # (v1: block 0, below the first prompt, runs forward only: 2 x 49,280 and 4 x 4 heads x 16 x 16 fewer)
    assert flops_per_token(cfg(*adapter)) == 4 * 115_008 + 3 * prompt + attention - 2 * 49_280 - 8 * 4 * 16 * 16
    v2 = [*adapter, "peft_method=adapter_v2"]
    assert flops_per_token(cfg(*v2)) == 6 * 115_008 - 2 * (115_008 - 320) + 3 * prompt + attention
    assert recompute_flops_per_token(cfg("checkpoint_activations=true", *adapter)) == 2 * 2 * 49_280 + prompt + scores
    assert known_peak_tflops("NVIDIA H200", torch.bfloat16) == 989.0
    assert known_peak_tflops("NVIDIA H100 PCIe", torch.bfloat16) == 756.0
    assert known_peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32) is None


def test_memory_estimate_follows_zero_stages_and_checkpointing(write_yaml):
    base = [*TINY, "precision=bf16", "train_micro_batch_size_per_gpu=2", "optimizer.params.fused=false"]
    one = estimate_memory(load_config([write_yaml("a.yml", "")], [*base, "zero_optimization.stage=0"]))
    fused = estimate_memory(load_config([write_yaml("a.yml", "")], [*base, "optimizer.params.fused=true"]))
    assert fused.workspace == 0  # torch's fused AdamW updates in place
    n = sum(p.numel() for p in build_model(LlamaArgs.from_config(load_config([write_yaml("a.yml", "")], base))).parameters())
    # bf16: 16-bit weights and gradients, the optimizer's fp32 gradient, master weights and Adam, torch's step
    # foreach workspace on CPU (none with DeepSpeed's fused GPU Adam)
    assert one.parameters == n and (one.weights, one.gradients, one.optimizer) == (2 * n, 6 * n, 12 * n)
    assert one.workspace == 4 * n and estimate_memory(
        load_config([write_yaml("a.yml", "")], [*base, "zero_optimization.stage=0"]), "cuda").workspace == 0
    for stage, expected in ((1, (2 * n, 3 * n, 3 * n)), (2, (2 * n, 1.5 * n, 3 * n)), (3, (n / 2, 1.5 * n, 3 * n))):
        est = estimate_memory(load_config([write_yaml("a.yml", "")], [*base, f"zero_optimization.stage={stage}"],
                                          world_size=4))
        assert (est.weights, est.gradients, est.optimizer, est.workspace) == (*expected, n), stage
    assert one.activations_checkpointed < one.activations
    tp = estimate_memory(load_config([write_yaml("a.yml", "")], [*base, "model_parallel_size=2"], world_size=2))
    assert tp.parameters < n and tp.activations < one.activations


def test_same_seed_same_weights_and_names_are_stable(write_yaml):
    cfg = load_config([write_yaml("a.yml", "precision: fp32\n")], TINY)
    a, b = build_model(LlamaArgs.from_config(cfg)), build_model(LlamaArgs.from_config(cfg))
    names = [n for n, _ in a.named_parameters()]
    assert names[:3] == ["0.word_embeddings.weight", "1.input_norm.weight", "1.attention.query.weight"]
    assert names[-2:] == ["3.norm.weight", "4.head.weight"]
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb)
    std = a.get_parameter("1.attention.query.weight").std().item()
    down = a.get_parameter("1.mlp.down.weight").std().item()
    assert 0.015 < std < 0.025 and down < std / 1.5  # output projections scaled by 1/sqrt(2 x layers)
    other = build_model(LlamaArgs.from_config(load_config([write_yaml("b.yml", "seed: 99\n")], TINY)))
    assert not torch.equal(other.get_parameter("0.word_embeddings.weight"), a.get_parameter("0.word_embeddings.weight"))


def test_activation_checkpointing_gives_the_same_gradients(write_yaml):
    """Full (every 1 or 2 blocks) and selective recomputation, with dropout and document attention: gradients equal
    no recomputation (checkpoint replays the random state)."""
    docs = [*TINY, "attention_dropout=0.1", "hidden_dropout=0.1", "reset_position_ids=true", "reset_attention_mask=true"]
    ids, positions = torch.randint(0, 256, (2, 16)), torch.arange(16).repeat(2, 1)
    positions[:, 9:] -= 9  # two documents per row
    grads = []
    for every, extra in ((0, []), (1, []), (2, []), (0, ["checkpoint_activations=true", "checkpoint_granularity=selective"])):
        args = LlamaArgs.from_config(load_config([write_yaml("a.yml", "precision: fp32\n")], [*docs, *extra]))
        model = build_model(args, checkpoint_every=every).train()
        torch.manual_seed(5)
        model(ids, positions).float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other in grads[1:]:
        for name, grad in grads[0].items():
            assert torch.allclose(grad, other[name], atol=1e-7), name


def saved_bytes(cfg, every: int) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward of a micro-batch."""
    model = build_model(LlamaArgs.from_config(cfg), checkpoint_every=every).train()
    s = cfg.seq_length
    ids, positions = torch.randint(0, 256, (2, s)), torch.arange(s).repeat(2, 1)
    positions[:, s // 2:] -= s // 2
    seen: dict[int, int] = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, positions)
    return sum(seen.values())


@pytest.mark.parametrize("case", ["dropout", "documents"])
def test_selective_checkpointing_drops_the_attention_core_as_estimated(write_yaml, case):
    """What selective recomputation keeps out of memory, measured with saved-tensor hooks, is within 10 % of the
    estimate's attention core (math path with dropout on CPU; the document mask otherwise)."""
    extra = ["attention_dropout=0.1"] if case == "dropout" else ["reset_position_ids=true", "reset_attention_mask=true"]
    base = [*TINY, "seq_length=128", "precision=fp32", "train_micro_batch_size_per_gpu=2", *extra]
    plain = load_config([write_yaml("a.yml", "")], base)
    selective = load_config([write_yaml("a.yml", "")], [*base, "checkpoint_activations=true",
                                                       "checkpoint_granularity=selective"])
    kept_out = saved_bytes(plain, 0) - saved_bytes(selective, 0)
    est = estimate_memory(selective)
    core = (est.activations - est.activations_checkpointed) / (plain.num_layers - 1)  # one core is rebuilt at a time
    assert abs(kept_out / plain.num_layers - core) <= 0.1 * core, (kept_out, core)
    assert "with selective activation checkpointing" in est.text()


def test_memory_estimate_counts_checkpoint_groups_buffers_and_offload(write_yaml):
    base = [*TINY, "num_layers=8", "precision=bf16", "train_micro_batch_size_per_gpu=2", "zero_optimization.stage=2"]
    cfg = load_config([write_yaml("a.yml", "")], [*base, "checkpoint_activations=true"], world_size=2)
    by4 = load_config([write_yaml("a.yml", "")], [*base, "checkpoint_activations=true", "checkpoint_num_layers=4"], world_size=2)
    one, four = estimate_memory(cfg), estimate_memory(by4)  # two ranks: one would run ZeRO 0 (no buckets)
    s, b, h = 16, 2, 64
    # taken out: the bf16 logits and their gradient, and the cross-entropy's float32 chunk (here the whole batch)
    per_block = (one.activations - (2 * 2 + 8) * s * b * 256) / 8
    # every 4 blocks: 2 group inputs instead of 8 block inputs, and 4 blocks rebuilt at once instead of 1
    assert four.activations_checkpointed - one.activations_checkpointed == pytest.approx(-6 * s * b * h * 2 + 3 * per_block)
    n = one.parameters
    assert one.buffers == 2 * n + 2 * n  # both buckets (5e7 elements) hold the whole tiny model, 16-bit
    overlap = estimate_memory(load_config([write_yaml("a.yml", "")], [*base, "zero_optimization.overlap_comm=true"], world_size=2))
    assert overlap.buffers == one.buffers + 2 * n
    small = estimate_memory(load_config([write_yaml("a.yml", "")], [*base, "zero_optimization.reduce_bucket_size=1000"], world_size=2))
    assert small.buffers == 2 * 1000 + 2 * n
    offload = load_config([write_yaml("a.yml", "")], [*base, "zero_optimization.offload_optimizer=cpu"], world_size=2)
    gpu, cpu = estimate_memory(offload, "cuda"), estimate_memory(offload)
    plain_gpu = estimate_memory(load_config([write_yaml("a.yml", "")], base, world_size=2), "cuda")
    # its partition of the optimizer state and of the fp32 gradients (half of each on each of the 2 ranks)
    assert gpu.offloaded_host == plain_gpu.optimizer + 4 * n / 2 and gpu.total == plain_gpu.total - gpu.offloaded_host
    assert cpu.offloaded_host == 0 and cpu.workspace == 0  # on CPU the host is the device; CPU Adam steps in place
    assert "offloaded (not in the total)" in gpu.text()


@pytest.mark.parametrize("bad", [["hidden_size=66"], ["num_kv_heads=3"], ["seq_length=4096", "max_position_embeddings=64"]])
def test_bad_shapes_never_reach_the_model(write_yaml, bad):
    with pytest.raises(ConfigError):
        cfg = load_config([write_yaml("a.yml", "")], [*TINY, *bad])
        build_model(LlamaArgs.from_config(cfg))  # not reached


def test_document_attention_and_cpu_dropout_add_their_attention_terms(write_yaml):
    base = [*TINY, "precision=bf16", "train_micro_batch_size_per_gpu=2"]
    docs = [*base, "reset_position_ids=true", "reset_attention_mask=true"]
    dropout = [*base, "attention_dropout=0.1"]
    cfg, masked, dropped = (load_config([write_yaml("a.yml", "")], o) for o in (base, docs, dropout))
    s, b, heads, blocks = cfg.seq_length, 2, cfg.num_attention_heads, cfg.num_layers
    for accelerator in ("cpu", "cuda"):  # the mask, in bf16
        assert estimate_memory(masked, accelerator).activations - estimate_memory(cfg, accelerator).activations == \
            blocks * b * s * s * 2
    # CPU attention with dropout runs the math path: s x s scores, probabilities, dropped ones and the mask per head
    assert estimate_memory(dropped).activations - estimate_memory(cfg).activations == blocks * b * heads * s * s * 7
    assert estimate_memory(dropped, "cuda").activations == estimate_memory(cfg, "cuda").activations

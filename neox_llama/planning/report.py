"""The human-readable plan that ``deepy.py --dry-run`` prints: config, layout, model size, engine config, command."""

from __future__ import annotations

import dataclasses
import json

import yaml

from neox_llama.config import Config, deepspeed_config, zero_text
from neox_llama.config.typecheck import user_fields
from neox_llama.planning.flops import count_parameters, count_trainable, flops_per_token
from neox_llama.planning.launch import LaunchCommand, LaunchPlan
from neox_llama.planning.memory import estimate_memory


def _plain(value: object) -> object:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _inline_yaml(value: object) -> str:
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def merged_config_text(cfg: Config) -> str:
    """Every key with its value, annotated with the file (or 'command line') that set it."""
    lines = []
    for f in user_fields(Config):
        line = f"{f.name}: {_inline_yaml(getattr(cfg, f.name))}"
        origins = sorted({v for k, v in cfg.sources.items() if k == f.name or k.startswith(f.name + ".")})
        lines.append(f"{line:<60}  # {', '.join(origins)}" if origins else line)
    return "\n".join(lines)


def layout_text(cfg: Config, plan: LaunchPlan) -> str:
    d = cfg.derived
    hosts = ", ".join(f"{host}: {len(slots)}" for host, slots in plan.hosts.items())
    return (f"world size {d.world_size} = pipe_parallel_size {cfg.pipe_parallel_size} x model_parallel_size "
            f"{cfg.model_parallel_size} x data parallel {d.data_parallel_size}  (ranks per host: {hosts}; {plan.accelerator})\n"
            f"batch: train_batch_size {d.train_batch_size} = micro {d.train_micro_batch_size_per_gpu} x "
            f"accumulation {d.gradient_accumulation_steps} x data parallel {d.data_parallel_size}; "
            f"{d.train_batch_size * cfg.seq_length:,} tokens per step\n"
            f"precision {cfg.precision}, ZeRO stage {zero_text(cfg)}")


def model_text(cfg: Config, accelerator: str = "cpu") -> str:
    d = cfg.derived
    arch = (f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads "
            f"({d.num_kv_heads} kv heads, head dim {d.head_dim}), {cfg.activation} {d.intermediate_size}, "
            f"{cfg.norm}, {cfg.pos_emb} positions, "
            f"{'separate head' if cfg.no_weight_tying else 'head tied to embedding'}")
    if d.padded_vocab_size is None:
        return arch + "\nparameters: known once the tokenizer gives the vocabulary size"
    count = count_parameters(cfg)
    vocab = f"vocab {cfg.vocab_size} padded to {d.padded_vocab_size}"
    trained = ""
    if cfg.lora_r or cfg.freeze or cfg.peft_method != "lora":
        from neox_llama.peft.methods import describe, peft_settings

        t = count_trainable(cfg)
        settings = peft_settings(cfg)
        how = describe(settings) if settings is not None else f"freeze {', '.join(cfg.freeze)}"
        trained = (f"trainable: {t.trainable:,} of {t.total:,} parameters ({100 * t.fraction:.3f}%, {how}); "
                   "frozen matrices count 4 FLOPs per parameter, not 6\n")
    return (f"{arch}, {vocab}\n"
            f"parameters: {count.total:,} total, {count.non_embedding:,} non-embedding (head included)\n{trained}"
            f"training FLOPs per token: {flops_per_token(cfg):,} (6N + 12 x layers x heads x head_dim x seq_length)\n"
            f"{estimate_memory(cfg, accelerator).text()}")


def dry_run_text(cfg: Config, plan: LaunchPlan, command: LaunchCommand, config_file: str) -> str:
    """The whole report."""
    ds = json.dumps(deepspeed_config(cfg, plan.accelerator), indent=2)
    sections = [
        ("merged config", merged_config_text(cfg)),
        ("layout", layout_text(cfg, plan)),
        ("model", model_text(cfg, plan.accelerator)),
        ("DeepSpeed config (derived)", ds),
        (f"launch command (the merged config goes to {config_file})", command.shell(abbreviate=True)),
    ]
    return "\n\n".join(f"== {title} ==\n{body}" for title, body in sections)

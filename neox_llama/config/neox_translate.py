"""GPT-NeoX config files -> one neox_llama config, key by key, with a report of what happened to each.

GPT-NeoX merges its YAML files by top-level key (a key set in two files is an error there, and here), accepts
``num-layers`` for ``num_layers``, and fills every key a file leaves out with its own default. This module
does the same, then translates: keys with the same meaning are copied, keys with a rule are converted
(``intermediate_size`` by GPT-NeoX's MLP rule, ``fp16``/``bf16`` blocks, its Adam, top-level ``weight_decay``
and ``lr``), keys that neox_llama chooses by itself (fused kernels, flash attention, the communication backend)
are dropped, and the rest have no equivalent. GPT-NeoX's defaults that differ from ours and change the model
or the run are written out, so that the translation builds what GPT-NeoX would have built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neox_llama.config.loading import ConfigError, read_yaml
from neox_llama.config.neox_keys import NEOX_KEYS
from neox_llama.config.schema import Config
from neox_llama.config.typecheck import user_fields

OURS = {f.name for f in user_fields(Config)}

SAME = {
    "pipe_parallel_size", "model_parallel_size", "make_vocab_size_divisible_by", "num_layers", "hidden_size",
    "num_attention_heads", "num_kv_heads", "seq_length", "max_position_embeddings", "norm", "rms_norm_epsilon",
    "layernorm_epsilon", "pos_emb", "rotary_pct", "no_weight_tying", "use_bias_in_attn_linear", "use_bias_in_mlp",
    "init_method_std", "hidden_dropout", "attention_dropout", "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps", "train_batch_size", "train_iters", "lr_decay_iters", "warmup", "min_lr",
    "gradient_clipping", "eval_interval", "eval_iters", "eval_tasks", "log_interval", "checkpoint_factor", "keep_last_n_checkpoints",
    "save", "load", "finetune", "data_path", "train_data_paths", "valid_data_paths", "test_data_paths",
    "train_data_weights", "valid_data_weights", "test_data_weights", "split", "vocab_file", "seed",
    "checkpoint_activations", "checkpoint_num_layers", "tensorboard_dir", "log_dir", "use_wandb", "wandb_project",
    "wandb_group", "wall_clock_breakdown", "reset_position_ids", "reset_attention_mask", "eod_mask_loss",
    "num_workers", "hostfile", "include", "exclude", "num_gpus", "num_nodes", "master_port", "master_addr", "launcher",
}
"""GPT-NeoX keys that mean exactly what the key of the same name means here."""

AUTOMATIC = {
    "scaled_upper_triang_masked_softmax_fusion": "attention kernels are chosen by PyTorch's SDPA",
    "scaled_masked_softmax_fusion": "attention kernels are chosen by PyTorch's SDPA",
    "attention_config": "attention is global; SDPA picks the flash / memory-efficient kernel itself",
    "bias_gelu_fusion": "no fused kernels to select", "bias_dropout_fusion": "no fused kernels to select",
    "rope_fusion": "no fused kernels to select", "use_flashattn_swiglu": "no fused kernels to select",
    "distributed_backend": "gloo on CPU, NCCL for CUDA tensors (cpu:gloo,cuda:nccl), chosen at start-up",
    "data_impl": "datasets are always memory-mapped MMIDIDX",
    "output_layer_parallelism": "the head is split by vocabulary (column) under tensor parallelism",
    "steps_per_print": "metrics are logged every log_interval steps by neox_llama itself",
    "synchronize_each_layer": "no effect without partitioned activations",
    "checkpoint_validation_with_forward_pass": "checkpoints are checked by names and shapes when loaded",
    "override_lr_scheduler": "the schedule always follows the config (resume restores only the step)",
    "zero_allow_untested_optimizer": "set by neox_llama",
}
"""GPT-NeoX keys for things neox_llama chooses by itself: dropped, with the reason."""

NEOX_DEFAULTS: dict[str, Any] = {
    "norm": "layernorm", "pos_emb": "learned", "activation": "gelu", "no_weight_tying": False,
    "rms_norm_epsilon": 1.0e-8, "use_bias_in_attn_linear": True, "use_bias_in_mlp": True, "use_bias_in_norms": True,
    "lr_decay_style": "linear", "eval_iters": 100, "log_interval": 100, "mlp_multiple_of": 1, "rotary_emb_base": 10000,
}
"""GPT-NeoX's defaults (NeoXArgs) where they differ from ours or enter a rule: a key a file leaves out has them."""

ARCHITECTURE = ("norm", "pos_emb", "no_weight_tying", "rms_norm_epsilon", "use_bias_in_attn_linear")
"""Defaults written out even when no file sets them (they decide the model GPT-NeoX builds)."""

GATED = {"swiglu"}
"""GPT-NeoX's gated activations that neox_llama has (geglu, reglu, bilinear and glu have no equivalent)."""

ZERO_KEYS = {"stage", "allgather_partitions", "allgather_bucket_size", "reduce_scatter", "reduce_bucket_size",
             "overlap_comm", "contiguous_gradients", "stage3_param_persistence_threshold", "stage3_prefetch_bucket_size",
             "stage3_max_live_parameters", "stage3_max_reuse_distance"}
FP16_KEYS = {"loss_scale", "loss_scale_window", "hysteresis", "min_loss_scale", "initial_scale_power"}


@dataclass
class Translation:
    """Our settings with, for each, where it came from; and the report's three groups."""

    settings: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    translated: list[str] = field(default_factory=list)
    automatic: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def set(self, key: str, value: Any, origin: str) -> None:
        self.settings[key] = value
        self.origin[key] = origin
        self.translated.append(f"{origin} -> {key}: {value!r}")


def read_neox_files(paths: list[Path]) -> dict[str, tuple[Any, str]]:
    """GPT-NeoX's merge: top-level keys, hyphens read as underscores, a key in two places is an error."""
    merged: dict[str, tuple[Any, str]] = {}
    problems = []
    for path in paths:
        for key, value in read_yaml(path).items():
            name = str(key).replace("-", "_")
            if name in merged:
                problems.append(f"{path}: {key} is also set in {merged[name][1]} (GPT-NeoX refuses a key set twice)")
                continue
            merged[name] = (value, f"{Path(path).name}: {key}")
    if problems:
        raise ConfigError(problems)
    return merged


def _round_up(value: int, multiple: int) -> int:
    return multiple * ((value + multiple - 1) // multiple)


def mlp_width(hidden: int, activation: str, intermediate: int | None, expansion: float | None, multiple: int) -> int:
    """The MLP width GPT-NeoX's ParallelMLP builds (megatron/model/transformer.py), as our intermediate_size.

    ffn = intermediate_size, or expansion_factor x hidden, or 4 x hidden; gated activations take int(ffn x 2/3)
    for the fused gate+up projection and half of that for the down projection's input, rounded up to
    mlp_multiple_of; that input width is the SwiGLU width (11008 for 32768 with multiple 256).
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise ConfigError([f"mlp_multiple_of: expected a positive integer, got {multiple!r}"])
    ffn = intermediate or (int(expansion * hidden) if expansion else 4 * hidden)
    inner = ffn
    if activation in GATED:
        ffn = int(ffn * 2 / 3)
        inner = ffn // 2
    first, second = _round_up(ffn, 2 * multiple), _round_up(inner, multiple)
    if first != (2 * second if activation in GATED else second):
        raise ConfigError([f"intermediate_size/expansion_factor with mlp_multiple_of {multiple}: GPT-NeoX would build "
                           f"a first MLP projection of {first} and a second of input {second}, which do not fit "
                           "together (it fails on this config too); choose a width that does"])
    return second


def translate(files: list[Path], vocab_size: int | None = None) -> Translation:
    """Translate GPT-NeoX ``files`` (merged as GPT-NeoX merges them)."""
    raw = read_neox_files(files)
    out = Translation()
    value = {k: v for k, (v, _) in raw.items()}
    where = {k: src for k, (_, src) in raw.items()}
    _check_types(value, where)

    def get(key: str) -> Any:
        return value.get(key, NEOX_DEFAULTS.get(key))

    def origin(*keys: str) -> str:
        found = [where[k] for k in keys if k in where]
        return ", ".join(found) if found else f"GPT-NeoX default {keys[0]}: {NEOX_DEFAULTS.get(keys[0])!r}"

    handled: set[str] = set()
    for key in ARCHITECTURE:  # what GPT-NeoX builds when a file is silent
        if key not in value:
            out.set(key, NEOX_DEFAULTS[key], origin(key))
            handled.add(key)
    # The MLP: GPT-NeoX's width rule, its activation, and its default of biases on the MLP projections.
    activation = get("activation")
    handled |= {"activation", "intermediate_size", "expansion_factor", "mlp_multiple_of", "use_bias_in_mlp"}
    if activation in ("swiglu", "gelu"):
        out.set("activation", activation, origin("activation"))
        if "hidden_size" in value:
            width = mlp_width(value["hidden_size"], activation, value.get("intermediate_size"),
                              value.get("expansion_factor"), get("mlp_multiple_of"))
            out.set("intermediate_size", width, origin("intermediate_size", "expansion_factor", "mlp_multiple_of",
                                                       "activation") + " (GPT-NeoX's MLP rule)")
    else:
        out.unsupported.append(f"{origin('activation')}: no {activation} MLP here (swiglu and gelu only)")
    out.set("use_bias_in_mlp", bool(get("use_bias_in_mlp")), origin("use_bias_in_mlp"))
    if "use_bias_in_mlp" not in value:
        out.notes.append("use_bias_in_mlp is not set, so GPT-NeoX gives every MLP projection a bias (its default "
                         "true); Meta's Llama has none: add use_bias_in_mlp: false to match it")
    handled |= {"use_bias_in_norms", "rotary_emb_base"}
    if "use_bias_in_norms" in value:  # GPT-NeoX's models never read it: RMSNorm has no bias, LayerNorm has one
        out.automatic.append(f"{where['use_bias_in_norms']}: unused by GPT-NeoX's models (RMSNorm has no bias, "
                             "LayerNorm one), as here")
    if get("pos_emb") == "rotary":
        out.set("rotary_emb_base", float(get("rotary_emb_base")), origin("rotary_emb_base"))
    _precision(value, where, out, handled)
    _optimizer(value, where, out, handled)
    for key in ("lr_decay_style", "eval_iters", "log_interval"):
        handled.add(key)
        style = get(key)
        if key == "lr_decay_style" and style not in ("linear", "cosine", "constant"):
            out.unsupported.append(f"{origin(key)}: no {style} schedule here (linear, cosine, constant)")
        else:
            out.set(key, style, origin(key))
    if "zero_optimization" not in value:
        out.set("zero_optimization", {"stage": 0}, "GPT-NeoX default: no zero_optimization block (stage 0)")
    else:
        handled.add("zero_optimization")
        zero = value["zero_optimization"] or {}
        kept = {k: v for k, v in zero.items() if k in ZERO_KEYS}
        out.set("zero_optimization", kept, where["zero_optimization"])
        for k in sorted(set(zero) - ZERO_KEYS):
            out.unsupported.append(f"{where['zero_optimization']}.{k}: no equivalent zero_optimization key here")
    if "tokenizer_type" in value:
        handled.add("tokenizer_type")
        if value["tokenizer_type"] in ("SPMTokenizer", "HFTokenizer"):
            out.set("tokenizer_type", value["tokenizer_type"], where["tokenizer_type"])
        else:
            out.unsupported.append(f"{where['tokenizer_type']}: {value['tokenizer_type']} has no equivalent "
                                   "(SPMTokenizer, HFTokenizer; Llama-3's tokenizer.model is Llama3Tokenizer)")
    for key in ("init_method", "output_layer_init_method"):
        if key in value:
            handled.add(key)
            wanted = "normal" if key == "init_method" else "scaled_normal"
            if value[key] == wanted:
                out.automatic.append(f"{where[key]}: the same as ours ({wanted}, std init_method_std)")
            else:
                out.unsupported.append(f"{where[key]}: initialisation {value[key]} has no equivalent (ours: normal, "
                                       "output projections scaled_normal)")
    if "gpt_j_residual" in value:
        handled.add("gpt_j_residual")
        (out.unsupported if value["gpt_j_residual"] else out.automatic).append(
            f"{where['gpt_j_residual']}: " + ("no parallel (GPT-J) residual here" if value["gpt_j_residual"]
                                               else "sequential residual, as ours"))
    if vocab_size is not None:
        out.set("vocab_size", vocab_size, "--vocab-size")
    for kind in ("train", "valid", "test"):  # GPT-NeoX blends listed datasets equally unless weighted
        if value.get(f"{kind}_data_paths") and f"{kind}_data_weights" not in value:
            out.set(f"{kind}_data_weights", [1.0] * len(value[f"{kind}_data_paths"]),
                    f"GPT-NeoX default: equal weights for {where[f'{kind}_data_paths']}")
    handled.add("make_vocab_size_divisible_by")
    multiple = get("make_vocab_size_divisible_by") or 128
    tp = value.get("model_parallel_size", 1) or 1
    out.set("make_vocab_size_divisible_by", multiple * tp,
            origin("make_vocab_size_divisible_by") + (f" x model_parallel_size {tp}" if tp > 1 else "")
            + " (GPT-NeoX pads to the product)")
    if get("lr_decay_style") == "linear" and value.get("min_lr"):
        out.notes.append("lr_decay_style linear: GPT-NeoX decays towards 0 and clips at min_lr, neox_llama decays "
                         "linearly to min_lr; the rates differ near the end of decay")
    if value.get("bias_gelu_fusion") and get("activation") == "gelu":
        out.unsupported.append(f"{where['bias_gelu_fusion']}: GPT-NeoX's fused GELU is the tanh approximation; "
                               "ours is exact")
        handled.add("bias_gelu_fusion")
    attention = value.get("attention_config")
    if attention is not None:
        handled.add("attention_config")
        kinds = {k for entry in attention for k in (entry[0] if isinstance(entry, list | tuple) and entry else [])}
        if kinds - {"global", "flash"}:
            out.unsupported.append(f"{where['attention_config']}: attention {sorted(kinds - {'global', 'flash'})} "
                                   "has no equivalent (global attention only)")
        else:
            out.automatic.append(f"{where['attention_config']}: {AUTOMATIC['attention_config']}")
    if value.get("num_nodes") == -1:
        handled.add("num_nodes")
        out.automatic.append(f"{where['num_nodes']}: -1 (all nodes) is the default here: left unset")
    for key in sorted(set(value) - handled):
        if key in SAME or (key in OURS and key not in NEOX_KEYS):
            out.set(key, value[key], where[key])
        elif key in AUTOMATIC:
            out.automatic.append(f"{where[key]}: {AUTOMATIC[key]}")
        elif key in NEOX_KEYS:
            out.unsupported.append(f"{where[key]}: no equivalent in neox_llama")
        else:
            out.unsupported.append(f"{where[key]}: unknown key (neither GPT-NeoX's nor neox_llama's)")
    if "vocab_size" not in out.settings and "vocab_file" not in out.settings:
        out.notes.append("no vocabulary: GPT-NeoX model files carry none; pass --vocab-size N, give the tokenizer "
                         "(tokenizer_type, vocab_file), or set vocab_size in a later file")
    return out


NUMERIC = {"hidden_size": int, "intermediate_size": int, "expansion_factor": (int, float), "mlp_multiple_of": int,
           "model_parallel_size": int, "make_vocab_size_divisible_by": int, "rotary_emb_base": (int, float),
           "weight_decay": (int, float), "lr": (int, float), "min_lr": (int, float)}
MAPPINGS = ("optimizer", "zero_optimization", "fp16", "bf16")


def _check_types(value: dict, where: dict) -> None:
    """The keys the rules compute with have the types GPT-NeoX requires (the rest are checked by our loader)."""
    problems = []
    for key, kind in NUMERIC.items():
        item = value.get(key)
        if item is not None and (isinstance(item, bool) or not isinstance(item, kind)):
            problems.append(f"{where[key]}: expected a number, got {item!r}")
    for key in MAPPINGS:
        if value.get(key) is not None and not isinstance(value[key], dict):
            problems.append(f"{where[key]}: expected a mapping, got {value[key]!r}")
    if problems:
        raise ConfigError(problems)


def _precision(value: dict, where: dict, out: Translation, handled: set[str]) -> None:
    handled |= {"fp16", "bf16", "precision"}
    fp16, bf16 = value.get("fp16") or {}, value.get("bf16") or {}
    for key, block in (("fp16", fp16), ("bf16", bf16)):
        if not isinstance(block, dict):
            raise ConfigError([f"{where[key]}: expected a mapping like {{enabled: true}}, got {block!r}"])
    if fp16.get("enabled") or value.get("precision") == "fp16":
        src = where.get("fp16") or where["precision"]
        out.set("precision", "fp16", src)
        for key in sorted(FP16_KEYS & set(fp16)):
            out.set(key, fp16[key], f"{where['fp16']}.{key}")
        for key in sorted(set(fp16) - FP16_KEYS - {"enabled", "fp16", "type"}):
            out.unsupported.append(f"{where['fp16']}.{key}: no equivalent fp16 setting here")
    elif bf16.get("enabled") or value.get("precision") == "bfloat16":
        out.set("precision", "bf16", where.get("bf16") or where["precision"])
    else:
        out.set("precision", "fp32", where.get("precision", "GPT-NeoX default: fp32 (no fp16/bf16 block)"))


def _optimizer(value: dict, where: dict, out: Translation, handled: set[str]) -> None:
    """GPT-NeoX's "adam" is apex/DeepSpeed FusedAdam (and "cpu_adam"/"cpu_torch_adam" DeepSpeedCPUAdam), whose default
    is decoupled decay (AdamW); GPT-NeoX fills missing params with lr 0.001, betas (0.9, 0.999), eps 1e-8, always
    takes lr from the optimizer block (a top-level lr is overwritten), passes the top-level weight_decay (default
    0.1), and decays the embeddings too (only norms and biases are exempt)."""
    handled |= {"optimizer", "weight_decay", "lr"}
    optimizer = value.get("optimizer") or {}
    src = where.get("optimizer", "GPT-NeoX default optimizer: Adam")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("params", {}) or {}, dict):
        raise ConfigError([f"{src}: expected a mapping like {{type: Adam, params: {{lr: ...}}}}, got {optimizer!r}"])
    params = dict(optimizer.get("params") or {})
    kind = str(optimizer.get("type", "adam")).lower()
    ours: dict[str, Any] = {}
    if kind in ("adam", "cpu_adam", "cpu_torch_adam"):
        decoupled = params.pop("adam_w_mode", params.pop("adamw_mode", True))
        ours["type"] = "AdamW" if decoupled is not False else "Adam"
    else:
        out.unsupported.append(f"{src}: optimizer {optimizer.get('type')} has no equivalent (Adam/AdamW only)")
        return
    if "lr" in value:
        out.automatic.append(f"{where['lr']}: GPT-NeoX overwrites a top-level lr with the optimizer's (params.lr)")
    if "weight_decay" in params:
        out.unsupported.append(f"{src}.params.weight_decay: GPT-NeoX takes weight decay from the top-level "
                               "weight_decay key (both given is an error there)")
        params.pop("weight_decay")
    kept = {"lr": params.pop("lr", 0.001), "betas": params.pop("betas", [0.9, 0.999]), "eps": params.pop("eps", 1.0e-8),
            "weight_decay": value.get("weight_decay", 0.1)}
    for key in sorted(params):
        out.unsupported.append(f"{src}.params.{key}: no equivalent optimizer parameter here")
    ours["params"] = kept
    out.set("optimizer", ours, ", ".join(where[k] for k in ("optimizer", "weight_decay") if k in where)
            + " (GPT-NeoX's defaults for what they leave out)")
    out.set("weight_decay_embeddings", True, "GPT-NeoX decays every weight but norms and biases")

PRESET_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size")
COMPARED = ("rotary_emb_base", "rms_norm_epsilon", "seq_length", "max_position_embeddings", "norm", "pos_emb",
            "activation", "no_weight_tying", "use_bias_in_attn_linear", "use_bias_in_mlp", "rotary_pct", "vocab_size")


def looks_like_neox(path: Path) -> list[str]:
    """The keys of ``path`` that only GPT-NeoX uses (or GPT-NeoX's hyphenated spellings); empty when none."""
    try:
        keys = [str(k) for k in read_yaml(path)]
    except ConfigError:
        return []
    return [k for k in keys if k not in OURS and ("-" in k or k in NEOX_KEYS)]


def preset_check(settings: dict) -> tuple[str | None, list[str]]:
    """The preset with the same shape (layers, width, heads, kv heads, MLP width), and every value that differs."""
    from neox_llama.config.loading import read_yaml as read
    from neox_llama.config.presets import CONFIG_DIR, PRESETS

    def shape(cfg: dict) -> tuple:
        heads = cfg.get("num_attention_heads")
        return tuple(cfg.get(k) if k != "num_kv_heads" else (cfg.get(k) or heads) for k in PRESET_KEYS)

    for name, rel in PRESETS.items():
        preset = read(CONFIG_DIR / rel)
        if shape(preset) == shape(settings):
            defaults = {f.name: f.default for f in user_fields(Config)}
            diffs = []
            for key in COMPARED:
                ours, theirs = settings.get(key, defaults.get(key)), preset.get(key, defaults.get(key))
                if key in ("rotary_emb_base", "rms_norm_epsilon") and ours is not None and theirs is not None:
                    same = float(ours) == float(theirs)
                else:
                    same = ours == theirs
                if not same:
                    diffs.append(f"{key}: {ours!r} here, {theirs!r} in {name} ({rel})")
            return name, diffs
    return None, []


def render_yaml(t: Translation, files: list[Path]) -> str:
    """The translated config, one key per line, each with a comment saying where it came from."""
    import yaml

    lines = [f"# translated from GPT-NeoX config(s) {' '.join(str(f) for f in files)} by tools/convert_neox_config.py"]
    order = [f.name for f in user_fields(Config)]
    for key in sorted(t.settings, key=lambda k: order.index(k) if k in order else len(order)):
        value = t.settings[key]
        text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 30).splitlines()[0]
        lines.append(f"{key}: {text}  # {t.origin[key]}")
    return "\n".join(lines) + "\n"

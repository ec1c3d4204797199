"""Cross-checks between keys and the values derived from them (layout, batch sizes, padded vocabulary)."""

from __future__ import annotations

import math
from pathlib import Path

from neox_llama.config.loading import COMMAND_LINE, ConfigError
from neox_llama.config.schema import Config, Derived


class _Problems:
    """Collects one-line problems, each prefixed with the file that set the first key it names."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.lines: list[str] = []

    def add(self, keys: str | tuple[str, ...], message: str) -> None:
        keys = (keys,) if isinstance(keys, str) else keys
        if any(k.split(".")[0] in self.cfg.invalid_keys for k in keys):
            return  # already reported as a bad value; a cross-check on its default would only confuse
        origins = [self.cfg.sources.get(k, "default") for k in keys]
        origin = next((o for o in origins if o != "default"), "default")
        self.lines.append(f"{origin}: {message}")


def _resolve_batch(cfg: Config, dp: int, problems: _Problems, d: Derived) -> None:
    micro, gas, total = cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps, cfg.train_batch_size
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    if total is not None and micro is not None and gas is not None:
        if micro * gas * dp != total:
            problems.add(keys, f"train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
                               f"gradient_accumulation_steps {gas} x data parallel size {dp} (= {micro * gas * dp}); "
                               "set two of the three")
            return
    elif total is not None and micro is not None:
        if total % (micro * dp):
            problems.add(keys[:2], f"train_batch_size {total} is not divisible by train_micro_batch_size_per_gpu "
                                   f"{micro} x data parallel size {dp}")
            return
        gas = total // (micro * dp)
    elif total is not None and gas is not None:
        if total % (gas * dp):
            problems.add((keys[0], keys[2]), f"train_batch_size {total} is not divisible by "
                                             f"gradient_accumulation_steps {gas} x data parallel size {dp}")
            return
        micro = total // (gas * dp)
    elif total is not None:
        if total % dp:
            problems.add(keys[0], f"train_batch_size {total} is not divisible by data parallel size {dp}")
            return
        micro, gas = total // dp, 1
    else:
        micro, gas = micro or 1, gas or 1
    d.train_micro_batch_size_per_gpu, d.gradient_accumulation_steps = micro, gas
    d.train_batch_size = micro * gas * dp


def _check_model(cfg: Config, tp: int, problems: _Problems, d: Derived, tokenizer_vocab: int | None) -> None:
    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if getattr(cfg, key) is None:
            problems.add(key, f"{key} is not set; list a model preset (e.g. configs/llama3/tiny.yml) or set model_name")
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    d.num_kv_heads = cfg.num_kv_heads or heads or 0
    if hidden and heads:
        if hidden % heads:
            problems.add(("hidden_size", "num_attention_heads"),
                         f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        d.head_dim = hidden // heads
        if heads % d.num_kv_heads:
            problems.add(("num_kv_heads", "num_attention_heads"),
                         f"num_attention_heads {heads} is not divisible by num_kv_heads {d.num_kv_heads}")
        if heads % tp:
            problems.add(("model_parallel_size", "num_attention_heads"),
                         f"num_attention_heads {heads} is not divisible by model_parallel_size {tp}")
        if d.num_kv_heads % tp:
            problems.add(("model_parallel_size", "num_kv_heads"),
                         f"num_kv_heads {d.num_kv_heads} is not divisible by model_parallel_size {tp}; "
                         f"use a model_parallel_size that divides {d.num_kv_heads}")
    if cfg.intermediate_size is not None:
        d.intermediate_size = cfg.intermediate_size
    elif cfg.activation == "gelu" and hidden:
        d.intermediate_size = 4 * hidden
    elif hidden:
        problems.add("intermediate_size", "intermediate_size is required with activation swiglu "
                                          "(the Hugging Face value, e.g. 11008 for Llama-2-7B)")
    if d.intermediate_size and d.intermediate_size % tp:
        problems.add(("model_parallel_size", "intermediate_size"),
                     f"intermediate_size {d.intermediate_size} is not divisible by model_parallel_size {tp}")
    if cfg.num_layers and cfg.num_layers < cfg.pipe_parallel_size:
        problems.add(("pipe_parallel_size", "num_layers"),
                     f"num_layers {cfg.num_layers} is smaller than pipe_parallel_size {cfg.pipe_parallel_size}; "
                     "every pipeline stage needs at least one transformer block")
    d.max_position_embeddings = cfg.max_position_embeddings or cfg.seq_length or 0
    if cfg.seq_length and cfg.seq_length > d.max_position_embeddings:
        problems.add(("seq_length", "max_position_embeddings"),
                     f"seq_length {cfg.seq_length} exceeds max_position_embeddings {d.max_position_embeddings} (for a "
                     "longer context raise max_position_embeddings and set rope_scaling, e.g. rope_type linear, yarn "
                     "or llama3 with original_max_position_embeddings the trained length)")
    if cfg.rope_scaling is not None and cfg.pos_emb != "rotary":
        problems.add(("rope_scaling", "pos_emb"), f"rope_scaling needs pos_emb rotary, not {cfg.pos_emb}")
    if cfg.pos_emb == "rotary" and d.head_dim:
        rot = int(d.head_dim * cfg.rotary_pct)
        if rot == 0 or rot % 2:
            problems.add("rotary_pct", f"rotary_pct {cfg.rotary_pct} x head dim {d.head_dim} = {rot} "
                                       "rotary dimensions; it must be a positive even number")
        rs = cfg.rope_scaling
        if rs is not None and rs.rope_type == "longrope":
            for key in ("long_factor", "short_factor"):
                if len(getattr(rs, key)) != rot // 2:
                    problems.add(f"rope_scaling.{key}", f"rope_scaling.{key} has {len(getattr(rs, key))} values; "
                                                        f"longrope needs one per rotary frequency ({rot // 2})")
        if rs is not None and rs.factor is None and rs.rope_type in ("linear", "dynamic", "llama3"):
            problems.add("rope_scaling.factor", f"rope_scaling.factor is required for rope_type {rs.rope_type}")
    vocab = cfg.vocab_size or tokenizer_vocab
    if cfg.vocab_size is not None and tokenizer_vocab is not None and tokenizer_vocab > cfg.vocab_size:
        problems.add(("vocab_size", "vocab_file"), f"vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
                                                   f"{tokenizer_vocab} ids ({cfg.vocab_file}); unset vocab_size to take it from the tokenizer")
    if vocab is not None:
        multiple = cfg.make_vocab_size_divisible_by
        d.padded_vocab_size = math.ceil(vocab / multiple) * multiple
        if d.padded_vocab_size % tp:
            problems.add(("make_vocab_size_divisible_by", "model_parallel_size"),
                         f"padded vocabulary {d.padded_vocab_size} (vocabulary {vocab} rounded up to "
                         f"make_vocab_size_divisible_by {multiple}) is not divisible by model_parallel_size {tp}; "
                         f"set make_vocab_size_divisible_by to a multiple of {tp}")
    elif cfg.vocab_file is None:
        problems.add("vocab_size", "vocab_size is not set and there is no tokenizer (vocab_file) to take it from")


def _sft_and_token_data(cfg: Config, token_key: str) -> str:
    """Both instruction records and token data are set: which file set each, and how to clear the inherited one."""
    sft_from, token_from = cfg.sources.get("sft_data_path", "default"), cfg.sources.get(token_key, "default")
    both = f"sft_data_path (instruction records) and {token_key} (token data, set by {token_from}) are both set; " \
        "train on one of them"
    if token_from == sft_from:
        return f"{both}: remove one of them"
    if token_from == COMMAND_LINE:
        return f"{both}: drop {token_key}=... from the command line to fine-tune on the records"
    clear = f"{token_key}=null on the command line" if sft_from == COMMAND_LINE else \
        f"`{token_key}: null` in {sft_from} (or {token_key}=null on the command line)"
    return f"{both}: to fine-tune on the records, clear the inherited {token_key} with {clear}"


def _check_preference(cfg: Config, problems: _Problems) -> None:
    """Preference tuning (DPO, IPO, KTO, reward models): its data, its settings, and the layouts it runs at
    (docs/finetuning.md)."""
    trains_tokens = [k for k in ("data_path", "train_data_paths", "sft_data_path") if getattr(cfg, k)]
    if cfg.reward_head and ((cfg.preference_loss and cfg.preference_loss != "rm") or trains_tokens):
        what = f"preference_loss {cfg.preference_loss}" if cfg.preference_loss else trains_tokens[0]
        problems.add(("reward_head", "preference_loss" if cfg.preference_loss else trains_tokens[0]),
                     f"reward_head with {what}: a reward model scores sequences instead of predicting tokens, so it "
                     "trains only as one: set preference_loss rm and preference_data_path (pairs)")
    if cfg.preference_valid_data_path and not cfg.preference_data_path:
        problems.add("preference_valid_data_path", "preference_valid_data_path is set but preference_data_path (the "
                                                   "training pairs) is not")
    if bool(cfg.preference_loss) != bool(cfg.preference_data_path):
        problems.add(("preference_loss", "preference_data_path"),
                     "preference_loss and preference_data_path go together: set both (dpo or ipo and the pairs, or kto "
                     "and labelled completions) or neither")
        return
    if not cfg.preference_loss:
        return
    for other in ("sft_data_path", "data_path", "train_data_paths"):
        if getattr(cfg, other):
            problems.add(("preference_data_path", other), f"preference_data_path (pairs) and {other} (set by "
                                                          f"{cfg.sources.get(other, 'default')}) are both set; train on "
                                                          f"the pairs alone: {other}=null")
    if cfg.vocab_file is None:
        problems.add("preference_data_path", "preference_data_path needs a tokenizer to render records "
                                             "(tokenizer_type and vocab_file)")
    if not cfg.load:
        problems.add(("preference_loss", "load"), "preference tuning starts from a trained model, which is also its "
                                                  "reference: set load (e.g. the demo's merged SFT checkpoint)")
    if cfg.dpo_beta <= 0 and cfg.preference_loss != "rm":
        problems.add("dpo_beta", f"dpo_beta must be above 0, got {cfg.dpo_beta:g}")
    if cfg.dpo_label_smoothing >= 0.5:
        problems.add("dpo_label_smoothing", f"dpo_label_smoothing must be below 0.5 (the share of pairs assumed "
                                            f"mislabelled), got {cfg.dpo_label_smoothing:g}")
    if cfg.dpo_label_smoothing and cfg.preference_loss != "dpo":
        problems.add(("dpo_label_smoothing", "preference_loss"), "dpo_label_smoothing (conservative DPO) applies to "
                                                                 f"preference_loss dpo, not {cfg.preference_loss}")
    if cfg.rpo_alpha and cfg.preference_loss in ("kto", "rm"):
        problems.add(("rpo_alpha", "preference_loss"), "rpo_alpha (an SFT term on the chosen answers of pairs) applies "
                                                       f"to preference_loss dpo or ipo, not {cfg.preference_loss}")
    if cfg.rm_margin_key and cfg.preference_loss != "rm":
        problems.add(("rm_margin_key", "preference_loss"), f"rm_margin_key applies to preference_loss rm (a reward "
                                                           f"model), not {cfg.preference_loss}")
    if cfg.preference_loss == "rm" and cfg.preference_reference == "precomputed":
        problems.add(("preference_reference", "preference_loss"), "preference_reference precomputed with "
                                                                  "preference_loss rm: a reward model has no reference "
                                                                  "model; leave preference_reference unset")
    kto_weights = ("kto_desirable_weight", "kto_undesirable_weight")
    if cfg.preference_loss != "kto" and any(getattr(cfg, k) != 1.0 for k in kto_weights):
        key = next(k for k in kto_weights if getattr(cfg, k) != 1.0)
        problems.add((key, "preference_loss"), f"{key} applies to preference_loss kto, not {cfg.preference_loss}")
    if cfg.preference_loss == "kto" and cfg.train_micro_batch_size_per_gpu < 2:
        problems.add(("preference_loss", "train_micro_batch_size_per_gpu"),
                     f"preference_loss kto with train_micro_batch_size_per_gpu {cfg.train_micro_batch_size_per_gpu}: "
                     "KTO's reference point is estimated from each micro-batch's completions paired with other "
                     "prompts, which needs 2 or more; set train_micro_batch_size_per_gpu 2 or more")
    if cfg.preference_reference == "precomputed" and cfg.preference_loss == "kto":
        problems.add(("preference_reference", "preference_loss"),
                     "preference_reference precomputed with preference_loss kto: KTO's mismatched rows pair each "
                     "prompt with another completion of its micro-batch, known only when the batch is drawn; use "
                     "preference_reference model")
    if cfg.pipe_parallel_size > 1:
        problems.add(("preference_loss", "pipe_parallel_size"),
                     f"preference_loss with pipe_parallel_size {cfg.pipe_parallel_size}: a pair's two responses and "
                     "the reference are scored together in one step, which DeepSpeed's pipeline schedule cannot "
                     "run; use pipe_parallel_size 1 (tensor and data parallel, ZeRO 0-3)")
    if cfg.preference_loss == "rm" and cfg.peft_method in ("adapter", "adapter_v2"):
        problems.add(("preference_loss", "peft_method"),
                     f"preference_loss rm with peft_method {cfg.peft_method}: a reward model trains its score head "
                     "with LoRA (lora_r) or fully; use one of those")
    elif cfg.peft_method == "adapter_v2":
        problems.add(("preference_loss", "peft_method"),
                     "preference tuning with peft_method adapter_v2: it trains the base's norms, so the base with the "
                     "adapters switched off is not the reference; use lora_r or peft_method adapter")


def _check_finetune(cfg: Config, problems: _Problems) -> None:
    from neox_llama.config.freeze import FreezeError, parse_freeze

    if cfg.sft_data_path and (cfg.data_path or cfg.train_data_paths):
        token_key = "data_path" if cfg.data_path else "train_data_paths"
        problems.add(("sft_data_path", token_key), _sft_and_token_data(cfg, token_key))
    if cfg.sft_valid_data_path and not cfg.sft_data_path:
        problems.add("sft_valid_data_path", "sft_valid_data_path is set but sft_data_path (the training records) is not")
    if cfg.sft_valid_data_path and "val_split_fraction" in cfg.sources:
        problems.add(("val_split_fraction", "sft_valid_data_path"),
                     "val_split_fraction splits sft_data_path only when there is no sft_valid_data_path; set one of them")
    if cfg.sft_data_path and cfg.vocab_file is None:
        problems.add("sft_data_path", "sft_data_path needs a tokenizer to render records (tokenizer_type and vocab_file)")
    _check_preference(cfg, problems)
    for kind in ("train", "valid", "test"):
        labels, paths = getattr(cfg, f"{kind}_label_data_paths"), getattr(cfg, f"{kind}_data_paths")
        if labels and len(labels) != len(paths):
            problems.add(f"{kind}_label_data_paths", f"{kind}_label_data_paths has {len(labels)} entries but "
                                                     f"{kind}_data_paths has {len(paths)}; give one label dataset per "
                                                     "token dataset")
    try:
        parse_freeze(cfg.freeze, cfg.num_layers or 0)
    except FreezeError as err:
        problems.add("freeze", str(err))
    if cfg.lora_r:
        if not cfg.load:
            problems.add(("lora_r", "load"), f"lora_r {cfg.lora_r} adapts a trained base: set load (the base "
                                             "checkpoint, or a LoRA checkpoint to resume)")
        if not cfg.lora_targets:
            problems.add("lora_targets", "lora_targets is empty; list query, key, value, output, mlp, gate, up, down or head")
        if "head" in cfg.lora_targets and not cfg.no_weight_tying:
            problems.add(("lora_targets", "no_weight_tying"),
                         "lora_targets head is refused while the head is tied to the embedding (no_weight_tying: "
                         "false): merging its update would change the embedding too; drop head from lora_targets")
        if cfg.freeze:
            problems.add(("freeze", "lora_r"), "freeze is for full fine-tuning; with lora_r > 0 the whole base is "
                                               "frozen already (choose the adapted matrices with lora_targets)")
        if cfg.lora_alpha <= 0:
            problems.add("lora_alpha", f"lora_alpha {cfg.lora_alpha} must be positive")
    if cfg.peft_method != "lora":
        method = cfg.peft_method
        if cfg.lora_r:
            problems.add(("peft_method", "lora_r"), f"peft_method {method} with lora_r {cfg.lora_r}: choose one method "
                                                    "(lora_r 0 for the adapter, or peft_method lora)")
        if not cfg.load:
            problems.add(("peft_method", "load"), f"peft_method {method} adapts a trained base: set load (the base "
                                                  "checkpoint, or an adapter checkpoint to resume)")
        if cfg.freeze:
            problems.add(("freeze", "peft_method"), f"freeze is for full fine-tuning; with peft_method {method} the "
                                                    "base is frozen already")
        if cfg.num_layers is not None and cfg.adapter_start_layer >= cfg.num_layers:
            problems.add("adapter_start_layer", f"adapter_start_layer {cfg.adapter_start_layer} is not a block of the "
                                                f"model (blocks 0-{cfg.num_layers - 1})")


def _check_training(cfg: Config, problems: _Problems, d: Derived) -> None:
    _check_finetune(cfg, problems)
    pp, zero = cfg.pipe_parallel_size, cfg.zero_optimization.stage
    if pp > 1 and zero > 1:
        problems.add(("zero_optimization.stage", "pipe_parallel_size"),
                     f"zero_optimization.stage {zero} with pipe_parallel_size {pp}: DeepSpeed supports only "
                     "ZeRO 0-1 with pipeline parallelism (gradients are reduced per stage); use stage 1, "
                     "or pipe_parallel_size 1 for ZeRO 2/3")
    if pp > 1 and zero == 0:
        problems.add(("zero_optimization.stage", "pipe_parallel_size"),
                     f"zero_optimization.stage 0 with pipe_parallel_size {pp}: use stage 1 with a pipeline (DeepSpeed "
                     "0.19 miscomputes the clipping norm of fp32 pipelines at stage 0 and cannot reload bf16 ones)")
    if cfg.zero_optimization.offload_param == "cpu" and zero != 3:
        problems.add("zero_optimization.offload_param", "zero_optimization.offload_param needs ZeRO stage 3")
    if cfg.zero_optimization.offload_optimizer != "none" and zero == 0:
        problems.add("zero_optimization.offload_optimizer", "zero_optimization.offload_optimizer needs ZeRO stage >= 1")
    if cfg.zero_optimization.offload_optimizer != "none" and cfg.optimizer.params.torch_adam:
        problems.add(("zero_optimization.offload_optimizer", "optimizer.params.torch_adam"),
                     "zero_optimization.offload_optimizer steps with DeepSpeedCPUAdam: leave optimizer.params.torch_adam "
                     "unset (or false)")
    nvme = [k for k in ("offload_optimizer", "offload_param") if getattr(cfg.zero_optimization, k) == "nvme"]
    if nvme and zero != 3:
        problems.add((f"zero_optimization.{nvme[0]}", "zero_optimization.stage"),
                     f"zero_optimization.{nvme[0]} nvme needs ZeRO stage 3 (ZeRO-Infinity)")
    if nvme and not cfg.zero_optimization.nvme_path:
        problems.add(("zero_optimization.nvme_path", f"zero_optimization.{nvme[0]}"),
                     f"zero_optimization.{nvme[0]} nvme needs zero_optimization.nvme_path (a folder on a local NVMe drive)")
    if cfg.compile and zero == 3:
        problems.add(("compile", "zero_optimization.stage"),
                     "compile: true with zero_optimization.stage 3: ZeRO-3 gathers each layer's weights in module hooks "
                     "that torch.compile cannot trace; use ZeRO 1/2, or compile: false")
    betas = cfg.optimizer.params.betas
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        problems.add("optimizer.params.betas", f"optimizer.params.betas {betas} must be two numbers in [0, 1)")
    if cfg.min_lr > cfg.optimizer.params.lr:
        problems.add(("min_lr", "optimizer.params.lr"),
                     f"min_lr {cfg.min_lr} is above the peak rate optimizer.params.lr {cfg.optimizer.params.lr}")
    d.lr_decay_iters = cfg.lr_decay_iters or max(cfg.train_iters, 1)
    d.warmup_iters = cfg.warmup_iters if cfg.warmup_iters is not None else int(cfg.warmup * d.lr_decay_iters)
    if cfg.finetune and not cfg.load:
        problems.add("finetune", "finetune is true but load (the checkpoint to start from) is not set")
    for kind in ("train", "valid", "test"):
        paths, weights = getattr(cfg, f"{kind}_data_paths"), getattr(cfg, f"{kind}_data_weights")
        if weights and len(weights) != len(paths):
            problems.add(f"{kind}_data_weights", f"{kind}_data_weights has {len(weights)} entries but "
                                                 f"{kind}_data_paths has {len(paths)}")
    method = cfg.pipe_partition_method
    if not (method in ("parameters", "uniform") or (method.startswith("type:") and len(method) > 5)):
        problems.add("pipe_partition_method", f"pipe_partition_method '{method}' must be parameters, uniform or "
                                              "type:REGEX (e.g. type:TransformerBlock)")
    if cfg.reset_attention_mask and not cfg.reset_position_ids:
        problems.add("reset_attention_mask", "reset_attention_mask needs reset_position_ids: true (document "
                                             "boundaries reach the attention as position resets)")
    if cfg.data_path and cfg.train_data_paths:
        problems.add(("data_path", "train_data_paths"), "set data_path (split by `split`) or train_data_paths, not both")
    parts = cfg.split.replace("/", ",").split(",")
    try:
        numbers = [float(p) for p in parts]
        if len(numbers) > 3 or any(n < 0 for n in numbers) or sum(numbers) <= 0:
            raise ValueError
    except ValueError:
        problems.add("split", f"split '{cfg.split}' must be up to three non-negative numbers like '969,30,1'")
    if cfg.eval_tasks:
        if pp > 1 or cfg.model_parallel_size > 1:
            problems.add(("eval_tasks", "pipe_parallel_size", "model_parallel_size"),
                         f"eval_tasks runs lm-eval on the training model without pipeline or tensor parallelism "
                         f"(here pipe_parallel_size {pp}, model_parallel_size {cfg.model_parallel_size}); drop "
                         "eval_tasks and evaluate the checkpoints with tools/evaluate.py --tasks")
        if cfg.eval_iters == 0:
            problems.add(("eval_tasks", "eval_iters"), "eval_tasks run at every evaluation, but eval_iters 0 turns "
                                                       "evaluation off; set eval_iters >= 1")
        if cfg.eval_tasks_limit is not None and cfg.eval_tasks_limit < d.data_parallel_size:
            problems.add(("eval_tasks_limit",), f"eval_tasks_limit {cfg.eval_tasks_limit} is below the data parallel "
                                                f"size {d.data_parallel_size}: every rank needs a document of each task")
        if cfg.tokenizer_type is None:
            problems.add("eval_tasks", "eval_tasks needs a tokenizer (tokenizer_type and vocab_file) to encode the "
                                       "tasks' text")
        if cfg.eval_tasks_include_path and not Path(cfg.eval_tasks_include_path).is_dir():
            problems.add("eval_tasks_include_path", f"eval_tasks_include_path {cfg.eval_tasks_include_path}: no such "
                                                    "folder (it holds local lm-eval task YAMLs)")
    if cfg.vocab_file is not None and cfg.tokenizer_type is None:
        problems.add(("tokenizer_type", "vocab_file"),
                     "vocab_file is set but tokenizer_type is not (SPMTokenizer, Llama3Tokenizer or HFTokenizer)")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512-BF16 or AMX); False where it cannot tell."""
    try:
        flags = next((line for line in open(cpuinfo, encoding="utf-8") if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(accelerator: str, bf16_supported: bool = True) -> str:
    """``precision: auto``: bf16 on a GPU with bf16 and on a CPU with native bf16, else fp32."""
    if accelerator == "cuda":
        return "bf16" if bf16_supported else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def resolve(cfg: Config, world_size: int, accelerator: str = "cpu", *, tokenizer_vocab: int | None = None,
            bf16_supported: bool = True) -> Config:
    """Check ``cfg`` against itself and the world it will run in; fill ``cfg.derived``.

    ``accelerator`` is ``"cuda"`` or ``"cpu"``; ``tokenizer_vocab`` is the size of the tokenizer in
    ``vocab_file`` when it was read; ``bf16_supported`` is False on GPUs without bf16 (V100, T4).
    Raises ConfigError listing every problem found.
    """
    problems = _Problems(cfg)
    if cfg.precision == "auto":
        cfg.precision = auto_precision(accelerator, bf16_supported)
    d = Derived(world_size=world_size)
    pp, tp = cfg.pipe_parallel_size, cfg.model_parallel_size
    if world_size % (pp * tp):
        problems.add(("pipe_parallel_size", "model_parallel_size", "num_gpus"),
                     f"world size {world_size} is not divisible by pipe_parallel_size {pp} x "
                     f"model_parallel_size {tp}; use a multiple of {pp * tp} ranks (num_gpus)")
        d.data_parallel_size = 1
    else:
        d.data_parallel_size = world_size // (pp * tp)
    _check_model(cfg, tp, problems, d, tokenizer_vocab)
    _resolve_batch(cfg, d.data_parallel_size, problems, d)
    _check_training(cfg, problems, d)
    if cfg.precision == "fp16" and accelerator != "cuda":
        problems.add("precision", "precision fp16 needs a GPU (DeepSpeed has no fp16 kernels on CPU); "
                                  "use bf16 or fp32 here")
    if cfg.precision == "bf16" and not bf16_supported:
        problems.add("precision", "precision bf16 is not supported by this GPU; use fp16 (or fp32)")
    if problems.lines:
        raise ConfigError(problems.lines)
    d.engine_zero_stage = engine_zero_stage(cfg, world_size)
    cfg.derived = d
    return cfg


def engine_zero_stage(cfg: Config, world_size: int) -> int:
    """The ZeRO stage to give DeepSpeed. ZeRO 1 and 2 partition optimizer state and gradients over data-parallel
    ranks; on one rank there is nothing to partition, yet in fp32 DeepSpeed's ZeRO optimizer still keeps a flat
    fp32 copy of every weight and copies each gradient into it (15 % of a step at the benchmark shape,
    docs/benchmarks.md). So a one-rank fp32 run at stage 1 or 2 runs stage 0, unless it offloads (offload needs
    ZeRO). Mixed precision keeps its stage: DeepSpeed needs ZeRO >= 1 for fp32 gradient accumulation of bf16
    weights (its BF16_Optimizer), and fp16 is not measured here.
    """
    zero = cfg.zero_optimization
    offloads = zero.offload_optimizer != "none" or zero.offload_param != "none"
    if world_size == 1 and cfg.precision == "fp32" and zero.stage in (1, 2) and not offloads:
        return 0
    return zero.stage


def zero_text(cfg: Config, runs: int | None = None) -> str:
    """The configured ZeRO stage, and the one DeepSpeed runs (``runs``; None: ``derived.engine_zero_stage``) where
    they differ."""
    stage = cfg.zero_optimization.stage
    runs = cfg.derived.engine_zero_stage if runs is None else runs
    return str(stage) if stage == runs else f"{stage} (runs as {runs}: one rank has nothing to partition in fp32)"

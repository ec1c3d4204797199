"""Checks deepy.py runs before any rank starts, so that a mistake costs seconds, not a model build.

- every dataset prefix exists and is readable, and its largest token id fits the model's vocabulary;
- a resume target's tensors have the shapes this config builds (safetensors headers only), and a fine-tune
  beyond the context the checkpoint was trained for sets rope_scaling;
- on a machine without GPUs, where every rank lives in host memory, the node's estimated total fits its RAM, and
  its ranks' threads fit its cores (more than one thread per core warns, more than 4 refuses);
- NVMe offload can run: DeepSpeed's async_io op builds here and ``nvme_path`` is a writable folder;
- ``master_port`` is free where rank 0 listens (:func:`neox_llama.planning.launch.choose_master_port`).

Each returns one-line problems naming the file or key; :func:`run_checks` gathers them and :meth:`Checks.verdict`
says which refuse a launch: ``--force`` overrides the memory and core checks, ``--dry-run`` prints everything as
warnings, and a multi-node launch only warns about files (they are the nodes', not this machine's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from neox_llama.config.loading import ConfigError
from neox_llama.config.schema import Config
from neox_llama.errors import NeoxLlamaError
from neox_llama.planning.launch import LaunchPlan, choose_master_port, threads_per_rank, usable_cores

GIB = 1024**3
OVERSUBSCRIPTION_REFUSED = 4
"""CPU threads per core beyond which a launch is refused without ``--force``."""


@dataclass
class Checks:
    """What the checks before a launch found, by how the launch treats each."""

    files: list[str] = field(default_factory=list)
    """Datasets, a resume target, NVMe offload: refuse a launch on this machine; only warn for other nodes."""
    machine: list[str] = field(default_factory=list)
    """This machine's memory and cores: refuse unless ``--force``."""
    launch: list[str] = field(default_factory=list)
    """The launch itself cannot start (a taken ``master_port`` on several nodes)."""
    notes: list[str] = field(default_factory=list)
    """Warnings that never refuse (a machine oversubscribed up to OVERSUBSCRIPTION_REFUSED threads per core)."""
    master_port: int | None = None
    """The port rank 0 listens on (``master_port``, or a free one where that is taken on one node)."""
    port_note: str | None = None
    """The line saying which port replaced a taken ``master_port`` (said when the launch goes ahead)."""
    multi_node: bool = False

    def verdict(self, dry_run: bool, force: bool) -> tuple[list[str], list[str]]:
        """(errors that refuse the launch, warnings) for a launch with these flags."""
        port = [self.port_note] if self.port_note else []
        if dry_run:  # a plan, perhaps for another machine: everything is said, nothing refused
            return [], self.notes + self.files + self.machine + self.launch + port
        errors = self.launch + ([] if self.multi_node else self.files) + ([] if force else self.machine)
        warnings = self.notes + (self.files if self.multi_node else [])
        warnings += [f"{line} (--force: starting anyway)" for line in self.machine] if force else []
        return errors, warnings + ([] if errors else port)


def run_checks(cfg: Config, plan: LaunchPlan, vocab: int | None, accelerator: str) -> Checks:
    """Every check deepy.py runs before a launch; the machine's memory and cores only for CPU ranks that run here."""
    found = Checks(files=check_datasets(cfg, vocab) + check_resume_target(cfg) + check_offload(cfg),
                   multi_node=plan.multi_node)
    if accelerator == "cpu" and not plan.multi_node:
        found.notes, refused = check_cpu_load(cfg, plan)
        found.machine = refused + check_host_memory(cfg, plan.ranks_per_node)
    try:
        found.master_port, found.port_note = choose_master_port(cfg, plan)
    except ConfigError as err:
        found.launch = err.problems
    return found


def check_cpu_load(cfg: Config, plan: LaunchPlan, cores: int | None = None) -> tuple[list[str], list[str]]:
    """(warnings, refusals) for the CPU ranks of this machine: their threads (``omp_num_threads``, or the cores
    shared out, at least one per rank) against its cores; above one per core warns, above
    OVERSUBSCRIPTION_REFUSED refuses."""
    cores = cores or usable_cores()
    ranks, threads = plan.ranks_per_node, threads_per_rank(cfg, plan)
    load = ranks * threads / cores
    if load <= 1:
        return [], []
    if cfg.omp_num_threads and ranks <= cores:
        key, value = "omp_num_threads", cfg.omp_num_threads
        fix = f"omp_num_threads {max(1, cores // ranks)} or less"
    elif cfg.num_gpus:
        key, value = "num_gpus", cfg.num_gpus
        fix = f"at most {cores // threads or 1} ranks (num_gpus)"
    else:
        key, value = "pipe_parallel_size", cfg.pipe_parallel_size
        fix = f"at most {cores} ranks (pipe_parallel_size x model_parallel_size)"
    said = (f"{cfg.sources.get(key, 'default')}: {key} {value}: {ranks} CPU rank(s) x {threads} thread(s) each on "
            f"this machine's {cores} core(s) is {load:.1f}x oversubscribed")
    if load <= OVERSUBSCRIPTION_REFUSED:
        return [f"{said}; the ranks take turns on the cores, so every step is slower than with {fix}"], []
    return [], [f"{said} (more than {OVERSUBSCRIPTION_REFUSED}x is refused: the ranks would spend their time waiting "
                f"for each other); use {fix}, or pass --force to start anyway"]


def _prefixes(cfg: Config) -> list[tuple[str, str]]:
    """(key, prefix) of every dataset the run reads."""
    out = [("data_path", cfg.data_path)] if cfg.data_path else []
    for kind in ("train", "valid", "test"):
        out += [(f"{kind}_data_paths", p) for p in getattr(cfg, f"{kind}_data_paths")]
    return out


def check_datasets(cfg: Config, vocab: int | None) -> list[str]:
    """Each dataset opens (index and data agree) and holds no token id >= ``vocab`` (a memory-mapped scan), and
    ``split`` leaves ``data_path``'s training split at least one document."""
    from neox_llama.data.indexed import IndexedDataset
    from neox_llama.data.loader import split_documents

    problems = []
    for key, prefix in _prefixes(cfg):
        origin = cfg.sources.get(key, "default")
        try:
            dataset = IndexedDataset(prefix)
            top = dataset.max_token_id()
        except (NeoxLlamaError, OSError) as err:
            problems.append(f"{origin}: {key}: {err}")
            continue
        if key == "data_path":
            try:
                split_documents(cfg, len(dataset))
            except NeoxLlamaError as err:
                problems.append(str(err))
        if vocab is not None and top is not None and top >= vocab:
            problems.append(f"{origin}: {key}: {prefix}.bin holds token id {top}, but the model's vocabulary has "
                            f"{vocab} ids (0-{vocab - 1}); the data was made with another tokenizer: preprocess it "
                            f"with this run's tokenizer ({cfg.vocab_file or 'vocab_size ' + str(vocab)})")
    return problems


def check_resume_target(cfg: Config) -> list[str]:
    """When ``load`` holds a checkpoint, its weights fit the model this config builds."""
    if not cfg.load:
        return []
    from pathlib import Path

    from neox_llama.checkpoint.paths import LATEST, METADATA, CheckpointError, resolve_checkpoint
    from neox_llama.checkpoint.weights import check_shapes, is_reward_checkpoint
    from neox_llama.model.args import LlamaArgs

    try:
        folder = resolve_checkpoint(cfg.load)
    except CheckpointError as err:
        if Path(cfg.load, LATEST).exists() or Path(cfg.load, METADATA).exists():  # not ours, or incomplete
            return [f"{cfg.sources.get('load', 'default')}: load: {err}"]
        return []  # nothing saved yet (a fresh run); finetune without a checkpoint is reported elsewhere
    from neox_llama.checkpoint.adapter import resolve_base
    from neox_llama.checkpoint.metadata import read_metadata

    try:
        meta = read_metadata(folder)
        if meta.is_adapter:  # a LoRA checkpoint: its base holds the weights
            folder = resolve_base(folder, meta)
        args = LlamaArgs.from_config(cfg)  # a reward model may start its score head over a language model's head
        fresh = bool(args.num_labels) and bool(cfg.finetune or meta.is_adapter) and not is_reward_checkpoint(folder)
        check_shapes(folder, args, fresh_score=fresh)
        if cfg.finetune and cfg.rope_scaling is None:
            trained = _trained_context(folder)
            if trained and cfg.seq_length > trained:
                return [f"{cfg.sources.get('seq_length', 'default')}: seq_length {cfg.seq_length} is beyond the "
                        f"max_position_embeddings {trained} that {folder} was trained for, without rope_scaling: set "
                        f"rope_scaling (e.g. {{rope_type: yarn, factor: {-(-cfg.seq_length // trained)}, "
                        f"original_max_position_embeddings: {trained}}}) and max_position_embeddings {cfg.seq_length}"]
    except CheckpointError as err:
        return [f"{cfg.sources.get('load', 'default')}: load: {err}"]
    return []


def _trained_context(folder) -> int | None:
    """The ``max_position_embeddings`` (else ``seq_length``) in a checkpoint's saved config, read without validating
    it here (a base trained on GPUs with fp16 is still a valid base on this machine); None when it does not say."""
    from neox_llama.config.loading import ConfigError, load_raw

    try:
        raw, _ = load_raw([folder / "config.yml"], apply_presets=False)
    except (ConfigError, OSError):
        return None
    value = raw.get("max_position_embeddings") or raw.get("seq_length")
    return value if isinstance(value, int) else None


def check_offload(cfg: Config) -> list[str]:
    """NVMe offload: DeepSpeed's async_io op can be built here (it needs libaio), and nvme_path is a writable folder."""
    zero = cfg.zero_optimization
    keys = [k for k in ("offload_optimizer", "offload_param") if getattr(zero, k) == "nvme"]
    if not keys:
        return []
    origin = cfg.sources.get(f"zero_optimization.{keys[0]}", "default")
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        return [f"{origin}: zero_optimization.{keys[0]}: nvme needs DeepSpeed's async_io op, which cannot be built on "
                "this machine (install libaio-dev, e.g. apt install libaio-dev); or offload to cpu"]
    path = zero.nvme_path
    if path and not (os.path.isdir(path) and os.access(path, os.W_OK)):
        return [f"{cfg.sources.get('zero_optimization.nvme_path', origin)}: zero_optimization.nvme_path {path}: not "
                "a writable folder"]
    return []


def host_memory_bytes() -> int | None:
    """Total RAM of this machine, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_host_memory(cfg: Config, ranks_on_node: int, total: int | None = None) -> list[str]:
    """On CPU, the ranks of one node share its RAM: refuse a launch whose estimate exceeds it."""
    from neox_llama.planning.memory import estimate_memory

    total = host_memory_bytes() if total is None else total
    if not total or cfg.derived.padded_vocab_size is None:
        return []
    estimate = estimate_memory(cfg)
    need = estimate.total * ranks_on_node
    if need <= total:
        return []
    knobs = [] if cfg.checkpoint_activations else ["checkpoint_activations: true"]
    knobs += ["a smaller train_micro_batch_size_per_gpu or seq_length", "a smaller model (e.g. a tiny preset)"]
    knobs += [f"fewer ranks on this machine (num_gpus {ranks_on_node})"] if ranks_on_node > 1 else []
    knobs += [f"fewer data-loader workers (num_workers {cfg.num_workers})"] if cfg.num_workers else []
    if cfg.precision == "fp32":
        knobs.insert(0, "precision: bf16")
    return [f"{cfg.sources.get('num_layers', 'default')}: the {ranks_on_node} rank(s) on this machine need about "
            f"{need / GIB:,.1f} GiB of host memory ({estimate.total / GIB:,.1f} GiB each: {estimate.text()}), but it "
            f"has {total / GIB:,.1f} GiB; lower it with {', '.join(knobs)}, or pass --force to start anyway"]

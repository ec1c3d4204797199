"""Opening a checkpoint as a run (its config and tokenizer), and as a model ready to use on one device."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neox_llama.checkpoint.metadata import Metadata, read_metadata
from neox_llama.checkpoint.paths import CheckpointError, resolve_checkpoint
from neox_llama.checkpoint.weights import fill_layer, fill_layers
from neox_llama.config import Config, ConfigError, resolve
from neox_llama.config.loading import build_config, load_raw
from neox_llama.model.args import LlamaArgs
from neox_llama.model.llama import Llama, RotaryEmbedding, build_model
from neox_llama.tokenizers import Tokenizer, TokenizerError, build_tokenizer


@dataclass
class Run:
    """A checkpoint folder's metadata, config, tokenizer and model arguments: everything but the tensors."""

    folder: Path
    metadata: Metadata
    cfg: Config
    tokenizer: Tokenizer | None
    args: LlamaArgs
    true_vocab: int
    """The tokenizer's vocabulary before padding (padded rows are trimmed on export and in generation)."""
    adapters: list = field(default_factory=list)
    """LoRA checkpoints (:class:`neox_llama.checkpoint.merge.Adapter`) applied on top of this base."""

    @property
    def prompt_style(self) -> str | None:
        """The prompt style the (last applied) adapter, or this checkpoint, was trained in."""
        for adapter in reversed(self.adapters):
            if adapter.metadata.prompt_style:
                return adapter.metadata.prompt_style
        return self.metadata.prompt_style


def load_run(path: str | Path, adapters: list[str | Path] | None = None, base: str | Path | None = None,
             force: bool = False) -> Run:
    """Read a self-describing checkpoint (a save dir through ``latest``, or one ``global_stepN`` / ``best``).

    The tokenizer is the file saved inside the checkpoint, built once; the config is validated for the
    world size that saved it. A LoRA checkpoint opens as its base (found through its metadata, or ``base``)
    with the adapter in :attr:`Run.adapters`; ``adapters`` adds LoRA checkpoints to apply on ``path``, each
    checked against the base's fingerprint (``force`` accepts another).
    """
    from neox_llama.checkpoint.merge import Adapter, find_base

    folder = resolve_checkpoint(path)
    meta = read_metadata(folder)
    if meta.is_adapter or adapters:
        chain = [Adapter.open(folder)] if meta.is_adapter else []
        chain += [Adapter.open(a) for a in adapters or []]
        base_folder = find_base(chain, base if base is not None else (None if meta.is_adapter else folder), force)
        run = load_run(base_folder)
        run.adapters = chain
        if any((a.metadata.preference or {}).get("loss") == "rm" for a in chain):  # a LoRA reward model
            run.args = dataclasses.replace(run.args, num_labels=1)
        return run
    config_file = folder / "config.yml"
    tokenizer = None
    try:
        raw, sources = load_raw([config_file], apply_presets=False)
        if meta.tokenizer_files and raw.get("tokenizer_type"):
            # The tokenizer saved inside the checkpoint, whatever path the run read it from.
            local = folder / meta.tokenizer_files[0]
            raw["vocab_file"], sources["vocab_file"] = str(local), str(folder)
            tokenizer = build_tokenizer(raw["tokenizer_type"], local)
        problems: list[str] = []
        cfg = build_config(raw, sources, problems=problems)
        if problems:
            raise ConfigError(problems)
        resolve(cfg, meta.layout.world_size, tokenizer_vocab=tokenizer.vocab_size if tokenizer else None)
    except (ConfigError, TokenizerError) as err:
        raise CheckpointError(f"{config_file}: {err}") from None
    args = LlamaArgs.from_config(cfg)
    true_vocab = cfg.vocab_size or (tokenizer.vocab_size if tokenizer else args.vocab_size)
    return Run(folder, meta, cfg, tokenizer, args, true_vocab)


def _attach_adapter(layers: dict[int, torch.nn.Module], run: Run, expected: set[int]) -> None:
    """The base's weights with one Adapter / Adapter v2 checkpoint attached as modules (its prompt cannot be
    merged into plain weights)."""
    from neox_llama.checkpoint.adapter import fill_adapters
    from neox_llama.checkpoint.merge import lone_adapter
    from neox_llama.model.factory import SINGLE_DEVICE
    from neox_llama.peft.methods import apply_peft

    adapter = lone_adapter(run.adapters)
    fill_layers(layers, run.folder, expected=expected)
    apply_peft(layers, adapter.settings, SINGLE_DEVICE, run.args, seed=0)
    fill_adapters(layers, adapter.folder, adapter.settings)


def reset_buffers(model: torch.nn.Module) -> None:
    """Recompute the buffers that are not saved (rotary frequencies) after a meta-device build."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset()


def load_model(path: str | Path | Run, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> tuple[Llama, Run]:
    """The checkpoint's model on one device in eval mode, built on the meta device and filled from its weights
    (a LoRA checkpoint, or a Run with adapters: the base with every adapter merged in, layer by layer; an Adapter
    or Adapter v2 checkpoint: the base with its modules attached and filled).

    Every tensor's name and shape is checked against the config, and no weight file may be left over;
    ``dtype`` None gives float32 (whatever precision the run trained in), else the model is cast to ``dtype``.
    """
    run = path if isinstance(path, Run) else load_run(path)
    model = build_model(run.args, device="meta", initialize=False)
    model = model.to_empty(device=device)
    reset_buffers(model)
    layers = {int(i): layer for i, layer in model.named_children()}
    expected = {i for i, m in layers.items() if next(m.parameters(), None) is not None}
    if run.adapters and not all(a.is_lora for a in run.adapters):
        _attach_adapter(layers, run, expected)
    elif run.adapters:  # merged as tools/merge_lora.py merges, so generation equals the merged checkpoint's
        from neox_llama.checkpoint.merge import merged_layers

        found = set()
        for index, tensors in merged_layers(run.folder, run.adapters):
            if index not in layers or index not in expected:
                raise CheckpointError(f"{run.folder}: weights for layer {index}, which the model does not have")
            fill_layer(layers[index], tensors, run.folder / "weights")
            found.add(index)
        if found != expected:
            raise CheckpointError(f"{run.folder}: no weights for layer {min(expected - found)}")
    else:
        fill_layers(layers, run.folder, expected=expected)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), run

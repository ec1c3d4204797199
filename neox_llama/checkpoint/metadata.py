"""``metadata.json``: what a checkpoint is (step, data position, layout, tokenizer files); one reader, one writer."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from neox_llama.checkpoint.paths import METADATA, CheckpointError
from neox_llama.utils.files import atomic_write_text

FORMAT_VERSION = 1


@dataclass
class Layout:
    """The parallel layout that saved the checkpoint (a resume at another one says so; DeepSpeed's engine files of
    an older checkpoint load only at this layout)."""

    pipe_parallel_size: int = 1
    model_parallel_size: int = 1
    data_parallel_size: int = 1
    zero_stage: int = -1
    """The ZeRO stage DeepSpeed ran (the load plan's: ``derived.engine_zero_stage``, 0 for one fp32 rank at ZeRO 1
    or 2, unless a resumed checkpoint kept its own stage); -1: no engine state (e.g. a Hugging Face import)."""
    world_size: int = 1


@dataclass
class BaseRef:
    """The checkpoint a fine-tune started from: its folder and fingerprint (see checkpoint/adapter.py)."""

    path: str
    fingerprint: str


@dataclass
class Metadata:
    """The contents of ``metadata.json``."""

    tag: str
    step: int = 0
    consumed_samples: int = 0
    """Training samples consumed over all data-parallel ranks (the data position to resume at)."""
    consumed_valid_samples: int = 0
    """Validation samples read so far (evaluations walk on through the validation set)."""
    best_valid_loss: float | None = None
    evaluations_without_improvement: int = 0
    layout: Layout = field(default_factory=Layout)
    tokenizer_files: list[str] = field(default_factory=list)
    precision: str = "fp32"
    converted_from: str | None = None
    prompt_style: str | None = None
    """The prompt style instruction data was rendered in (generation and chat default to it)."""
    base: BaseRef | None = None
    """A fine-tune's starting checkpoint; for a LoRA checkpoint, the base its adapter applies to."""
    lora: dict | None = None
    """A LoRA checkpoint's settings (r, alpha, dropout, targets); its tensors are in adapter/, not weights/."""
    adapter: dict | None = None
    """An Adapter / Adapter v2 checkpoint's settings (method, prompt_length, start_layer, gate); its tensors are in
    adapter/, not weights/."""
    merged_from: list[dict] | None = None
    """tools/merge_lora.py: the adapters (path, fingerprint, weight) merged into this checkpoint's weights."""
    preference: dict | None = None
    """A preference-tuned checkpoint's method: loss (dpo, ipo), beta, label_smoothing, rpo_alpha and the reference
    (``base_without_adapters`` or ``frozen_copy``, of ``base``)."""
    format: int = FORMAT_VERSION

    @property
    def is_adapter(self) -> bool:
        return self.lora is not None or self.adapter is not None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def read_metadata(folder: Path) -> Metadata:
    """Read and check ``folder/metadata.json``."""
    path = Path(folder) / METADATA
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        found = data.get("format") if isinstance(data, dict) else None
        raise CheckpointError(f"{path}: format {found}, expected {FORMAT_VERSION}")
    known = {f.name for f in fields(Metadata)}
    try:
        layout = Layout(**data.get("layout", {}))
        base = BaseRef(**data["base"]) if data.get("base") else None
        return Metadata(**{k: v for k, v in data.items() if k in known and k not in ("layout", "base")},
                        layout=layout, base=base)
    except TypeError as err:
        raise CheckpointError(f"{path}: malformed ({err})") from None


def write_metadata(folder: Path, meta: Metadata) -> Path:
    """Write ``folder/metadata.json`` atomically; the checkpoint counts as complete from then on."""
    return atomic_write_text(Path(folder) / METADATA, meta.to_json())

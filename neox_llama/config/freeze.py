"""``freeze``: the rules of which parameters a full fine-tune keeps fixed (``requires_grad`` off, so out of the optimizer).

Parsed here, in the configuration floor (torch-free, so that validation can check the entries); applied to
the built model by :mod:`neox_llama.peft.freeze`.

Entries (``freeze: [embeddings, "layers.0-11", "layers.20.mlp"]``):

- ``embeddings``: the token (and learned position) embedding; with a tied head this is the head too;
- ``head``: the output head (with a tied head: the embedding matrix, the same tensor);
- ``final_norm``: the norm after the last block;
- ``norms``, ``attention``, ``mlp``: those parts of every block (``norms`` also the final norm);
- ``layers.I`` or ``layers.I-J``: transformer blocks I..J (inclusive, counted from 0), whole, or only their
  ``.attention``, ``.mlp`` or ``.norms`` with that suffix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from neox_llama.errors import NeoxLlamaError

PARTS = {"attention": ("attention.",), "mlp": ("mlp.",), "norms": ("input_norm.", "post_attention_norm.")}
GROUPS = ("embeddings", "head", "final_norm", "norms", "attention", "mlp")
_LAYERS = re.compile(r"layers\.(\d+)(?:-(\d+))?(?:\.(attention|mlp|norms))?")


class FreezeError(NeoxLlamaError):
    """A ``freeze`` entry names nothing the model has."""


@dataclass(frozen=True)
class FreezeRule:
    """Blocks ``first..last`` (None: every block) and the part of them (None: whole); or a named group."""

    group: str | None = None
    first: int | None = None
    last: int | None = None
    part: str | None = None


def parse_freeze(entries: list[str], num_layers: int) -> list[FreezeRule]:
    """The rules of ``entries``; FreezeError names the first entry that is not valid."""
    rules = []
    for entry in entries:
        if entry in GROUPS:
            rules.append(FreezeRule(group=entry))
            continue
        match = _LAYERS.fullmatch(str(entry))
        if not match:
            raise FreezeError(f"freeze entry {entry!r} is not valid; use {', '.join(GROUPS)}, layers.I or layers.I-J "
                              "(blocks from 0), optionally with .attention, .mlp or .norms")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first or (num_layers and last >= num_layers):
            raise FreezeError(f"freeze entry {entry!r}: blocks {first}-{last} are not within the model's blocks "
                              f"0-{num_layers - 1}")
        rules.append(FreezeRule(first=first, last=last, part=match.group(3)))
    return rules


def is_frozen(rules: list[FreezeRule], layer_index: int, name: str, num_layers: int, tied: bool = False) -> bool:
    """Whether parameter ``name`` of global layer ``layer_index`` (0 embedding, 1..N blocks, N+1 final norm,
    N+2 head) is frozen by ``rules``; ``tied``: the head is the embedding matrix."""
    block = layer_index - 1 if 1 <= layer_index <= num_layers else None
    for rule in rules:
        if rule.group == "embeddings" and layer_index == 0:
            return True
        if rule.group == "head" and (layer_index == num_layers + 2 or (tied and layer_index == 0
                                                                       and name.startswith("word_"))):
            return True  # a tied head is the embedding matrix
        if rule.group in ("final_norm", "norms") and layer_index == num_layers + 1:
            return True
        if block is None:
            continue
        if rule.group in PARTS and name.startswith(PARTS[rule.group]):
            return True
        if rule.group is None and rule.first <= block <= rule.last:
            if rule.part is None or name.startswith(PARTS[rule.part]):
                return True
    return False

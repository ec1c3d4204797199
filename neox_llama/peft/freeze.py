"""``freeze`` applied to a built model: ``requires_grad`` off for the parameters its rules name (the rules and
the entry syntax: :mod:`neox_llama.config.freeze`)."""

from __future__ import annotations

from torch import nn

from neox_llama.config.freeze import is_frozen, parse_freeze


def apply_freeze(layers: dict[int, nn.Module], entries: list[str], num_layers: int, tied: bool = False) -> int:
    """Turn off ``requires_grad`` of the frozen parameters of ``layers`` (global index -> module); returns how
    many tensors were frozen. ``tied``: the head shares the embedding matrix (``head`` then freezes it)."""
    rules = parse_freeze(entries, num_layers)
    frozen = 0
    for index, layer in layers.items():
        for name, param in layer.named_parameters():
            if is_frozen(rules, index, name, num_layers, tied):
                param.requires_grad_(False)
                frozen += 1
    return frozen

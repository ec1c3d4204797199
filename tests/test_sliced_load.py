"""Loading layout-free weights reads only this rank's tensor-parallel slice of each tensor from the file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neox_llama.checkpoint.paths import CheckpointError
from neox_llama.checkpoint.weights import fill_layer_from_file, write_layer_file
from neox_llama.model.factory import mark_partition


def sharded_layer(tp_rank: int) -> nn.Module:
    """A column shard (rows split), a row shard (columns split) and a replicated norm, as tp size 2 makes them."""
    layer = nn.Module()
    layer.column = nn.Linear(6, 4, bias=False)  # full weight [8, 6]
    layer.row = nn.Linear(3, 5, bias=False)  # full weight [5, 6]
    layer.norm = nn.Parameter(torch.zeros(5))
    mark_partition(layer.column.weight, 0, 2, tp_rank)
    mark_partition(layer.row.weight, 1, 2, tp_rank)
    mark_partition(layer.norm, None, 2, tp_rank)
    return layer


def test_each_rank_gets_its_slice(tmp_path):
    full = {"column.weight": torch.randn(8, 6), "row.weight": torch.randn(5, 6), "norm": torch.randn(5)}
    write_layer_file(tmp_path / "layer.safetensors", full)
    for rank in (0, 1):
        layer = sharded_layer(rank)
        fill_layer_from_file(layer, tmp_path / "layer.safetensors")
        assert torch.equal(layer.column.weight, full["column.weight"].chunk(2, 0)[rank])
        assert torch.equal(layer.row.weight, full["row.weight"].chunk(2, 1)[rank])
        assert torch.equal(layer.norm, full["norm"])


def test_wrong_shapes_names_and_damage_are_named(tmp_path):
    path = tmp_path / "layer.safetensors"
    write_layer_file(path, {"column.weight": torch.randn(8, 7), "row.weight": torch.randn(5, 6), "norm": torch.randn(5)})
    with pytest.raises(CheckpointError, match=r"column.weight has shape \(8, 7\), the model expects \(8, 6\)"):
        fill_layer_from_file(sharded_layer(0), path)
    write_layer_file(path, {"column.weight": torch.randn(8, 6), "norm": torch.randn(5)})
    with pytest.raises(CheckpointError, match=r"no tensor for row\.weight"):
        fill_layer_from_file(sharded_layer(0), path)
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    with pytest.raises(CheckpointError, match="unreadable weight file"):
        fill_layer_from_file(sharded_layer(0), path)


def test_a_failed_write_is_an_oserror_and_leaves_no_file(tmp_path):
    """safetensors' own error becomes an OSError, which every save path turns into one shared, named failure (a
    SafetensorError escaping the writing rank would leave the other ranks waiting in the next gather)."""
    from neox_llama.checkpoint.weights import write_layer_file

    (tmp_path / ".layer.safetensors.tmp").mkdir()  # the temporary name cannot be written
    with pytest.raises(OSError):
        write_layer_file(tmp_path / "layer.safetensors", {"norm": torch.zeros(5)})
    assert not (tmp_path / "layer.safetensors").exists()

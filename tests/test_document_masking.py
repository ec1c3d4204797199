"""Document-aware batches: position resets, end-of-document loss masking, attention within documents."""

from __future__ import annotations

import numpy as np
import torch

from neox_llama.data.loader import BatchMaker
from neox_llama.model.args import LlamaArgs
from neox_llama.model.llama import build_model

EOD = 2
SAMPLE = np.array([5, 6, EOD, 7, 8, 9, EOD, 4, 3])  # seq_length 8 (+1 label)


def test_position_ids_restart_after_each_end_of_document():
    batch = BatchMaker(EOD, reset_position_ids=True)([SAMPLE, np.arange(10, 19)])
    assert batch["input_ids"][0].tolist() == [5, 6, 2, 7, 8, 9, 2, 4]
    assert batch["labels"][0].tolist() == [6, 2, 7, 8, 9, 2, 4, 3]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert batch["position_ids"][1].tolist() == list(range(8))
    assert batch["loss_mask"].sum().item() == 16


def test_eod_mask_loss_drops_predictions_made_at_the_end_of_document_token():
    batch = BatchMaker(EOD, eod_mask_loss=True)([SAMPLE])
    assert batch["loss_mask"][0].tolist() == [1, 1, 0, 1, 1, 1, 0, 1]
    assert batch["position_ids"][0].tolist() == list(range(8))


def test_document_attention_equals_running_each_document_alone():
    args = LlamaArgs(num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=64, vocab_size=16, max_position_embeddings=16, document_attention=True)
    model = build_model(args).eval()
    batch = BatchMaker(EOD, reset_position_ids=True)([SAMPLE])
    packed = model(batch["input_ids"], batch["position_ids"])
    for start, stop in ((0, 3), (3, 7), (7, 8)):  # documents [5 6 EOD] [7 8 9 EOD] [4]
        alone = model(batch["input_ids"][:, start:stop])
        assert torch.allclose(packed[:, start:stop], alone, atol=1e-5)
    plain = build_model(LlamaArgs(**{**args.__dict__, "document_attention": False})).eval()
    crossing = plain(batch["input_ids"], batch["position_ids"])
    assert not torch.allclose(crossing[:, 3:7], packed[:, 3:7], atol=1e-3)  # without the mask, documents mix

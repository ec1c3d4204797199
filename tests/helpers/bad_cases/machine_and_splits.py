"""Bad input about the machine and the data's splits: more CPU ranks than this machine can run (refused without
--force before any rank starts), and a ``split`` that leaves the training split without a document."""

from __future__ import annotations

from helpers.bad_inputs import deepy
from neox_llama.planning.preflight import OVERSUBSCRIPTION_REFUSED, usable_cores


def case_machine_more_ranks_than_cores_allow(world, tmp_path):
    cores = usable_cores()
    ranks = max(64, OVERSUBSCRIPTION_REFUSED * cores + 1)  # 64 on the 2-core CI machine: 32x
    proc = deepy(world, tmp_path / "r", f"num_gpus={ranks}")
    return proc, (f"num_gpus {ranks}: {ranks} CPU rank(s) x 1 thread(s) each on this machine's {cores} core(s) is "
                  f"{ranks / cores:.1f}x oversubscribed (more than {OVERSUBSCRIPTION_REFUSED}x is refused"), []


def case_splits_training_left_empty(world, tmp_path):
    proc = deepy(world, tmp_path / "r", "split=0,50,50")
    return proc, (f'command line: split: "0,50,50" over the 300 document(s) of {world["w"] / "data_text_document"} '
                  "leaves the training split empty (training 0, validation 150, test 150 documents)"), []

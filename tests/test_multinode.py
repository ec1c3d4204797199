"""Multi-node as DeepSpeed does it: two "nodes" on loopback, node 1 with only what DeepSpeed's runners forward."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
from helpers.runner import ABORT_AT_EXIT, ROOT, free_port
from helpers.training import BASE, losses, shared_corpus, train_case

from neox_llama.config import resolve
from neox_llama.config.loading import build_config, dump_raw_text, load_raw
from neox_llama.planning.launch import CONFIG_DATA, LaunchPlan, build_launch_command

pytestmark = pytest.mark.dist

FORWARDED_PREFIXES = ("NCCL", "PYTHON", "MV2", "UCX")
"""What DeepSpeed's pdsh runner exports to remote nodes (besides .deepspeed_env, which we do not use)."""


train_case("multinode-one-node", 2, "num_gpus=2", "train_iters=3", "checkpoint_factor=3")


@pytest.mark.uses_cases("multinode-one-node")
def test_two_nodes_on_loopback_equal_one_node(tmp_path, launched):
    corpus = shared_corpus()
    one = launched("multinode-one-node").check().folder

    for attempt in range(2):  # once more only on DeepSpeed's rare abort at exit, as every launch test does
        two = tmp_path / f"two{attempt}"
        codes, outs = _two_nodes(tmp_path / f"nodes{attempt}", two, corpus)
        if codes == [0, 0] or not any(ABORT_AT_EXIT in o for o in outs):
            break
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert losses(two) == pytest.approx(losses(one), abs=1e-6)
    assert len(losses(two)) == 3


def _two_nodes(work, two, corpus):
    """Start node 0 (full environment) and node 1 (only what DeepSpeed forwards, no config file) on loopback."""
    # What deepy.py would hand DeepSpeed's runner for a hostfile of two one-slot nodes.
    overrides = [*BASE, f"data_path={corpus}", f"save={two / 'ck'}", f"load={two / 'ck'}",
                 f"log_dir={two / 'logs'}", "train_iters=3", "checkpoint_factor=3", "num_gpus=1"]
    raw, sources = load_raw([ROOT / "configs/llama3/tiny.yml"], overrides)
    cfg = resolve(build_config(raw, sources), 2, "cpu")
    plan = LaunchPlan(hosts={"node0": [0], "node1": [0]}, multi_node=True, accelerator="cpu")
    node0 = work / "node0"
    (node0 / "logs").mkdir(parents=True)
    text = dump_raw_text(raw, header="# merged")
    (node0 / "logs" / "config.yml").write_text(text)
    command = build_launch_command(cfg, plan, str(ROOT / "train.py"), "logs/config.yml", text)
    script_args = command.argv[command.argv.index(str(ROOT / "train.py")):]
    assert CONFIG_DATA in script_args and "DS_ACCELERATOR=cpu" in script_args

    world_info = base64.urlsafe_b64encode(json.dumps(plan.hosts).encode()).decode()
    port = str(free_port())
    node1 = work / "node1"  # no logs/config.yml here: the relative --config path does not exist on node 1
    node1.mkdir()
    stripped = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES) or k in ("PATH", "HOME")}
    procs = []
    for rank, (cwd, env) in enumerate([(node0, dict(os.environ)), (node1, stripped)]):
        argv = [sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={world_info}", f"--node_rank={rank}",
                "--master_addr=127.0.0.1", f"--master_port={port}", "--no_local_rank", *script_args]
        procs.append(subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return [p.returncode for p in procs], outs

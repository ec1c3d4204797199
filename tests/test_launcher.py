"""Launch planning: the world size DeepSpeed's launcher will start, and the command that starts it."""

from __future__ import annotations

import sys

import pytest

from neox_llama.config import ConfigError
from neox_llama.config.loading import build_config, load_raw
from neox_llama.planning.launch import build_launch_command, plan_resources, threads_per_rank

TINY = "num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nintermediate_size: 192\nseq_length: 32\nvocab_size: 500\n"


def config(write_yaml, *overrides):
    return build_config(*load_raw([write_yaml("a.yml", TINY)], overrides))


def test_cpu_default_is_the_minimum_world_for_the_layout(write_yaml):
    plan = plan_resources(config(write_yaml, "pipe_parallel_size=2"), "cpu")
    assert plan.world_size == 2 and plan.hosts == {"localhost": [0, 1]} and not plan.multi_node


def test_num_gpus_sets_ranks_on_one_node(write_yaml):
    cfg = config(write_yaml, "num_gpus=3", "master_port=29777")
    plan = plan_resources(cfg, "cpu")
    assert plan.world_size == 3
    cmd = build_launch_command(cfg, plan, "train.py", "/run/config.yml")
    assert cmd.argv[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert cmd.argv[cmd.argv.index("--num_gpus") + 1] == "3"
    assert cmd.argv[cmd.argv.index("--master_port") + 1] == "29777"
    assert "--no_local_rank" in cmd.argv and cmd.argv[-3:] == ["train.py", "--config", "/run/config.yml"]
    assert cmd.env["DS_ACCELERATOR"] == "cpu"


def test_one_rank_runs_the_script_directly(write_yaml):
    cfg = config(write_yaml, "master_port=29123")
    plan = plan_resources(cfg, "cpu")
    cmd = build_launch_command(cfg, plan, "train.py", "c.yml")
    assert cmd.argv == [sys.executable, "train.py", "--config", "c.yml"]
    assert {k: cmd.env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")} == \
        {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": "29123"}


def test_hostfile_nodes_and_slots(write_yaml, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nworker-0 slots=4\nworker-1 slots=4\nworker-2 slots=4\n")
    cfg = config(write_yaml, f"hostfile={hostfile}", "num_nodes=2", "launcher=slurm", "master_addr=10.0.0.1")
    plan = plan_resources(cfg, "cpu")
    assert plan.world_size == 8 and list(plan.hosts) == ["worker-0", "worker-1"] and plan.multi_node
    cmd = build_launch_command(cfg, plan, "train.py", "c.yml")
    for flag, value in (("--hostfile", str(hostfile)), ("--launcher", "slurm"), ("--num_nodes", "2"),
                        ("--master_addr", "10.0.0.1")):
        assert cmd.argv[cmd.argv.index(flag) + 1] == value
    assert "--num_gpus" not in cmd.argv  # each host's own slots


def test_multi_node_passes_the_rank_environment_and_the_config_on_the_command_line(write_yaml, tmp_path):
    import base64

    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=2\nworker-1 slots=2\n")
    cfg = config(write_yaml, f"hostfile={hostfile}", "omp_num_threads=3")
    plan = plan_resources(cfg, "cpu")
    cmd = build_launch_command(cfg, plan, "train.py", "/run/config.yml", "num_layers: 2\n# merged\n")
    script = cmd.argv[cmd.argv.index("train.py"):]
    envs = [script[i + 1] for i, a in enumerate(script) if a == "--env"]
    # glibc's own mmap threshold (faster steps); 2 ranks per host: each bound to its own cores (bind_cores)
    assert envs == ["DS_ACCELERATOR=cpu", "NEOX_LLAMA_BIND_CORES=1", "OMP_NUM_THREADS=3"]
    zero3 = build_launch_command(config(write_yaml, f"hostfile={hostfile}", "omp_num_threads=3",
                                        "zero_optimization.stage=3"), plan, "train.py", "/run/config.yml", "x")
    assert "MALLOC_MMAP_THRESHOLD_=1048576" in zero3.argv  # ZeRO-3: freed gathered layers go back to the system
    data = script[script.index("--config-data") + 1]
    assert base64.b64decode(data).decode() == "num_layers: 2\n# merged\n"
    assert "<the merged config, base64>" in cmd.shell(abbreviate=True) and data not in cmd.shell(abbreviate=True)
    local = build_launch_command(cfg, plan_resources(config(write_yaml, "num_gpus=2"), "cpu"), "train.py", "c.yml", "x")
    assert "--config-data" not in local.argv and "--env" not in local.argv  # one node: the environment reaches it


def test_uneven_hostfile_keeps_each_hosts_slots(write_yaml, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=4\nworker-1 slots=2\n")
    cfg = config(write_yaml, f"hostfile={hostfile}")
    plan = plan_resources(cfg, "cpu")
    assert plan.world_size == 6
    assert "--num_gpus" not in build_launch_command(cfg, plan, "train.py", "c.yml").argv
    cfg = config(write_yaml, f"hostfile={hostfile}", "num_gpus=2")
    plan = plan_resources(cfg, "cpu")
    assert plan.world_size == 4 and "--num_gpus" in build_launch_command(cfg, plan, "train.py", "c.yml").argv


def test_single_rank_without_a_configured_port_picks_a_free_one(write_yaml):
    cfg = config(write_yaml)
    ports = {build_launch_command(cfg, plan_resources(cfg, "cpu"), "t.py", "c.yml").env["MASTER_PORT"] for _ in range(3)}
    assert "29500" not in ports and len(ports) >= 2


def test_include_filter_is_resolved_like_deepspeed(write_yaml, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=4\nworker-1 slots=4\n")
    cfg = config(write_yaml, f"hostfile={hostfile}", "include=worker-0:0,1@worker-1")
    plan = plan_resources(cfg, "cpu")
    assert plan.hosts == {"worker-0": [0, 1], "worker-1": [0, 1, 2, 3]} and plan.world_size == 6
    cmd = build_launch_command(cfg, plan, "train.py", "c.yml")
    assert cmd.argv[cmd.argv.index("--include") + 1] == "worker-0:0,1@worker-1" and "--num_gpus" not in cmd.argv


@pytest.mark.parametrize(("overrides", "message"), [
    (["include=localhost:0", "num_gpus=2"], "include/exclude cannot be combined with num_gpus/num_nodes"),
    (["num_nodes=2"], "num_nodes 2 needs a hostfile"),
    (["hostfile=/no/such/hostfile"], "hostfile /no/such/hostfile does not exist"),
])
def test_bad_launcher_settings(write_yaml, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_resources(config(write_yaml, *overrides), "cpu")


def test_malformed_hostfile_names_the_file(write_yaml, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 with four gpus\n")
    with pytest.raises(ConfigError) as excinfo:
        plan_resources(config(write_yaml, f"hostfile={hostfile}"), "cpu")
    assert str(hostfile) in str(excinfo.value) and "slots=" in str(excinfo.value)


def test_threads_are_shared_between_ranks_of_a_node(write_yaml, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    cfg = config(write_yaml, "num_gpus=4")
    assert threads_per_rank(cfg, plan_resources(cfg, "cpu")) == 2
    # a container limited to 2 of a host's 64 CPUs: the cores it may use count, not the host's
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    cfg = config(write_yaml, "num_gpus=1")
    assert threads_per_rank(cfg, plan_resources(cfg, "cpu")) == 2
    cfg = config(write_yaml, "num_gpus=4", "omp_num_threads=3")
    assert threads_per_rank(cfg, plan_resources(cfg, "cpu")) == 3


def test_cpu_ranks_are_bound_to_their_own_cores_all_or_none(monkeypatch):
    import os

    from neox_llama.distributed import bind_cores

    bound = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: bound.append(list(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert bind_cores(1, 2) == [2, 3] and bound == [[2, 3]]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 ranks x 2 threads > 4 cores: nobody is bound
    assert bind_cores(0, 2) is None and bound == [[2, 3]]
    # DeepSpeed's launcher says LOCAL_SIZE, not LOCAL_WORLD_SIZE: 4 ranks x 1 thread on 2 cores binds nobody (it
    # once bound rank 2 to no core at all: sched_setaffinity failed)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_SIZE", "4")
    assert bind_cores(2, 1) is None and bound == [[2, 3]]
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert bind_cores(1, 1) == [1] and bound == [[2, 3], [1]]

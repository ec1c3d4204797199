"""The machine a launch runs on, checked before any rank starts: a taken master_port, more CPU threads than cores,
and the host memory of the ranks with their data-loader workers (in-process: nothing is launched)."""

from __future__ import annotations

import socket

import pytest
from helpers.inprocess import deepy
from helpers.runner import ROOT

from neox_llama.config import ConfigError, load_config
from neox_llama.planning.launch import build_launch_command, choose_master_port, plan_resources
from neox_llama.planning.memory import CPU_RUNTIME, DATA_WORKER, GIB, estimate_memory
from neox_llama.planning.preflight import Checks, check_cpu_load, check_host_memory

TINY = "num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nintermediate_size: 192\nseq_length: 32\nvocab_size: 500\n"


def config(write_yaml, *overrides, world_size: int = 1):
    return load_config([write_yaml("a.yml", TINY)], overrides, world_size=world_size)


@pytest.fixture
def taken_port():
    """A port something on this machine listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_taken_port_on_one_node_is_replaced_by_a_free_one_and_said(write_yaml, taken_port):
    for ranks in (1, 2):
        cfg = config(write_yaml, f"master_port={taken_port}", f"num_gpus={ranks}", world_size=ranks)
        plan = plan_resources(cfg, "cpu")
        port, note = choose_master_port(cfg, plan)
        assert port != taken_port
        assert note == (f"master_port {taken_port} (command line) is in use on this machine; rank 0 listens on free "
                        f"port {port} instead")
        command = build_launch_command(cfg, plan, "t.py", "c.yml", master_port=port)
        used = command.env["MASTER_PORT"] if ranks == 1 else command.argv[command.argv.index("--master_port") + 1]
        assert used == str(port)
        checks = Checks(master_port=port, port_note=note)  # said once the launch goes ahead, or in a plan
        assert checks.verdict(dry_run=False, force=False) == ([], [note])
        assert checks.verdict(dry_run=True, force=False) == ([], [note])
        checks.machine = ["too little memory"]
        assert checks.verdict(dry_run=False, force=False) == (["too little memory"], [])
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    cfg = config(write_yaml, f"master_port={port}")
    assert choose_master_port(cfg, plan_resources(cfg, "cpu")) == (port, None)  # free: kept, no word


def test_deepy_launches_on_the_free_port_it_names(taken_port):
    proc = deepy("train.py", "configs/llama3/tiny.yml", "tokenizer_type=null", "vocab_file=null", "vocab_size=512",
                 f"master_port={taken_port}", "--dry-run", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [line] = [x for x in proc.stderr.splitlines() if "master_port" in x]
    assert line.startswith(f"deepy.py: warning: master_port {taken_port} (command line) is in use on this machine; "
                           "rank 0 listens on free port ")
    port = line.rsplit("free port ", 1)[1].split()[0]
    assert f"MASTER_PORT={port} " in proc.stdout and f"MASTER_PORT={taken_port}" not in proc.stdout


def test_a_taken_port_on_several_nodes_is_an_error_naming_it_and_the_host(write_yaml, taken_port, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\nworker-1 slots=1\n")
    cfg = config(write_yaml, f"hostfile={hostfile}", f"master_port={taken_port}", world_size=2)
    plan = plan_resources(cfg, "cpu")
    with pytest.raises(ConfigError) as err:
        choose_master_port(cfg, plan)
    [line] = err.value.problems
    assert line.startswith(f"command line: master_port {taken_port} is already in use on localhost (rank 0's node, "
                           "this machine); every node must be given the same port, so none is picked for you: set "
                           "master_port to a free one (e.g. master_port=")
    # rank 0 on another node: its ports cannot be seen from here, so the port stands as configured
    hostfile.write_text("worker-0.invalid slots=1\nworker-1.invalid slots=1\n")
    assert choose_master_port(cfg, plan_resources(cfg, "cpu")) == (taken_port, None)
    checks = Checks(launch=[line], multi_node=True)
    assert checks.verdict(dry_run=False, force=True) == ([line], [])  # --force never picks a port for the nodes


def test_more_cpu_threads_than_cores_warn_and_beyond_4x_refuse(write_yaml, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("os.cpu_count", lambda: 64)  # a container's 2 cores on a bigger host: its 2 count

    def load(*overrides):
        ranks = next((int(o.split("=")[1]) for o in overrides if o.startswith("num_gpus=")), 1)
        cfg = config(write_yaml, *overrides, world_size=ranks)
        return check_cpu_load(cfg, plan_resources(cfg, "cpu"), cores=2)

    assert load("num_gpus=2") == ([], [])
    cfg = config(write_yaml, world_size=1)
    assert check_cpu_load(cfg, plan_resources(cfg, "cpu")) == ([], [])  # one rank on the cores it may use
    warned, refused = load("num_gpus=4")
    assert refused == [] and warned == [
        "command line: num_gpus 4: 4 CPU rank(s) x 1 thread(s) each on this machine's 2 core(s) is 2.0x "
        "oversubscribed; the ranks take turns on the cores, so every step is slower than with at most 2 ranks "
        "(num_gpus)"]
    assert load("num_gpus=8")[0] and not load("num_gpus=8")[1]  # 4x: still a warning
    warned, refused = load("num_gpus=64")
    assert warned == [] and refused == [
        "command line: num_gpus 64: 64 CPU rank(s) x 1 thread(s) each on this machine's 2 core(s) is 32.0x "
        "oversubscribed (more than 4x is refused: the ranks would spend their time waiting for each other); use at "
        "most 2 ranks (num_gpus), or pass --force to start anyway"]
    warned, refused = load("num_gpus=2", "omp_num_threads=2")  # the threads, not the ranks, are too many
    assert refused == [] and warned[0].startswith("command line: omp_num_threads 2: 2 CPU rank(s) x 2 thread(s)")
    assert "omp_num_threads 1 or less" in warned[0]
    assert load("num_gpus=2", "omp_num_threads=5")[1]  # 5x


def test_the_verdict_of_the_checks_for_each_kind_of_launch():
    checks = Checks(files=["file"], machine=["memory"], launch=["port"], notes=["cores"])
    assert checks.verdict(dry_run=False, force=False) == (["port", "file", "memory"], ["cores"])
    assert checks.verdict(dry_run=False, force=True) == (["port", "file"], ["cores", "memory (--force: starting anyway)"])
    assert checks.verdict(dry_run=True, force=False) == ([], ["cores", "file", "memory", "port"])
    checks.multi_node = True
    assert checks.verdict(dry_run=False, force=False) == (["port", "memory"], ["cores", "file"])


def test_the_memory_estimate_counts_the_rank_runtime_and_its_data_loader_workers(write_yaml):
    none = estimate_memory(config(write_yaml, "num_workers=0"))
    evaluating = estimate_memory(config(write_yaml, "num_workers=2", "eval_iters=5"))
    training_only = estimate_memory(config(write_yaml, "num_workers=2", "eval_iters=0"))
    assert none.runtime == CPU_RUNTIME and none.workers == 0
    assert evaluating.workers == 2 * 3 * DATA_WORKER  # the training, validation and test loaders' workers
    assert training_only.workers == 2 * DATA_WORKER
    assert evaluating.total - none.total == pytest.approx(evaluating.workers)
    assert "data-loader workers 0.06 GiB (6 x 10 MiB)" in evaluating.text()
    gpu = estimate_memory(config(write_yaml, "num_workers=2"), "cuda")
    assert gpu.runtime == 0 and gpu.workers == 0  # a GPU's memory holds neither


def test_the_host_memory_check_adds_up_every_rank_of_the_machine(write_yaml):
    cfg = config(write_yaml, "num_workers=2", "num_gpus=4", world_size=4)
    one = estimate_memory(cfg).total
    assert check_host_memory(cfg, 4, total=int(4 * one) + 1) == []
    [line] = check_host_memory(cfg, 4, total=int(3.5 * one))
    assert f"the 4 rank(s) on this machine need about {4 * one / GIB:,.1f} GiB of host memory" in line
    assert "fewer ranks on this machine (num_gpus 4), fewer data-loader workers (num_workers 2)" in line
    assert line.endswith("or pass --force to start anyway")


def test_a_port_taken_after_the_check_is_one_line_from_the_rank(monkeypatch):
    import deepspeed
    import torch.distributed as dist

    from neox_llama import distributed

    def taken(**_):
        raise dist.DistNetworkError("The server socket has failed to listen on any local network address. port: 29500, "
                                    "useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use")

    monkeypatch.setattr(deepspeed, "init_distributed", taken)
    monkeypatch.setattr(distributed, "_JOINED_HERE", distributed._JOINED_HERE)  # restored after the test
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with pytest.raises(distributed.LaunchError, match=r"^MASTER_PORT 29500 is already in use on this machine"):
        distributed.init_distributed("cpu")

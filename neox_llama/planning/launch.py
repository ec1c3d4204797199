"""Planning a launch: how many ranks on which nodes, and the exact command that starts them.

Multi-rank runs go through DeepSpeed's own launcher (``python -m deepspeed.launcher.runner``); the
resource arithmetic below reuses its hostfile and include/exclude parsers so that the world size we
validate against is the one DeepSpeed will start. A single rank needs no launcher: the script is
started directly with the environment variables torch.distributed expects.
"""

from __future__ import annotations

import base64
import errno
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from neox_llama.config.loading import ConfigError
from neox_llama.config.schema import Config

CONFIG_DATA = "--config-data"


def detect_accelerator() -> str:
    """``"cuda"`` when a CUDA device is usable, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class LaunchPlan:
    """Where the ranks run."""

    hosts: dict[str, list[int]]
    """Host name -> local slot (GPU) indices used on it."""
    multi_node: bool
    accelerator: str
    include: str | None = None
    """The include filter passed to DeepSpeed (the user's, or one made from CUDA_VISIBLE_DEVICES)."""

    @property
    def world_size(self) -> int:
        return sum(len(slots) for slots in self.hosts.values())

    @property
    def ranks_per_node(self) -> int:
        return max((len(slots) for slots in self.hosts.values()), default=1)


@dataclass
class LaunchCommand:
    """A command line and the environment variables it needs on top of the current ones."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self, abbreviate: bool = False) -> str:
        """The command as one copy-pasteable shell line (``abbreviate``: the inline config data elided)."""
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        argv = list(self.argv)
        if abbreviate and CONFIG_DATA in argv:
            argv[argv.index(CONFIG_DATA) + 1] = "<the merged config, base64>"
        return (prefix + " " if prefix else "") + shlex.join(argv)


def plan_resources(cfg: Config, accelerator: str) -> LaunchPlan:
    """Resolve num_nodes/num_gpus/hostfile/include/exclude the way DeepSpeed's launcher does."""
    from deepspeed.launcher import runner

    if (cfg.include or cfg.exclude) and (cfg.num_gpus is not None or cfg.num_nodes is not None):
        raise ConfigError([f"{cfg.sources.get('include') or cfg.sources.get('exclude')}: include/exclude cannot be "
                           "combined with num_gpus/num_nodes (DeepSpeed launcher rule)"])
    pool = None
    if cfg.hostfile:
        if not Path(cfg.hostfile).is_file():
            raise ConfigError([f"{cfg.sources.get('hostfile', '?')}: hostfile {cfg.hostfile} does not exist"])
        try:
            pool = runner.fetch_hostfile(cfg.hostfile)
        except ValueError as err:
            raise ConfigError([f"{cfg.hostfile}: {err} (expected lines like 'worker-0 slots=8')"]) from None
    multi_node = pool is not None
    include = cfg.include or ""
    if pool is None:
        if cfg.num_nodes not in (None, 1):
            raise ConfigError([f"{cfg.sources.get('num_nodes', '?')}: num_nodes {cfg.num_nodes} needs a hostfile "
                               "listing the nodes"])
        if accelerator == "cuda":
            import torch

            devices = torch.cuda.device_count()
            if cfg.num_gpus and cfg.num_gpus > devices:
                raise ConfigError([f"{cfg.sources.get('num_gpus', '?')}: num_gpus {cfg.num_gpus} but this machine "
                                   f"has {devices} GPU(s)"])
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
            if visible and not (cfg.include or cfg.exclude or cfg.num_gpus):
                # DeepSpeed's runner drops CUDA_VISIBLE_DEVICES; express it as an include filter instead.
                include = f"localhost:{visible}"
                devices = max(devices, max(int(x) for x in visible.split(",")) + 1)
            pool = {"localhost": devices}
        else:
            pool = {"localhost": cfg.num_gpus or cfg.pipe_parallel_size * cfg.model_parallel_size}
    try:
        active = runner.parse_inclusion_exclusion(pool, include, cfg.exclude or "")
    except ValueError as err:
        raise ConfigError([f"include/exclude: {err}"]) from None
    active = runner.apply_num_nodes_and_gpus(active, cfg.num_nodes or -1, cfg.num_gpus or -1)
    return LaunchPlan(hosts=dict(active), multi_node=multi_node, accelerator=accelerator, include=include or None)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether rank 0 could not listen on ``port`` here: something is bound to it (torch's store binds every address,
    with SO_REUSEADDR, so a port a finished run left in TIME_WAIT is free, as it is for the store)."""
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this machine
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address, port))
            except OSError as err:
                if family == socket.AF_INET or err.errno == errno.EADDRINUSE:
                    return True
    return False


def is_this_machine(host: str) -> bool:
    """Whether ``host`` names this machine (one of its addresses can be bound here)."""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return False
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((address, 0))
                return True
        except OSError:
            continue
    return False


def choose_master_port(cfg: Config, plan: LaunchPlan) -> tuple[int, str | None]:
    """The port rank 0 listens on, and a line saying so where it is not ``master_port``: on one node, a taken port is
    replaced by a free one; a one-rank run without a configured port always takes a free one (said nowhere), so
    concurrent runs never collide.

    On several nodes every node must be given the same port, so a taken one is an error naming it and the host (when
    rank 0's node is this machine; another node's ports cannot be seen from here)."""
    port, origin = cfg.master_port, cfg.sources.get("master_port")
    if plan.multi_node:
        host = cfg.master_addr or next(iter(plan.hosts))
        if is_this_machine(host) and port_in_use(port):
            raise ConfigError([f"{origin or 'default'}: master_port {port} is already in use on {host} (rank 0's node, "
                               "this machine); every node must be given the same port, so none is picked for you: set "
                               f"master_port to a free one (e.g. master_port={free_port()})"])
        return port, None
    if plan.world_size == 1 and origin is None:
        return free_port(), None
    if not port_in_use(port):
        return port, None
    chosen = free_port()
    return chosen, (f"master_port {port} ({origin or 'the default'}) is in use on this machine; rank 0 listens on free "
                    f"port {chosen} instead")


def threads_per_rank(cfg: Config, plan: LaunchPlan) -> int:
    """OMP threads per rank: the configured number, or the cores this process may use (its affinity mask, e.g. a
    container's cpuset) shared among the node's ranks."""
    if cfg.omp_num_threads:
        return cfg.omp_num_threads
    return max(1, usable_cores() // plan.ranks_per_node)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's cpuset), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def rank_environment(cfg: Config, plan: LaunchPlan) -> dict[str, str]:
    """Environment every rank needs, wherever it runs."""
    env = {"OMP_NUM_THREADS": str(threads_per_rank(cfg, plan))}
    if plan.accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        if cfg.bind_cores and plan.ranks_per_node > 1:  # each rank on its own cores (distributed.bind_cores)
            env["NEOX_LLAMA_BIND_CORES"] = "1"
        # glibc keeps freed large buffers (gathered ZeRO-3 layers, communication buckets) in the heap once its
        # mmap threshold has grown; under ZeRO-3 a fixed threshold returns every allocation over 1 MiB to the
        # system on free. Elsewhere glibc's own threshold is kept: the fixed one makes every large activation
        # a fresh mmap whose pages fault in again, 20-40 % of a CPU step (benchmarks/run.py, docs/benchmarks.md).
        chosen = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        if chosen or cfg.zero_optimization.stage == 3:
            env["MALLOC_MMAP_THRESHOLD_"] = chosen or str(1 << 20)
    return env


def build_launch_command(cfg: Config, plan: LaunchPlan, script: str, config_file: str,
                         config_text: str | None = None, master_port: int | None = None) -> LaunchCommand:
    """The command that starts ``script --config config_file`` on every rank of ``plan``, rank 0 listening on
    ``master_port`` (deepy.py passes :func:`choose_master_port`'s; unset: ``master_port`` as configured, or a free
    port for one rank without one).

    Ranks on other nodes see neither this environment (DeepSpeed's pdsh/openmpi/slurm runners forward only
    their own variable prefixes and ``.deepspeed_env``) nor, without a shared filesystem, ``config_file``:
    multi-node launches therefore pass the rank environment as ``--env KEY=VALUE`` and the merged config
    itself as ``--config-data`` (base64), as GPT-NeoX passes its config on the command line.
    """
    env = rank_environment(cfg, plan)
    script_args = [script, "--config", config_file]
    if plan.multi_node:
        script_args += [arg for key, value in sorted(env.items()) for arg in ("--env", f"{key}={value}")]
        if config_text is not None:
            script_args += [CONFIG_DATA, base64.b64encode(config_text.encode("utf-8")).decode("ascii")]
    if plan.world_size == 1 and not plan.multi_node:
        # Nobody else joins: an unset master_port gets a free one, so concurrent single-rank runs never collide.
        port = master_port or (cfg.master_port if "master_port" in cfg.sources else free_port())
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR=cfg.master_addr or "127.0.0.1", MASTER_PORT=str(port))
        if plan.include and plan.accelerator == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = plan.include.split(":", 1)[1]
        return LaunchCommand([sys.executable, *script_args], env)
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(master_port or cfg.master_port),
            "--no_local_rank"]
    if cfg.hostfile:
        argv += ["--hostfile", cfg.hostfile, "--launcher", cfg.launcher]
    if cfg.master_addr:
        argv += ["--master_addr", cfg.master_addr]
    if plan.include:
        argv += ["--include", plan.include]
    elif cfg.exclude:
        argv += ["--exclude", cfg.exclude]
    else:
        # With a hostfile and no num_gpus, DeepSpeed uses each host's slots (which may differ per host).
        if cfg.num_gpus or not cfg.hostfile:
            argv += ["--num_gpus", str(cfg.num_gpus or plan.ranks_per_node)]
        if cfg.num_nodes:
            argv += ["--num_nodes", str(cfg.num_nodes)]
    return LaunchCommand(argv + script_args, env)

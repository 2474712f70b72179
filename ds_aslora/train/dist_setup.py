"""The job's processes: the launcher's world, collective timeouts, the gloo setup group, and the
checks that every rank starts alike (environment, CPU placement).

Everything here runs before the model loads, so a cluster problem (an interface gloo cannot use,
a variable one node lacks, ranks bound to one core) fails or shows in the first minute.
"""
from __future__ import annotations

import gc
import os
import socket
from collections import defaultdict
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from ..utils.ranks import free_port, object_group, set_object_group

LAUNCHER_ENV = ("RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
# What the job reads from the environment that must be the same on every rank: caches and offline
# mode. The pdsh launcher carries only some variables to other nodes (.deepspeed_env adds more): a
# cache that differs per node silently tokenises or converts twice. (DS_ACCELERATOR is not here: it
# is read by deepspeed.init_distributed, before any check could run.)
AGREED_ENV = ("DS_ASLORA_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE",
              "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
SETUP_WAIT = timedelta(hours=4)  # a rank waiting for another's tokenising or model conversion


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(timeout_minutes: float) -> None:
    """The launcher's world (deepspeed, torchrun, MPI, srun), or a world of one for plain ``python``;
    the timeout for every group, DeepSpeed's included; the gloo setup group, connected now; then
    this rank's accelerator bound before any collective."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch.distributed import distributed_c10d

    launched = any(k in os.environ for k in LAUNCHER_ENV) or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if not launched:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    timeout = timedelta(minutes=timeout_minutes)
    deepspeed.init_distributed(timeout=timeout)
    # Groups created without a timeout (DeepSpeed's clone of the world for ZeRO's reductions, its
    # data-parallel groups) take torch's defaults: 10 minutes for NCCL, 30 for gloo.
    distributed_c10d.default_pg_timeout = timeout
    if distributed_c10d.default_pg_nccl_timeout is not None:
        distributed_c10d.default_pg_nccl_timeout = timeout
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank())
    _connect_setup_group(timeout)


class SetupChannelError(RuntimeError):
    """The ranks could not connect over gloo; the message says why and what to set."""


_SETUP_WAIT_GROUP: list = []  # the gloo group whose own timeout is SETUP_WAIT (setup_barrier)


def _connect_setup_group(timeout: timedelta, setup_wait: timedelta = SETUP_WAIT) -> None:
    """The only gloo traffic of an NCCL job. Connected with the normal timeout: a hostname that
    resolves to loopback (Ubuntu's 127.0.1.1) or an unroutable interface fails here, in minutes.
    Two groups: one with the collective timeout (objects, messages), one whose timeout is
    ``setup_wait`` (``setup_barrier``): gloo's monitored barrier applies its own timeout on rank 0
    only, and every other rank waits with its group's."""
    set_object_group(None)
    _SETUP_WAIT_GROUP.clear()
    if dist.get_world_size() == 1:
        return
    try:
        group = dist.new_group(backend="gloo", timeout=timeout)
        dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=True)
        waiting = dist.new_group(backend="gloo", timeout=setup_wait)  # connects once the channel is proven
    except RuntimeError as err:
        raise SetupChannelError(
            f"rank {dist.get_rank()} on {socket.gethostname()} could not connect to the other ranks over gloo "
            f"(the job's setup channel): {str(err).splitlines()[0]}. gloo uses the interface of the address "
            "this host's name resolves to; if that is loopback or not routable between nodes, set "
            "GLOO_SOCKET_IFNAME to the interface the nodes share (e.g. the one in NCCL_SOCKET_IFNAME), on every "
            "node") from None
    set_object_group(group)  # also carries raise_together's messages
    _SETUP_WAIT_GROUP.append((waiting, setup_wait))


def close_distributed(crashed: bool = False) -> None:
    """Destroy every group while the interpreter is whole. A group this module (or ``ranks``) still
    held would outlive ``destroy_process_group`` and die at interpreter exit, when gloo's worker
    threads can no longer take the GIL: SIGABRT ("terminate called without an active exception")
    after a job had finished or failed cleanly. ``crashed`` (an exception cut this rank's step): NCCL
    is aborted instead, since a graceful destroy waits for this rank's queued collectives, whose peers
    may never come."""
    _SETUP_WAIT_GROUP.clear()
    set_object_group(None)
    if dist.is_initialized():
        if crashed and dist.get_backend() == "nccl":
            from torch.distributed import distributed_c10d

            distributed_c10d._abort_process_group()
            return
        dist.destroy_process_group()
    gc.collect()  # groups in reference cycles go now too, not at exit


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def setup_barrier() -> None:
    """Wait for work one rank per node does (tokenising a large dataset, converting the default
    model), up to ``SETUP_WAIT``: the collective timeout would kill the waiting ranks first."""
    if _SETUP_WAIT_GROUP:
        group, wait = _SETUP_WAIT_GROUP[0]
        dist.monitored_barrier(group=group, timeout=wait, wait_all_ranks=True)


def gather_objects(value: object) -> list:
    """Every rank's ``value``, on every rank (over the setup group: no accelerator memory)."""
    if object_group() is None:
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=object_group())
    return out


def environment_problem(envs: list[dict[str, Optional[str]]]) -> Optional[str]:
    """One line naming the first variable some rank sees differently from rank 0, else None."""
    for name in AGREED_ENV:
        values = [env.get(name) for env in envs]
        other = next((r for r, v in enumerate(values) if v != values[0]), None)
        if other is not None:
            return (f"{name} is {values[0]!r} on rank 0 but {values[other]!r} on rank {other} (host "
                    f"{envs[other]['host']}): every rank must see the same value; the deepspeed launcher carries "
                    "only some variables to other nodes: list it in .deepspeed_env (see the README)")
    return None


def placement_lines(places: list[dict]) -> list[str]:
    """Per host: ranks, CPUs each may use, torch threads; a warning when a host has fewer CPUs for its
    ranks than ranks (they were bound to too few cores)."""
    by_host: dict[str, list[dict]] = defaultdict(list)
    for place in places:
        by_host[place["host"]].append(place)
    lines = []
    for host, ranks in by_host.items():
        cpus = sorted(len(p["cpus"]) for p in ranks)
        threads = sorted(p["threads"] for p in ranks)
        lines.append(f"{host}: {len(ranks)} ranks, {_span(cpus)} CPUs each, {_span(threads)} torch threads each")
        used = {cpu for p in ranks for cpu in p["cpus"]}
        if len(used) < len(ranks):
            lines.append(f"warning: the {len(ranks)} ranks on {host} share {len(used)} CPU(s): they were bound to "
                         "too few cores (srun without --cpus-per-task since Slurm 22.05: export SRUN_CPUS_PER_TASK, "
                         "as launch/slurm/train.sbatch does)")
    return lines


def _span(values: list[int]) -> str:
    return f"{values[0]}" if values[0] == values[-1] else f"{values[0]}-{values[-1]}"


def this_rank() -> dict:
    """What the start-of-run checks compare across ranks."""
    return {"host": socket.gethostname(), "cpus": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
            **{name: os.environ.get(name) for name in AGREED_ENV}}


def check_ranks() -> tuple[Optional[str], list[str]]:
    """Collective: (an environment problem, the same on every rank, or None; placement lines)."""
    ranks = gather_objects(this_rank())
    return environment_problem(ranks), placement_lines(ranks)


"""Rank facts and errors that every rank raises together.

A collective job hangs when one rank raises and the others walk into the next collective
(an all-gather, a barrier) waiting for it. So code that may fail on some ranks only (a file
one rank cannot read, a write on rank 0) reports through ``raise_together``: every rank
learns every rank's outcome and all raise the same error, or none does.
"""
from __future__ import annotations

import socket
from typing import Any, Optional

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def free_port() -> int:
    """A TCP port free on this machine now, for a local rendezvous (MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_shm_buffers(port: int | str) -> None:
    """DeepSpeed's CPU shared-memory all-reduce leaves a ~66 MB /dev/shm file per rank and
    process group, named by the master port; repeated CPU jobs would fill memory."""
    import glob
    import os

    for path in glob.glob(f"/dev/shm/deepspeed_*_{port}_*"):
        try:
            os.remove(path)
        except OSError:
            pass


_OBJECT_GROUP: list = []  # a CPU (gloo) group for small Python objects, when the job made one


def set_object_group(group: Optional[Any]) -> None:
    """Where ``raise_together`` exchanges its messages: a gloo group keeps the pickles off the GPU
    (NCCL's all_gather_object moves them through device memory, with host syncs)."""
    _OBJECT_GROUP[:] = [group] if group is not None else []


def object_group() -> Optional[Any]:
    return _OBJECT_GROUP[0] if _OBJECT_GROUP else None


def raise_together(error: Optional[str], exc_type: type[Exception] = RuntimeError) -> None:
    """Collective: raise ``exc_type`` on every rank if any rank passed an error message."""
    errors = [error]
    world = rank_and_world()[1]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error, group=object_group())
    found = [(rank, e) for rank, e in enumerate(errors) if e]
    if found and len(found) == len(errors) and len({e for _, e in found}) == 1:
        raise exc_type(found[0][1])  # every rank hit the same problem: no rank to name
    if found:
        raise exc_type(f"rank {found[0][0]}: {found[0][1]}")

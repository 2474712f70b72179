"""Checkpoints of a DeepSpeed adapter job: engine, replicated bank and merge state together.

``save_dir/<tag>/`` holds DeepSpeed's files (trainable tensors only, ZeRO optimizer
partitions, ``client_state``), one ``merge_means_rank<r>.pt`` per rank with that rank's
running-mean slices (no rank gathers every mean; any world size can read them back), and
``ds_aslora.json`` (world size, ZeRO stage, step), written last. The replicated bank
(values + AdamW state) and the merge coordinator's shared state (groups, history with
steps and distances, observations) ride in ``client_state``. ``latest`` is replaced
atomically once every rank has finished, and a tag folder is never written twice, so a
crash during a save leaves the previous checkpoint whole and named by ``latest``.
Resuming reads files written by other ranks: like DeepSpeed's own, a shared filesystem.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from .atomic import atomic_write
from .coordinator import MergeCoordinator, rank_and_world
from .distributed import ReplicatedBank

MEANS_FILE = "merge_means_rank{rank:05d}.pt"
META_FILE = "ds_aslora.json"
LATEST = "latest"


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read as asked; raised on every rank alike."""


def _agree(error: Optional[str]) -> None:
    """Every rank raises if any rank found a problem, before anyone enters a collective
    that a failing rank would skip (a hang otherwise)."""
    errors = [error]
    world = rank_and_world()[1]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    found = [(rank, e) for rank, e in enumerate(errors) if e]
    if found:
        raise CheckpointError(f"rank {found[0][0]}: {found[0][1]}")


def save_checkpoint(engine: Any, save_dir: str, tag: Optional[str] = None, *, bank: Optional[ReplicatedBank] = None,
                    merger: Optional[MergeCoordinator] = None, client_state: Optional[dict] = None) -> str:
    """Collective: every rank calls it at the same step. Returns the checkpoint folder."""
    rank, world = rank_and_world()
    tag = str(tag or f"global_step{engine.global_steps}")
    folder = os.path.join(save_dir, tag)
    _agree(f"checkpoint {folder!r} exists; a tag is never overwritten in place (a crash would tear it): "
           f"remove it or save under a new tag" if os.path.exists(folder) else None)
    state = {"client": dict(client_state or {})}
    if bank is not None:
        state["shared_bank"] = bank.state_dict()
    if merger is not None:
        state["merge"] = merger.state_dict()
        os.makedirs(folder, exist_ok=True)
        means = merger.local_state_dict()
        atomic_write(os.path.join(folder, MEANS_FILE.format(rank=rank)), lambda tmp: torch.save(means, tmp))
    # DeepSpeed's own ``latest`` is written by rank 0 without waiting for the other ranks'
    # files; ours is written after the barrier that ends save_checkpoint.
    engine.save_checkpoint(save_dir, tag, client_state=state, save_latest=False, exclude_frozen_parameters=True)
    if rank == 0:
        meta = {"world_size": world, "zero_stage": engine.zero_optimization_stage(),
                "global_steps": engine.global_steps, "merge_state": merger is not None}
        _write_text(os.path.join(folder, META_FILE), json.dumps(meta))
        _write_text(os.path.join(save_dir, LATEST), tag)
    if dist.is_initialized():
        dist.barrier()
    return folder


def _check(load_dir: str, tag: Optional[str], stage: int, world: int, merger: Optional[MergeCoordinator]) -> tuple[str, dict]:
    """Raises a clear error for what this rank sees wrong; returns (tag, meta)."""
    if tag is None:
        path = os.path.join(load_dir, LATEST)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint to resume in {load_dir!r}: {path} does not exist")
        with open(path) as f:
            tag = f.read().strip()
    meta_path = os.path.join(load_dir, tag, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{os.path.join(load_dir, tag)!r} is not a complete ds_aslora checkpoint "
                                f"({META_FILE} is missing)")
    with open(meta_path) as f:
        meta = json.load(f)
    partitioned = stage > 0 or meta["zero_stage"] > 0
    if partitioned and (meta["world_size"], meta["zero_stage"]) != (world, stage):
        raise ValueError(f"checkpoint {tag!r} was written by {meta['world_size']} ranks at ZeRO stage "
                         f"{meta['zero_stage']}; its partitioned optimizer state cannot be mapped onto {world} "
                         f"ranks at stage {stage} (convert it with deepspeed.checkpoint.ds_to_universal first)")
    if merger is not None:
        if not meta["merge_state"]:
            raise ValueError(f"checkpoint {tag!r} has no merge state: it was saved without a MergeCoordinator")
        for r in range(meta["world_size"]):
            if not os.path.isfile(os.path.join(load_dir, tag, MEANS_FILE.format(rank=r))):
                raise FileNotFoundError(f"checkpoint {tag!r} lacks {MEANS_FILE.format(rank=r)} (the running means "
                                        f"of rank {r} of {meta['world_size']})")
    return tag, meta


def load_checkpoint(engine: Any, load_dir: str, tag: Optional[str] = None, *, bank: Optional[ReplicatedBank] = None,
                    merger: Optional[MergeCoordinator] = None) -> dict:
    """Collective. Restores engine, bank and merge state (ties included) before training
    continues; returns the ``client_state`` given to ``save_checkpoint``."""
    _, world = rank_and_world()
    try:
        tag, meta = _check(load_dir, tag, engine.zero_optimization_stage(), world, merger)
        error = None
    except (OSError, ValueError) as err:
        error = f"{type(err).__name__}: {err}"
    _agree(error)
    path, client = engine.load_checkpoint(load_dir, tag, load_module_strict=False)
    if path is None or engine.global_steps != meta["global_steps"]:
        raise CheckpointError(f"DeepSpeed did not restore {os.path.join(load_dir, tag)!r} (step {engine.global_steps}, "
                           f"expected {meta['global_steps']})")
    if bank is not None:
        if "shared_bank" not in client:
            raise CheckpointError(f"checkpoint {tag!r} has no shared-bank state: it was saved by another method")
        bank.load_state_dict(client["shared_bank"])
    if merger is not None:
        files = [os.path.join(load_dir, tag, MEANS_FILE.format(rank=r)) for r in range(meta["world_size"])]
        merger.load_state_dict(client["merge"], [torch.load(f, map_location="cpu", weights_only=True) for f in files])
    return client.get("client", {})

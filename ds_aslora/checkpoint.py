"""Checkpoints of a DeepSpeed adapter job: engine, replicated bank and merge state together.

``save_dir/<tag>/`` holds DeepSpeed's files (trainable tensors only, ZeRO optimizer
partitions, ``client_state``) and one ``merge_means_rank<r>.pt`` per rank with that rank's
running-mean slices (so no rank gathers every mean; any world size can read them back),
and ``ds_aslora.json`` (world size, ZeRO stage, step: checked before DeepSpeed loads).
The replicated bank (values + AdamW state) and the merge coordinator's shared state
(groups, history with steps and distances, observations) ride in ``client_state``. ``latest`` is written by us, atomically, after every rank has finished
its files: a crash during a save leaves the previous checkpoint as the one that loads.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from .atomic import atomic_write
from .coordinator import MergeCoordinator
from .distributed import ReplicatedBank

MEANS_FILE = "merge_means_rank{rank:05d}.pt"
META_FILE = "ds_aslora.json"
LATEST = "latest"


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def save_checkpoint(engine: Any, save_dir: str, tag: Optional[str] = None, *, bank: Optional[ReplicatedBank] = None,
                    merger: Optional[MergeCoordinator] = None, client_state: Optional[dict] = None) -> str:
    """Collective: every rank calls it at the same step. Returns the checkpoint folder."""
    rank, world = _rank_world()
    tag = str(tag or f"global_step{engine.global_steps}")
    state = {"client": dict(client_state or {})}
    if bank is not None:
        state["shared_bank"] = bank.state_dict()
    if merger is not None:
        state["merge"] = merger.state_dict()
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        means = merger.local_state_dict()
        atomic_write(os.path.join(save_dir, tag, MEANS_FILE.format(rank=rank)), lambda tmp: torch.save(means, tmp))
    # DeepSpeed's own ``latest`` is written by rank 0 without waiting for the other ranks'
    # files; ours is written after the barrier that ends save_checkpoint.
    engine.save_checkpoint(save_dir, tag, client_state=state, save_latest=False, exclude_frozen_parameters=True)
    if rank == 0:
        meta = {"world_size": world, "zero_stage": engine.zero_optimization_stage(), "global_steps": engine.global_steps}
        _write_text(os.path.join(save_dir, tag, META_FILE), json.dumps(meta))
        _write_text(os.path.join(save_dir, LATEST), tag)
    if dist.is_initialized():
        dist.barrier()
    return os.path.join(save_dir, tag)


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def latest_tag(load_dir: str) -> str:
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint to resume in {load_dir!r}: {path} does not exist")
    with open(path) as f:
        return f.read().strip()


def load_checkpoint(engine: Any, load_dir: str, tag: Optional[str] = None, *, bank: Optional[ReplicatedBank] = None,
                    merger: Optional[MergeCoordinator] = None) -> dict:
    """Collective. Restores engine, bank and merge state (ties included) before training
    continues; returns the ``client_state`` given to ``save_checkpoint``."""
    tag = tag or latest_tag(load_dir)
    meta_path = os.path.join(load_dir, tag, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{os.path.join(load_dir, tag)!r} is not a complete ds_aslora checkpoint "
                                f"({META_FILE} is missing)")
    with open(meta_path) as f:
        meta = json.load(f)
    _, world = _rank_world()
    stage = engine.zero_optimization_stage()
    if stage > 0 and (meta["world_size"], meta["zero_stage"]) != (world, stage):
        raise ValueError(f"checkpoint {tag!r} was written by {meta['world_size']} ranks at ZeRO stage "
                         f"{meta['zero_stage']}; its partitioned optimizer state cannot be mapped onto {world} "
                         f"ranks at stage {stage} (convert it with deepspeed.checkpoint.ds_to_universal first)")
    path, client = engine.load_checkpoint(load_dir, tag, load_module_strict=False)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint files in {os.path.join(load_dir, tag)!r}")
    for name, obj, key in (("shared bank", bank, "shared_bank"), ("merge coordinator", merger, "merge")):
        if obj is not None and key not in client:
            raise ValueError(f"checkpoint {tag!r} has no {name} state: it was saved by a different method")
    if bank is not None:
        bank.load_state_dict(client.pop("shared_bank"))
    if merger is not None:
        files = sorted(glob.glob(os.path.join(load_dir, tag, MEANS_FILE.replace("{rank:05d}", "*"))))
        merger.load_state_dict(client.pop("merge"), [torch.load(f, weights_only=True) for f in files])
    return client.get("client", {})

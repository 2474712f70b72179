"""Checkpoints of a DeepSpeed adapter job: engine, replicated bank and merge state together.

``save_dir/<tag>/`` holds DeepSpeed's files (trainable tensors only, ZeRO optimizer
partitions, ``client_state``), one ``merge_means_rank<r>.pt`` per rank with that rank's
running-mean slices (no rank gathers every mean; any world size can read them back), and
``ds_aslora.json`` (world size, ZeRO stage, step, adapter config, what it holds), written
last: it marks the folder complete. The replicated bank (values + optimizer state) and the
merge coordinator's shared state (groups, history with steps and distances, observations)
ride in ``client_state``. ``latest`` is replaced atomically once every rank has finished.

After a crash: ``latest`` still names the previous checkpoint, which loads. The folder the
crash tore (or any folder ``latest`` does not name) is set aside as ``<tag>.set-aside.<k>``
when the resumed run saves that tag again, kept for inspection; the folder ``latest`` names
is never overwritten. Resuming reads files written by other ranks: like DeepSpeed's own, it
needs a filesystem every rank shares (DeepSpeed's node-local storage mode is refused).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import random
import socket
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import log_dist

from ..adapters.config import AdapterConfig
from ..adapters.inject import adapter_config
from ..export.adapter import export_engine
from ..merging.coordinator import MergeCoordinator
from ..utils.atomic import atomic_write, write_text
from ..utils.ranks import raise_together, rank_and_world
from .replicated_bank import ReplicatedBank

MEANS_FILE = "merge_means_rank{rank:05d}.pt"
RNG_FILE = "rng_state_rank{rank:05d}.pt"
ADAPTER_DIR = "adapter"
META_FILE = "ds_aslora.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read as asked; raised on every rank alike."""


def _latest_tag(save_dir: str) -> Optional[str]:
    path = os.path.join(save_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def _save_problem(engine: Any, save_dir: str, tag: str) -> Optional[str]:
    if engine.use_node_local_storage():
        return ("checkpoint.use_node_local_storage=true keeps each node's files on its own disk, but a resume reads "
                "files every rank wrote (ZeRO partitions, running means): remove the key and save to a filesystem "
                "all nodes share")
    if _latest_tag(save_dir) == tag:
        return (f"checkpoint {os.path.join(save_dir, tag)!r} is the one {LATEST!r} names; it is never overwritten "
                f"in place (a crash would tear the resume point): save under a new tag")
    return None


def _set_aside(save_dir: str, tag: str) -> None:
    """Rank 0: a folder for ``tag`` that ``latest`` does not name (torn by a crash, or from an
    abandoned timeline) is renamed, not deleted, so the new save starts clean."""
    folder = os.path.join(save_dir, tag)
    if not os.path.exists(folder):
        return
    k = 0
    while os.path.exists(f"{folder}.set-aside.{k}"):
        k += 1
    complete = os.path.isfile(os.path.join(folder, META_FILE))
    os.replace(folder, f"{folder}.set-aside.{k}")
    log_dist(f"{'complete' if complete else 'torn (incomplete)'} checkpoint folder {folder!r} is not the one "
             f"{LATEST!r} names; moved to {folder}.set-aside.{k} before saving this step", ranks=[0])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


MODEL_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")


def model_identity(model: Any, name: Optional[str] = None) -> dict:
    """The base model's shape (a model or its config), enough to tell two models apart before
    DeepSpeed's shape errors, and its name for messages (not compared: folders move)."""
    config = getattr(model, "config", model)
    return {**{k: getattr(config, k, None) for k in MODEL_KEYS},
            "name_or_path": name or getattr(config, "name_or_path", "") or ""}


def check_same_model(tag: str, saved: dict, here: dict) -> None:
    """One line naming both models and how their shapes differ."""
    diff = [k for k in MODEL_KEYS if k in saved and saved[k] != here.get(k)]
    if diff:
        names = [repr(m.get("name_or_path")) if m.get("name_or_path") else "an unnamed model"
                 for m in (saved, here)]
        raise ValueError(f"checkpoint {tag!r} was trained on another base model: {names[0]} there, {names[1]} here ("
                         + "; ".join(f"{k}={saved[k]!r} there, {here.get(k)!r} here" for k in diff) + ")")


def rng_state() -> dict:
    """This rank's random generators (dropout, sampling): each rank draws its own stream."""
    from deepspeed.accelerator import get_accelerator

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # tensors and plain tuples only, so loading needs no unpickling (torch.load weights_only=True)
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss), "torch": torch.get_rng_state()}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        state["accelerator"] = accelerator.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def on_cpu(state: Any) -> Any:
    """``state`` with every tensor on the CPU. ``client_state`` lands in rank 0's module-state file,
    which every rank reads back: an accelerator tensor in it would be created on rank 0's device
    (cuda:0) by every rank of the node."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_cpu(v) for v in state)
    return state


@contextlib.contextmanager
def _reads_to_cpu(engine: Any) -> Iterator[None]:
    """DeepSpeed reads its module-state file with an identity ``map_location`` (state_dict_factory),
    so a tensor saved from cuda:0 is restored onto cuda:0 by every rank: read every file onto the
    CPU instead (module parameters and optimizer states are copied to their own devices after)."""
    checkpoint_engine = engine.checkpoint_engine
    load = checkpoint_engine.load
    checkpoint_engine.load = lambda path, map_location=None: load(path, map_location="cpu")
    try:
        yield
    finally:
        checkpoint_engine.load = load


def save_checkpoint(engine: Any, save_dir: str, tag: Optional[str] = None, *, bank: Optional[ReplicatedBank] = None,
                    merger: Optional[MergeCoordinator] = None, client_state: Optional[dict] = None,
                    export_adapter: bool = False, adapter_files: Optional[Callable[[str], None]] = None) -> str:
    """Collective: every rank calls it at the same step. Returns the checkpoint folder.
    ``export_adapter``: also write the compact adapter (fp32 masters) to ``<folder>/adapter``,
    so ``ds-aslora-export`` can turn any checkpoint into a peft or merged model offline;
    ``adapter_files(folder)``: what rank 0 adds there (the tokenizer), before the checkpoint counts as complete."""
    rank, world = rank_and_world()
    tag = str(tag or f"global_step{engine.global_steps}")
    folder = os.path.join(save_dir, tag)
    raise_together(_save_problem(engine, save_dir, tag), CheckpointError)
    if rank == 0:
        _set_aside(save_dir, tag)
    _barrier()
    state = {"client": dict(client_state or {})}
    os.makedirs(folder, exist_ok=True)
    rng = rng_state()
    atomic_write(os.path.join(folder, RNG_FILE.format(rank=rank)), lambda tmp: torch.save(rng, tmp))
    if export_adapter:
        export_engine(engine, compact_dir=os.path.join(folder, ADAPTER_DIR))
        error = None
        if rank == 0 and adapter_files is not None:
            try:
                adapter_files(os.path.join(folder, ADAPTER_DIR))
            except OSError as err:
                error = f"could not write beside the adapter of {folder!r}: {err}"
        raise_together(error, CheckpointError)
    if bank is not None:
        state["shared_bank"] = on_cpu(bank.state_dict())
    if merger is not None:
        state["merge"] = on_cpu(merger.state_dict())
        means = merger.local_state_dict()
        atomic_write(os.path.join(folder, MEANS_FILE.format(rank=rank)), lambda tmp: torch.save(means, tmp))
    # DeepSpeed's own ``latest`` is written by rank 0 without waiting for the other ranks'
    # files; ours is written after the barrier that ends save_checkpoint.
    engine.save_checkpoint(save_dir, tag, client_state=state, save_latest=False, exclude_frozen_parameters=True)
    if rank == 0:
        meta = {"world_size": world, "zero_stage": engine.zero_optimization_stage(),
                "global_steps": engine.global_steps, "merge_state": merger is not None,
                "shared_bank": bank is not None, "adapter": adapter_config(engine.module).to_dict(),
                "model": model_identity(engine.module),
                "host": socket.gethostname()}
        write_text(os.path.join(folder, META_FILE), json.dumps(meta))
        write_text(os.path.join(save_dir, LATEST), tag)
    _barrier()
    return folder


# ASLoRA's window: the schedule built from it is saved with the merge state, and a resumed run keeps it
SCHEDULE_WINDOW = ("merge_start", "merge_end", "merge_interval", "merges_per_event")


def comparable_adapter(values: dict) -> dict:
    """What must match to resume: the adapter settings, a key an older checkpoint lacks taking its
    default, without the schedule's window."""
    defaults = AdapterConfig().to_dict()
    return {k: values.get(k, defaults[k]) for k in defaults if k not in SCHEDULE_WINDOW}


def check_resumable(load_dir: str, tag: Optional[str], *, world: int, stage: int, adapter: dict,
                    model: Optional[dict] = None) -> tuple[str, dict]:
    """Whether a job of ``world`` ranks at ZeRO ``stage`` with this adapter config (and base
    model, when known) can resume the checkpoint, from its metadata alone: a job checks this
    before it loads a model. Returns (tag, meta); raises a clear error otherwise."""
    if tag is None:
        tag = _latest_tag(load_dir)
        if tag is None:
            raise FileNotFoundError(f"no checkpoint to resume in {load_dir!r}: {os.path.join(load_dir, LATEST)} "
                                    f"does not exist")
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
                         f"ranks at stage {stage}: resume with the same number of ranks and ZeRO stage (a stage-0 "
                         f"checkpoint can change world size)")
    if model is not None and "model" in meta:
        check_same_model(tag, meta["model"], model)
    saved = comparable_adapter(meta["adapter"])
    if saved != comparable_adapter(adapter):
        here = comparable_adapter(adapter)
        diff = sorted(k for k in set(here) | set(saved) if here.get(k) != saved.get(k))
        raise ValueError(f"checkpoint {tag!r} was trained with another adapter config: "
                         + ", ".join(f"{k}={saved.get(k)!r} there, {here.get(k)!r} here" for k in diff))
    return tag, meta


def _check(load_dir: str, tag: Optional[str], engine: Any, world: int, bank: Optional[ReplicatedBank],
           merger: Optional[MergeCoordinator]) -> tuple[str, dict]:
    """Raises a clear error for what this rank sees wrong; returns (tag, meta)."""
    tag, meta = check_resumable(load_dir, tag, world=world, stage=engine.zero_optimization_stage(),
                                adapter=adapter_config(engine.module).to_dict(), model=model_identity(engine.module))
    for saved, given, what in ((meta["shared_bank"], bank, "shared-bank tensors and their optimizer state (bank=)"),
                               (meta["merge_state"], merger, "ASLoRA merge state: ties and running means (merger=)")):
        if saved and given is None:
            raise ValueError(f"checkpoint {tag!r} holds {what} but load_checkpoint was not given them: loading "
                             f"without them would restart from random shared tensors or untied layers")
        if given is not None and not saved:
            raise ValueError(f"checkpoint {tag!r} has no {what}: it was saved by another method or without them")
    if meta["zero_stage"] > 0:  # DeepSpeed's own partition file for this rank (same world and stage: checked)
        rank = rank_and_world()[0]
        if not glob.glob(os.path.join(load_dir, tag, f"*zero_pp_rank_{rank}_mp_rank_*optim_states.pt")):
            raise FileNotFoundError(f"checkpoint {tag!r} lacks rank {rank}'s optimizer partition "
                                    f"(zero_pp_rank_{rank}_mp_rank_00_optim_states.pt)")
    if merger is not None:  # the files this rank reads (its own, or a few after a re-cut): O(1) per rank
        for r in merger.saved_ranks_needed(meta["world_size"]):
            if not os.path.isfile(os.path.join(load_dir, tag, MEANS_FILE.format(rank=r))):
                raise FileNotFoundError(f"checkpoint {tag!r} lacks {MEANS_FILE.format(rank=r)} (the running means "
                                        f"of rank {r} of {meta['world_size']})")
    return tag, meta


def load_checkpoint(engine: Any, load_dir: str, tag: Optional[str] = None, *, bank: Optional[ReplicatedBank] = None,
                    merger: Optional[MergeCoordinator] = None) -> dict:
    """Collective. Restores engine, bank and merge state (ties included) before training
    continues; returns the ``client_state`` given to ``save_checkpoint``. A checkpoint that
    holds a bank or merge state must be given ``bank=`` / ``merger=``."""
    rank, world = rank_and_world()
    rng, means = None, {}
    try:  # everything this rank reads by itself, before DeepSpeed's collectives
        tag, meta = _check(load_dir, tag, engine, world, bank, merger)
        rng_file = os.path.join(load_dir, tag, RNG_FILE.format(rank=rank))
        if meta["world_size"] == world and os.path.isfile(rng_file):
            rng = torch.load(rng_file, map_location="cpu", weights_only=True)  # tensors and tuples: nothing unpickled
        if merger is not None:
            means = {r: torch.load(os.path.join(load_dir, tag, MEANS_FILE.format(rank=r)), map_location="cpu",
                                   weights_only=True) for r in merger.saved_ranks_needed(meta["world_size"])}
        error = None
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as err:
        error = f"{type(err).__name__}: {err}".split("\n")[0]
    raise_together(error, CheckpointError)
    # DeepSpeed fails on the rank whose file is bad (None, or an exception) and carries on elsewhere:
    # every rank must stop together, not wait in the next collective for the one that left.
    path, client, error = None, None, None
    try:
        with _reads_to_cpu(engine):
            path, client = engine.load_checkpoint(load_dir, tag, load_module_strict=False)
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
        error = f"{type(err).__name__}: {err}".split("\n")[0]
    if error is None and (path is None or engine.global_steps != meta["global_steps"]):
        error = (f"DeepSpeed did not restore {os.path.join(load_dir, tag)!r} (step {engine.global_steps}, expected "
                 f"{meta['global_steps']})")
    raise_together(error, CheckpointError)
    if bank is not None:
        bank.load_state_dict(client["shared_bank"])
    if rng is not None:
        set_rng_state(rng)
    else:
        log_dist(f"random generators not restored (checkpoint from {meta['world_size']} ranks, now {world})",
                 ranks=[0])
    if merger is not None:
        merger.load_state_dict(client["merge"], means, meta["world_size"])
    return client.get("client", {})

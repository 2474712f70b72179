"""The fine-tuning job behind ``launch/train.py``: run config -> model -> data -> engine ->
resume -> loop -> export, on every rank of a DeepSpeed (or torchrun) launch.

Rank-0 work (resolved config, the run log, exports, the sample) is done by global rank 0;
per-node work (the default model's conversion, tokenised-data caches) by local rank 0 before
a barrier. Bad input fails before anything is written to the output directory, with one line.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..adapters.count import count_plain_lora, count_trainable
from ..adapters.inject import inject_adapters
from ..export.adapter import export_engine
from ..merging.coordinator import MergeCoordinator
from ..merging.schedule import ScheduleError, model_schedule
from ..planning.inventory import engine_numel, inventory
from ..runtime.checkpoint import (
    ADAPTER_DIR,
    LATEST,
    CheckpointError,
    check_resumable,
    check_same_model,
    load_checkpoint,
    model_identity,
    save_checkpoint,
)
from ..runtime.ds_config import load_ds_config, without_monitors
from ..runtime.engine import initialize
from ..utils.atomic import write_text
from ..utils.ranks import raise_together, rank_and_world, remove_shm_buffers
from . import assets
from .data import PreparedData, cache_dir_of, prepare_data
from .dist_setup import (
    SetupChannelError,
    barrier,
    check_ranks,
    close_distributed,
    init_distributed,
    local_rank,
    setup_barrier,
)
from .exports import BEST, export_best, save_tokenizer, serving_tokenizer, vllm_command
from .loop import Job, NonFiniteLoss, evaluate, generate, train
from .model_setup import (
    TINY,
    check_attention,
    check_model_folder,
    enable_activation_checkpointing,
    is_hub_id,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from .render import Renderer
from .resolved import deepspeed_config, derive, lr_at, save_resolved
from .run_config import ConfigError, RunConfig, parse_run_config
from .run_log import TRAINER_LOG, RunLogger, continue_wandb_run, deepspeed_monitor, missing_monitor_package

CHECKPOINTS, ADAPTER, RUNS, SUMMARY, SAMPLE = "checkpoints", "adapter", "runs", "summary.json", "sample.txt"
# With no --data: the embedded Shakespeare sample, and settings that finish in minutes on CPU and show
# what the project is for (ASLoRA merging down to a quarter of LoRA's parameters within the 40 steps).
# Each applies only where the user did not set the field.
EMBEDDED = {"adapter": {"method": "aslora", "target_ratio": 0.25},
            "data": {"format": "text", "packing": True, "max_seq_length": 256},
            "training": {"max_steps": 40, "learning_rate": 1e-3, "micro_batch_size": 2, "eval_interval": 20,
                         "eval_batches": 8},
            "model": {"activation_checkpointing": False},
            "logging": {"log_interval": 5, "sample_prompt": "ROMEO:\n"},
            "checkpoint": {"save_interval": 0}}


def say(message: str) -> None:
    """One line on global rank 0."""
    if rank_and_world()[0] == 0:
        print(message, flush=True)


def apply_embedded_defaults(run: RunConfig) -> None:
    """With no data given: the Shakespeare sample (Hamlet held out) and a short CPU-sized run."""
    given = set(run.given)
    if given & {"merge_count", "target_groups"}:  # the user's ASLoRA target replaces the preset's
        given.add("target_ratio")
    for section, values in EMBEDDED.items():
        config = getattr(run, section)
        for name, value in values.items():
            if name not in given:
                setattr(config, name, value)
    cache = os.path.join(assets.cache_root(), "shakespeare")
    train_txt, heldout_txt = assets.shakespeare_paths()
    run.data.data = os.path.join(cache, f"train-{assets.ROW_CHARS}.jsonl")  # the row size names the file
    run.data.eval_data = os.path.join(cache, f"heldout-{assets.ROW_CHARS}.jsonl")
    if local_rank() == 0:
        for txt, jsonl in ((train_txt, run.data.data), (heldout_txt, run.data.eval_data)):
            if not os.path.isfile(jsonl):
                os.makedirs(cache, exist_ok=True)
                assets.write_text_dataset(txt, jsonl)
    setup_barrier()


class AlreadyFinished(Exception):
    """The output directory holds this run, finished: nothing to do (exit 0, saying where the results are)."""


def decided_by_rank0(decide: Callable[[], Any]) -> Any:
    """``decide()`` on global rank 0, its answer (or ConfigError) broadcast: ranks that read
    ``latest`` or ``summary.json`` themselves could disagree (caching, a file one node does not
    see) and walk into different collectives."""
    rank, world = rank_and_world()
    decision: list = [None]
    if rank == 0:
        try:
            decision = [("ok", decide())]
        except ConfigError as err:
            decision = [("error", str(err))]
    if world > 1:
        dist.broadcast_object_list(decision, src=0)
    kind, value = decision[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def check_output_dir(run: RunConfig) -> Optional[tuple[str, str]]:
    """Which checkpoint to resume (``(dir, tag)``) or None. An output_dir that holds a run continues
    it (the same command run again picks up where it stopped), unless overwrite_output_dir."""
    ckpt_dir = os.path.join(run.logging.output_dir, CHECKPOINTS)
    latest = os.path.join(ckpt_dir, LATEST)
    resume = run.checkpoint.resume
    if resume == "auto":
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            return ckpt_dir, f.read().strip()
    if resume:
        folder = os.path.normpath(resume)
        if os.path.isfile(os.path.join(folder, LATEST)):  # a checkpoints folder: its latest
            with open(os.path.join(folder, LATEST)) as f:
                return folder, f.read().strip()
        if not os.path.isdir(folder):
            raise ConfigError(f"resume={resume!r}: no such checkpoint folder")
        return os.path.dirname(folder), os.path.basename(folder)
    if os.path.isfile(latest) and not run.checkpoint.overwrite_output_dir:
        with open(latest) as f:
            return ckpt_dir, f.read().strip()
    return None


# What may change between a run and the same command run again (a longer run continues it).
RERUN_MAY_CHANGE = ("max_steps", "num_train_epochs", "resume", "overwrite_output_dir", "dist_timeout_minutes",
                    "preprocessing_num_workers", "data_cache_dir")


def run_settings(run: RunConfig) -> dict:
    """The settings that make a run this run, as summary.json records them for a rerun to compare."""
    return json.loads(json.dumps({k: v for k, v in run.to_dict().items() if k not in RERUN_MAY_CHANGE}, default=str))


def finished_run(run: RunConfig, resume_from: tuple[str, str], max_steps: int) -> Optional[str]:
    """Rank 0: a message when ``resume_from`` is where this output_dir's run finished (its summary
    names it, the exports were written after it, and it reached max_steps or stopped early);
    ConfigError when that finished run had other settings."""
    out = run.logging.output_dir
    path = os.path.join(out, SUMMARY)
    if not os.path.isfile(path) or os.path.abspath(resume_from[0]) != os.path.abspath(os.path.join(out, CHECKPOINTS)):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    if summary.get("checkpoint") != resume_from[1]:
        return None
    if summary.get("steps", 0) < max_steps and "stopped_early" not in summary:
        return None
    saved, here = summary.get("settings", {}), run_settings(run)
    diff = sorted(k for k in set(saved) | set(here) if saved.get(k) != here.get(k))
    if diff:
        raise ConfigError(f"output_dir {out!r} holds a finished run with other settings ("
                          + ", ".join(f"{k}={saved.get(k)!r} there, {here.get(k)!r} here" for k in diff[:5])
                          + "): pass --overwrite_output_dir to start over or choose another output_dir")
    how = (f"stopped early at step {summary['steps']}" if "stopped_early" in summary
           else f"step {summary['steps']} of {max_steps}")
    more = "" if "stopped_early" in summary else "; a larger --max_steps continues it"
    return (f"output_dir {out!r} holds this run, finished ({how}): adapters in {os.path.join(out, ADAPTER)}, figures "
            f"in {path}, TensorBoard: tensorboard --logdir {os.path.join(out, RUNS)}. To train again pass "
            f"--overwrite_output_dir or another --output_dir{more}")


def check_shared_filesystem(out: str) -> None:
    """Checkpoints are read across ranks: every rank must see a file global rank 0 wrote in the
    output directory (one node always does; several need a shared filesystem)."""
    import socket
    import uuid

    rank, world = rank_and_world()
    created = [not os.path.isdir(out)]
    if world > 1:
        dist.broadcast_object_list(created, src=0)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, ".shared_filesystem_check")
    token = [f"{socket.gethostname()}:{uuid.uuid4().hex}"]
    if world > 1:
        dist.broadcast_object_list(token, src=0)
    if rank == 0:
        with open(path, "w") as f:
            f.write(token[0])
    barrier()
    seen = None
    if os.path.isfile(path):
        with open(path) as f:
            seen = f.read()
    error = None if seen == token[0] else (
        f"{socket.gethostname()} does not see the file rank 0 ({token[0].split(':')[0]}) wrote in output_dir "
        f"{out!r}: checkpoints need a filesystem every node shares (point output_dir at it)")
    raise_together(error, ConfigError)
    barrier()
    if rank == 0:
        os.remove(path)
        if created[0]:  # bad input found later leaves no trace; save_resolved creates it again
            os.rmdir(out)


def data_identity(run: RunConfig, derived: Any, data: Any) -> dict:
    """What the data position means: the same stream needs the same rows, seed and global batch.
    (Checkpoints before ``rows`` kept ``content``, a digest of the stored integer widths: not compared.)"""
    return {"global_batch_size": derived.global_batch_size, "seed": run.training.seed,
            "train_sequences": len(data.train), "rows": data.train_digest()}


def check_same_data(saved: dict, now: dict) -> None:
    """Collective: a resumed run continues the saved data stream only if it is the same stream. Each
    rank compares its own data (node-local caches may differ), and all ranks stop together."""
    diff = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
    raise_together("the checkpoint's data stream differs from this run's, so its data position would skip or "
                   "repeat rows: " + ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in diff.items())
                   if diff else None, ConfigError)


def base_config(model: str, trust_remote_code: bool) -> Any:
    """The base model's config without its weights: its width sizes ZeRO-3's buckets (the
    DeepSpeed config's ``"auto"`` values) and its shape is checked against a checkpoint's."""
    if model == TINY:
        from .model_setup import tiny_config

        return tiny_config()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)


def check_schedule_fits(merger: MergeCoordinator, max_steps: int) -> None:
    """A resumed ASLoRA run keeps the schedule it started with; a max_steps that ends before its
    last merge would leave merges undone."""
    events = merger.policy.schedule.events
    if events and events[-1][0] > max_steps and any(merger.policy.merges_left(m) for m in merger.policy.groups):
        raise ConfigError(f"the checkpoint's ASLoRA schedule merges until step {events[-1][0]}, after max_steps="
                          f"{max_steps}: resume with max_steps >= {events[-1][0]} (a resumed run keeps its schedule)")


def meta_model(run: RunConfig, config: Any) -> Any:
    """The adapted model on the meta device (no weights): its shapes size buckets and schedules."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=run.model.trust_remote_code)
    return inject_adapters(model, run.adapter)


def shared_mode_of(run: RunConfig) -> str:
    """sharelora share=AB has no per-layer tensor: its shared tensors are then DeepSpeed's own parameters."""
    return "engine" if run.adapter.method == "sharelora" and run.adapter.share == "AB" else "replicated"


def check_aslora_schedule(meta: Any, max_steps: int) -> None:
    """ASLoRA's schedule on the base model's shape: ConfigError when the schedule asked for cannot
    reach its target, before the model loads."""
    try:
        model_schedule(meta, max_steps)
    except ScheduleError as err:
        raise ConfigError(str(err)) from None


def prepare_job_data(run: RunConfig, tokenizer: Any) -> PreparedData:
    """Tokenise (and pack) once, before the model loads: global rank 0 first (a cache on a shared
    disk is then ready for everyone), then the first rank of every other node (node-local
    caches), then the rest, who read the cache. ``launch/prepare.py`` fills the same cache."""
    rank = rank_and_world()[0]
    cache = cache_dir_of(run.data)
    data = None
    for turn in (rank == 0, local_rank() == 0 and rank != 0, local_rank() != 0):
        error = None
        if turn:
            try:
                data = prepare_data(run.data, tokenizer, seed=run.training.seed, cache_dir=cache)
            except (ValueError, OSError) as err:  # bad data: the waiting ranks must not wait 4 hours
                error = str(err)
        setup_barrier()
        raise_together(error, ConfigError)
    say(f"data: {'read the prepared cache' if data.from_cache else 'tokenised into'} {data.cache}"
        + (" (nothing tokenised)" if data.from_cache else ""))
    if data.miss:  # e.g. prepare.py ran with other options or another tokenizer
        say(f"data: no cached set had this key; {data.miss}")
    for split, stats in data.stats.items():
        if stats.truncated:
            say(f"{split}: {stats.truncated} of {stats.rows} sequences were longer than max_seq_length="
                f"{run.data.max_seq_length} (longest {stats.longest} tokens) and were truncated "
                f"(--truncation refuse stops instead)")
    return data


def rotate_checkpoints(ckpt_dir: str, keep: Optional[int], best: Optional[str] = None) -> None:
    """Rank 0, after a completed save: delete the oldest ``global_step*`` beyond ``keep``
    (never the one ``latest`` names, nor ``best``, the folder of the checkpoint with the best eval loss)."""
    if keep is None:
        return
    with open(os.path.join(ckpt_dir, LATEST)) as f:
        latest = f.read().strip()
    def step(tag: str) -> int:
        return int(tag[len("global_step"):])

    tags = sorted((t for t in os.listdir(ckpt_dir) if t.startswith("global_step") and t[11:].isdigit()
                   and step(t) <= step(latest)), key=step)  # folders past latest: another timeline
    for tag in tags[:-keep]:
        folder = os.path.join(ckpt_dir, tag)
        if best is None or os.path.abspath(folder) != os.path.abspath(best):
            shutil.rmtree(folder)


def resolve_model_everywhere(run: RunConfig) -> str:
    """The model folder on every rank. What must be fetched or built first (a hub download, the default
    model's conversion) is done by global rank 0 (a shared cache is then filled once), then by the first
    rank of every other node (node-local caches); the others read what their node's first rank left."""
    if run.model.model == TINY:
        return TINY
    rank = rank_and_world()[0]
    model_path = None
    for turn in (rank == 0, local_rank() == 0 and rank != 0, local_rank() != 0):
        error = None
        if turn:
            try:
                model_path = resolve_model_path(run.model.model, download=local_rank() == 0)
            except (ValueError, OSError) as err:  # the waiting ranks must not wait 4 hours, nor die on a reset
                error = str(err)
        setup_barrier()
        raise_together(error, ConfigError)
    return model_path


def check_finished(run: RunConfig, resume_from: tuple[str, str], max_steps: int) -> None:
    """AlreadyFinished on every rank when output_dir holds this run, finished (rank 0 decides)."""
    finished = decided_by_rank0(lambda: finished_run(run, resume_from, max_steps))
    if finished:
        raise AlreadyFinished(finished)


def setup(run: RunConfig, ds_path: str) -> "Setup":
    """Config, model, data, engine and resume: everything that bad input can fail, before the
    output directory is written to."""
    started = time.time()
    rank, world = rank_and_world()
    problem, placement = check_ranks()  # every rank gets the same answer: all stop together
    if problem:
        raise ConfigError(problem)
    for line in placement:
        say(line)
    if run.data.data is None:
        apply_embedded_defaults(run)
    out = run.logging.output_dir
    resume_from = decided_by_rank0(lambda: check_output_dir(run))  # rank 0's view; other nodes' is checked below
    ds_json = load_ds_config(ds_path)
    # Checked before any data is read; with num_train_epochs the steps need the prepared data first.
    derived = derive(run, world, ds_json, ds_path=ds_path) if run.training.num_train_epochs is None else None
    resumable, error = None, None
    if resume_from is not None:  # before anything is built: the checkpoint's metadata alone
        try:
            resumable = check_resumable(*resume_from, world=world,
                                        stage=ds_json.get("zero_optimization", {}).get("stage", 0),
                                        adapter=run.adapter.to_dict())
        except (OSError, ValueError) as err:
            error = str(err) + ("" if run.checkpoint.resume else (
                f"; output_dir {out!r} holds that run: pass --overwrite_output_dir to start over or choose another "
                f"output_dir"))
    raise_together(error, ConfigError)  # a rank that sees the checkpoint otherwise must not leave alone
    if resume_from is not None and derived is not None:
        check_finished(run, resume_from, derived.max_steps)
    model_path = resolve_model_everywhere(run)
    # Every rank reads its own copy (node-local folders may differ): all ranks stop together.
    error, config = None, None
    try:
        check_attention(run.model.attn_implementation, run.model.dtype)
        if model_path != TINY:
            check_model_folder(model_path)
        config = base_config(model_path, run.model.trust_remote_code)
        if resumable is not None and "model" in resumable[1]:  # another base model: refused before DeepSpeed writes
            check_same_model(resumable[0], resumable[1]["model"], model_identity(config, name=model_path))
    except (OSError, ValueError) as err:
        error = str(err)
    raise_together(error, ConfigError)
    check_shared_filesystem(out)  # after every check of bad input: a refused run leaves output_dir as it was
    tokenizer = load_tokenizer(model_path, run.model.trust_remote_code)
    data = prepare_job_data(run, tokenizer)
    if derived is None:
        derived = derive(run, world, ds_json, ds_path=ds_path, train_sequences=len(data.train))
        say(f"num_train_epochs {run.training.num_train_epochs:g}: {len(data.train):,} training sequences / global "
            f"batch {derived.global_batch_size} -> {derived.max_steps} steps")
        if resume_from is not None:
            check_finished(run, resume_from, derived.max_steps)
    if run.training.early_stopping_patience is not None and data.eval is None:
        raise ConfigError("early_stopping_patience needs eval data: set eval_data or eval_fraction")
    meta = meta_model(run, config)
    ds_config = deepspeed_config(ds_json, derived, os.path.join(out, RUNS), ds_path=ds_path,
                                 hidden_size=config.hidden_size,
                                 engine_numel=engine_numel(inventory(meta), shared_mode_of(run)))
    # rank 0 writes the monitors: its packages count
    raise_together(missing_monitor_package(ds_config, ds_path) if rank == 0 else None, ConfigError)
    if run.adapter.method == "aslora" and resume_from is None:  # refused before the model loads (a resumed
        check_aslora_schedule(meta, derived.max_steps)             # run keeps the schedule it started with)
    model, keep_alive = load_model(model_path, tokenizer, ds_config, derived.dtype, seed=run.training.seed,
                                   trust_remote_code=run.model.trust_remote_code,
                                   attn_implementation=run.model.attn_implementation)
    source = run.model.model if is_hub_id(run.model.model) else model_path  # what an export records as its base
    torch.manual_seed(run.training.seed)  # adapter initialisation (rank 0's is broadcast)
    inject_adapters(model, run.adapter)
    if run.model.activation_checkpointing:
        enable_activation_checkpointing(model)
    # No monitors in the engine: the job logs every metric itself, to DeepSpeed's monitors too (run_log).
    # The engine's scheduler also computes the lr after the last step: hold it there.
    engine, bank = initialize(model, without_monitors(ds_config), shared_mode=shared_mode_of(run),
                              lr_schedule=lambda k: lr_at(min(k, derived.max_steps), derived))
    merger = None
    if run.adapter.method == "aslora":  # resuming: the checkpoint's schedule, not one for this max_steps
        merger = MergeCoordinator(engine, total_steps=None if resume_from is not None else derived.max_steps)
    ckpt_dir = os.path.join(out, CHECKPOINTS)
    if resume_from is None and run.checkpoint.overwrite_output_dir and rank == 0:
        for name in (CHECKPOINTS, RUNS, ADAPTER):  # the previous run's, not mixed into this one's
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    barrier()
    client: dict = {}
    if resume_from is not None:
        client = load_checkpoint(engine, resume_from[0], resume_from[1], bank=bank, merger=merger)
        check_same_data(client.get("data", {}), data_identity(run, derived, data))
        if merger is not None:
            check_schedule_fits(merger, derived.max_steps)
        if rank == 0 and os.path.abspath(resume_from[0]) == os.path.abspath(ckpt_dir):
            # resuming an older checkpoint of this run: it becomes the line saves continue
            # (later folders are set aside when a save reaches their step)
            write_text(os.path.join(ckpt_dir, LATEST), resume_from[1])
        barrier()
        say(f"resumed from {os.path.join(*resume_from)} at step {engine.global_steps}"
            + ("" if run.checkpoint.resume else " (the unfinished run in output_dir; --overwrite_output_dir starts "
               "over)"))
    monitor, error = None, None
    if rank == 0:  # DeepSpeed's monitors write from rank 0; after the overwrite, which would remove csv's folder
        try:
            if ds_config.get("wandb", {}).get("enabled") is True:
                continue_wandb_run(out, resuming=resume_from is not None)
            monitor = deepspeed_monitor(ds_config)
        except Exception as err:  # wandb or comet refusing to start (login, network): all ranks stop, none waits
            error = f"a DeepSpeed monitor enabled in {ds_path} could not start: {err}"
    raise_together(error, ConfigError)
    if rank == 0:
        save_resolved(run, ds_config, out)
    # after a resume, events the crashed run logged past its checkpoint are dropped
    logger = RunLogger(out, derived.run_name, enabled=rank == 0,
                       purge_step=engine.global_steps + 1 if resume_from is not None else None, monitor=monitor)
    if ds_config.get("tensorboard", {}).get("enabled") is True:
        say(f"note: DeepSpeed's tensorboard monitor ({ds_path}) is not started: the job writes TensorBoard itself, "
            f"to {logger.log_dir} (DeepSpeed's would add a second loss curve there)")
    logger.text("config/run", engine.global_steps, "```\n" + json.dumps(run.to_dict(), indent=1, default=str) + "\n```")
    if merger is not None:  # the schedule in force (a resumed run's is the one it started with)
        schedule = merger.policy.schedule.describe(merger.policy.num_layers, merger.policy.counts)
        say(schedule)
        logger.text("aslora/schedule", engine.global_steps, schedule)

    return Setup(run=run, derived=derived, engine=engine, bank=bank, merger=merger, tokenizer=tokenizer,
                 data=data, source=source, keep_alive=keep_alive, logger=logger, ckpt_dir=ckpt_dir, started=started,
                 base_config=config, client=client)


@dataclasses.dataclass
class Setup:
    """A job ready to train: what ``setup`` built from the run config."""

    run: RunConfig
    derived: Any
    engine: Any
    bank: Any
    merger: Optional[MergeCoordinator]
    tokenizer: Any
    data: Any
    source: str
    keep_alive: Any
    logger: RunLogger
    ckpt_dir: str
    started: float
    base_config: Any  # the base model's transformers config (its shape rebuilds a checkpoint's peft export)
    client: dict  # the resumed checkpoint's client_state ({} for a new run)


def execute(s: Setup) -> dict:
    """Evaluate, train, export and sample; returns the summary rank 0 prints."""
    run, derived, engine, bank, merger, logger = s.run, s.derived, s.engine, s.bank, s.merger, s.logger
    rank, world = rank_and_world()
    out, ckpt_dir, data, tokenizer, source = run.logging.output_dir, s.ckpt_dir, s.data, s.tokenizer, s.source
    trainable = count_trainable(engine.module)
    say(f"{run.adapter.method}: {trainable:,} trainable parameters; {len(data.train):,} training sequences; "
        f"global batch {derived.global_batch_size} ({derived.micro_batch_size} x {derived.gradient_accumulation_steps} "
        f"x {world} ranks); {derived.max_steps} steps; {derived.dtype}; ZeRO-{engine.zero_optimization_stage()}")

    serving = serving_tokenizer(tokenizer, data.format)
    base_name = None if source == TINY else source if is_hub_id(source) else os.path.abspath(source)
    if rank == 0:  # a summary names a finished run: the previous one's (overwritten, or rolled back) goes
        for name in (SUMMARY, SAMPLE):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))

    def save(step: int) -> None:
        tag = f"global_step{step}"
        job.best.saved(os.path.abspath(os.path.join(ckpt_dir, tag)), step)
        save_checkpoint(engine, ckpt_dir, tag, bank=bank, merger=merger, export_adapter=True,
                        adapter_files=lambda folder: save_tokenizer(serving, folder),
                        client_state={"data_position": step, "data": data_identity(run, derived, data),
                                      "best": job.best.state_dict()})
        if rank == 0:
            try:  # a folder the filesystem will not delete yet (NFS silly-renames) is no reason to stop
                rotate_checkpoints(ckpt_dir, run.checkpoint.save_total_limit, best=job.best.checkpoint)
            except OSError as err:
                print(f"warning: rotating checkpoints in {ckpt_dir}: {err}", file=sys.stderr, flush=True)
        barrier()

    job = Job(engine=engine, bank=bank, merger=merger, derived=derived, train_data=data.train,
              eval_data=data.eval, pad_id=tokenizer.pad_token_id, seed=run.training.seed, logger=logger,
              log_interval=run.logging.log_interval, eval_interval=run.training.eval_interval,
              eval_batches=run.training.eval_batches, save_interval=run.checkpoint.save_interval, save=save,
              early_stopping_patience=run.training.early_stopping_patience)
    job.best.load_state_dict(s.client.get("best", {}))
    # a run that stopped early and was killed before its exports: stopped, not trained on
    job.stopped_early = job.best.stop_reason(job.early_stopping_patience)
    summary: dict[str, Any] = {"output_dir": out, "method": run.adapter.method, "trainable": trainable,
                               "plain_lora_trainable": count_plain_lora(engine.module), "settings": run_settings(run)}
    if data.eval is not None and engine.global_steps == 0:
        before = evaluate(job)
        logger.scalars(0, {**before, "train/epoch": 0.0})
        summary["perplexity_before"] = before["eval/perplexity"]
        say(f"held-out perplexity before training: {before['eval/perplexity']:.2f}")
    start = engine.global_steps
    if start < derived.max_steps and not job.stopped_early:
        history = train(job, start)
        evals = [h for h in history if "eval/perplexity" in h]
        if evals:
            summary["perplexity_after"] = evals[-1]["eval/perplexity"]
        summary["final_loss"] = history[-1]["train/loss"] if history else None
    peft_dir, compact_dir = os.path.join(out, ADAPTER, "peft"), os.path.join(out, ADAPTER, "compact")
    export_engine(engine, peft_dir=peft_dir, compact_dir=compact_dir, base_model_name_or_path=base_name)
    error = None
    if rank == 0:
        try:
            save_tokenizer(serving, peft_dir, compact_dir)
        except OSError as err:
            error = f"export failed: {type(err).__name__}: {err}"
    raise_together(error, OSError)
    if job.best.checkpoint is not None:
        summary.update(best_checkpoint=job.best.checkpoint, best_eval_loss=job.best.checkpoint_loss)
        if rank == 0:  # the final adapter is out: a best that cannot be exported is a warning, not a failed run
            try:
                export_best(os.path.join(job.best.checkpoint, ADAPTER_DIR), s.base_config,
                            os.path.join(out, ADAPTER, BEST), serving, base_name)
            except Exception as err:  # noqa: BLE001 - safetensors and transformers raise their own types
                summary["best_export_error"] = f"{type(err).__name__}: {err}"
                print(f"warning: the best checkpoint's adapter was not exported to {os.path.join(out, ADAPTER, BEST)}"
                      f": {summary['best_export_error']}", file=sys.stderr, flush=True)
    if job.stopped_early:
        summary["stopped_early"] = job.stopped_early
    summary["serve"] = vllm_command(base_name or "<base model folder>", os.path.abspath(peft_dir), run.adapter.r)
    # DeepSpeed counts a step the fp16 loss scaler skipped in global_steps; the adapters moved steps - skipped times
    summary.update(wall_seconds=time.time() - s.started, steps=engine.global_steps, skipped_steps=engine.skipped_steps,
                   checkpoint=f"global_step{engine.global_steps}")  # a rerun finds the run finished at it
    if merger is not None:
        summary["live_B_groups"] = merger.policy.live_groups()
        summary["trainable_after_merges"] = count_trainable(engine.module)
    write_summary(out, summary)  # before the sample: a sample that fails or hangs loses nothing
    if run.logging.sample_prompt:
        sample = generate(engine, tokenizer, Renderer(tokenizer, data.format, False).prompt(run.logging.sample_prompt))
        if rank == 0:
            write_text(os.path.join(out, SAMPLE), sample + "\n")
        logger.text("sample", engine.global_steps, sample)
        summary["sample"] = sample
        write_summary(out, summary)
    logger.close()
    return summary


def write_summary(out: str, summary: dict) -> None:
    """The run's figures for scripts (bench/quality.py reads them); rank 0 writes. A disk that refuses
    it (quota) is reported, not raised: the other ranks are about to enter the sample's collectives."""
    if rank_and_world()[0] == 0:
        try:
            write_text(os.path.join(out, SUMMARY), json.dumps(summary, indent=2) + "\n")
        except OSError as err:
            print(f"warning: could not write {os.path.join(out, SUMMARY)}: {err}", file=sys.stderr, flush=True)


def report(summary: dict) -> None:
    """The closing lines: what the run reached and where its results are."""
    if "stopped_early" in summary:
        say(f"stopped at step {summary['steps']}: {summary['stopped_early']}")
    if "perplexity_before" in summary and "perplexity_after" in summary:
        say(f"held-out perplexity: {summary['perplexity_before']:.2f} -> {summary['perplexity_after']:.2f}")
    trainable = summary.get("trainable_after_merges", summary["trainable"])
    say(f"{summary['method']}: {trainable:,} trainable parameters"
        + (f" after merges (live B groups {summary['live_B_groups']})" if "live_B_groups" in summary else "")
        + f" = {trainable / summary['plain_lora_trainable']:.1%} of plain LoRA's {summary['plain_lora_trainable']:,}")
    if "best_checkpoint" in summary and "best_export_error" not in summary:
        say(f"best checkpoint: {summary['best_checkpoint']} (eval loss {summary['best_eval_loss']:.4f}), its adapter "
            f"in {os.path.join(summary['output_dir'], ADAPTER, BEST)}")
    if summary.get("skipped_steps"):
        say(f"{summary['skipped_steps']} of {summary['steps']} steps were skipped by the fp16 loss scaler (gradient "
            f"overflow): the adapters were updated {summary['steps'] - summary['skipped_steps']} times")
    if "sample" in summary:
        say(f"sample: {summary['sample']!r}")
    say(f"done in {summary['wall_seconds']:.0f} s ({summary['steps']} steps); adapters in "
        f"{os.path.join(summary['output_dir'], ADAPTER)}; TensorBoard: tensorboard --logdir "
        f"{os.path.join(summary['output_dir'], RUNS)}; every logged step: "
        f"{os.path.join(summary['output_dir'], TRAINER_LOG)}")
    say(f"serve with vLLM: {summary['serve']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``launch/train.py``: exit status 0 on success, 2 on bad input, 3 when the loss
    became NaN or inf (one line each)."""
    try:
        run, ds_path = parse_run_config(argv)
    except ConfigError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        init_distributed(run.training.dist_timeout_minutes)
    except SetupChannelError as err:  # every rank says it: each may be on a host of its own
        print(f"error: {err}", file=sys.stderr)
        close_distributed()
        return 2
    crashed = False
    try:
        try:
            prepared = setup(run, ds_path)
        except AlreadyFinished as done:
            say(str(done))
            return 0
        except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as err:
            rank = rank_and_world()[0]
            if rank == 0:
                print(f"error: {err}", file=sys.stderr)
            elif not isinstance(err, (ConfigError, CheckpointError)):  # may be this rank's alone (its disk)
                import socket

                print(f"error (rank {rank} on {socket.gethostname()}): {err}", file=sys.stderr)
            return 2
        try:
            report(execute(prepared))
        except NonFiniteLoss as err:  # every rank raised it together; nothing was saved for that step
            if rank_and_world()[0] == 0:
                print(f"error: {err}", file=sys.stderr)
            return 3
        # No rank tears down while another still talks to it: gloo/NCCL threads of a peer that
        # left mid-collective are what abort a finished job at exit.
        barrier()
    except BaseException:
        crashed = True
        raise
    finally:
        close_distributed(crashed)
        if os.environ.get("MASTER_PORT") and local_rank() == 0:
            remove_shm_buffers(os.environ["MASTER_PORT"])
    return 0


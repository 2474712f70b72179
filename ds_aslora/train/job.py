"""The fine-tuning job behind ``launch/train.py``: run config -> model -> data -> engine ->
resume -> loop -> export, on every rank of a DeepSpeed (or torchrun) launch.

Rank-0 work (resolved config, TensorBoard, exports, the sample) is done by global rank 0;
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
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from ..checkpoint import LATEST, CheckpointError, load_checkpoint, save_checkpoint
from ..coordinator import MergeCoordinator
from ..count import count_trainable
from ..distributed import initialize
from ..ds_config import load_ds_config
from ..export import export_engine
from ..inject import inject_adapters
from ..ranks import raise_together, rank_and_world
from . import assets
from .data import prepare_data
from .loop import Job, evaluate, generate, train
from .model_setup import TINY, enable_activation_checkpointing, load_model_and_tokenizer, resolve_model_path
from .run_config import ConfigError, RunConfig, derive, deepspeed_config, lr_at, parse_run_config, save_resolved
from .tensorboard_log import RunLogger

CHECKPOINTS, ADAPTER, RUNS = "checkpoints", "adapter", "runs"
SAMPLE_PROMPT = "ROMEO:\n"
# With no --data: the embedded Shakespeare sample, and settings that finish in minutes on CPU.
# Each applies only where the user left the field at its default.
EMBEDDED = {"data": {"format": "text", "packing": True, "max_seq_length": 256},
            "training": {"max_steps": 40, "learning_rate": 1e-3, "micro_batch_size": 2, "eval_interval": 20,
                         "eval_batches": 8},
            "model": {"activation_checkpointing": False},
            "logging": {"log_interval": 5},
            "checkpoint": {"save_interval": 0}}


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def say(message: str) -> None:
    """One line on global rank 0."""
    if rank_and_world()[0] == 0:
        print(message, flush=True)


def apply_embedded_defaults(run: RunConfig) -> None:
    """With no data given: the Shakespeare sample (Hamlet held out) and a short CPU-sized run."""
    for section, values in EMBEDDED.items():
        config = getattr(run, section)
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        for name, value in values.items():
            if getattr(config, name) == defaults[name]:
                setattr(config, name, value)
    cache = os.path.join(assets.cache_root(), "shakespeare")
    train_txt, heldout_txt = assets.shakespeare_paths()
    run.data.data = os.path.join(cache, "train.jsonl")
    run.data.eval_data = os.path.join(cache, "heldout.jsonl")
    if _local_rank() == 0:
        for txt, jsonl in ((train_txt, run.data.data), (heldout_txt, run.data.eval_data)):
            if not os.path.isfile(jsonl):
                os.makedirs(cache, exist_ok=True)
                assets.write_text_dataset(txt, jsonl)
    _barrier()


def check_output_dir(run: RunConfig) -> Optional[tuple[str, str]]:
    """Which checkpoint to resume (``(dir, tag)``) or None; refuses to train over another run."""
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
        raise ConfigError(f"output_dir {run.logging.output_dir!r} already holds a run ({latest}); pass --resume auto "
                          f"to continue it or --overwrite_output_dir to start over")
    return None


def check_shared_filesystem(out: str) -> None:
    """Checkpoints are read across ranks: every rank must see a file global rank 0 wrote in the
    output directory (one node always does; several need a shared filesystem)."""
    import socket
    import uuid

    rank, world = rank_and_world()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, ".shared_filesystem_check")
    token = [f"{socket.gethostname()}:{uuid.uuid4().hex}"]
    if world > 1:
        dist.broadcast_object_list(token, src=0)
    if rank == 0:
        with open(path, "w") as f:
            f.write(token[0])
    _barrier()
    seen = open(path).read() if os.path.isfile(path) else None
    error = None if seen == token[0] else (
        f"{socket.gethostname()} does not see the file rank 0 ({token[0].split(':')[0]}) wrote in output_dir "
        f"{out!r}: checkpoints need a filesystem every node shares (point output_dir at it)")
    raise_together(error, ConfigError)
    if rank == 0:
        os.remove(path)


def model_width(model: Optional[str]) -> int:
    """hidden_size, for ZeRO-3's bucket sizes (the DeepSpeed config's ``"auto"`` values)."""
    if model == TINY:
        from .model_setup import tiny_config

        return tiny_config().hidden_size
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).hidden_size


def rotate_checkpoints(ckpt_dir: str, keep: Optional[int]) -> None:
    """Rank 0, after a completed save: delete the oldest ``global_step*`` beyond ``keep``
    (never the one ``latest`` names)."""
    if keep is None:
        return
    with open(os.path.join(ckpt_dir, LATEST)) as f:
        latest = f.read().strip()
    tags = sorted((t for t in os.listdir(ckpt_dir) if t.startswith("global_step") and t[11:].isdigit()),
                  key=lambda t: int(t[11:]))
    for tag in tags[:-keep]:
        if tag != latest:
            shutil.rmtree(os.path.join(ckpt_dir, tag))


def setup(run: RunConfig, ds_path: str) -> "Setup":
    """Config, model, data, engine and resume: everything that bad input can fail, before the
    output directory is written to."""
    started = time.time()
    rank, world = rank_and_world()
    if run.data.data is None:
        apply_embedded_defaults(run)
    resume_from = check_output_dir(run)
    ds_json = load_ds_config(ds_path)
    derived = derive(run, world, ds_json, ds_path=ds_path)
    out = run.logging.output_dir
    # The default model is converted once per node (locked); every rank then reads it.
    model_path = run.model.model if run.model.model == TINY else (
        resolve_model_path(run.model.model) if _local_rank() == 0 else None)
    _barrier()
    model_path = model_path or resolve_model_path(run.model.model)
    ds_config = deepspeed_config(ds_json, derived, os.path.join(out, RUNS), ds_path=ds_path,
                                 hidden_size=model_width(model_path))
    model, tokenizer, keep_alive, source = load_model_and_tokenizer(
        model_path, ds_config, derived.dtype, seed=run.training.seed,
        trust_remote_code=run.model.trust_remote_code)
    cache = run.data.data_cache_dir or os.path.join(assets.cache_root(), "datasets")
    if _local_rank() == 0:  # tokenise once per node; the other ranks read the cache
        data = prepare_data(run.data, tokenizer, seed=run.training.seed, cache_dir=cache)
    _barrier()
    if _local_rank() != 0:
        data = prepare_data(run.data, tokenizer, seed=run.training.seed, cache_dir=cache)
    torch.manual_seed(run.training.seed)  # adapter initialisation (rank 0's is broadcast)
    inject_adapters(model, run.adapter)
    if run.model.activation_checkpointing:
        enable_activation_checkpointing(model)
    # the engine's scheduler also computes the lr after the last step: hold it there
    engine, bank = initialize(model, ds_config, lr_schedule=lambda k: lr_at(min(k, derived.max_steps), derived))
    merger = MergeCoordinator(engine) if run.adapter.method == "aslora" else None
    ckpt_dir = os.path.join(out, CHECKPOINTS)
    if resume_from is None and run.checkpoint.overwrite_output_dir and rank == 0 and os.path.isdir(ckpt_dir):
        shutil.rmtree(ckpt_dir)
    _barrier()
    if resume_from is not None:
        load_checkpoint(engine, resume_from[0], resume_from[1], bank=bank, merger=merger)
        say(f"resumed from {os.path.join(*resume_from)} at step {engine.global_steps}")
    check_shared_filesystem(out)
    if rank == 0:
        save_resolved(run, ds_config, out)
    logger = RunLogger(out, derived.run_name, enabled=rank == 0)
    logger.text("config/run", engine.global_steps, "```\n" + json.dumps(run.to_dict(), indent=1, default=str) + "\n```")

    return Setup(run=run, derived=derived, engine=engine, bank=bank, merger=merger, tokenizer=tokenizer,
                 data=data, source=source, keep_alive=keep_alive, logger=logger, ckpt_dir=ckpt_dir, started=started)


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


def execute(s: Setup) -> dict:
    """Evaluate, train, export and sample; returns the summary rank 0 prints."""
    run, derived, engine, bank, merger, logger = s.run, s.derived, s.engine, s.bank, s.merger, s.logger
    rank, world = rank_and_world()
    out, ckpt_dir, data, tokenizer, source = run.logging.output_dir, s.ckpt_dir, s.data, s.tokenizer, s.source
    trainable = count_trainable(engine.module)
    say(f"{run.adapter.method}: {trainable:,} trainable parameters; {len(data.train):,} training sequences; "
        f"global batch {derived.global_batch_size} ({derived.micro_batch_size} x {derived.gradient_accumulation_steps} "
        f"x {world} ranks); {derived.max_steps} steps; {derived.dtype}; ZeRO-{engine.zero_optimization_stage()}")

    def save(step: int) -> None:
        save_checkpoint(engine, ckpt_dir, bank=bank, merger=merger, client_state={"data_position": step},
                        export_adapter=True)
        if rank == 0:
            rotate_checkpoints(ckpt_dir, run.checkpoint.save_total_limit)
        _barrier()

    job = Job(engine=engine, bank=bank, merger=merger, derived=derived, train_data=data.train,
              eval_data=data.eval, pad_id=tokenizer.pad_token_id, seed=run.training.seed, logger=logger,
              log_interval=run.logging.log_interval, eval_interval=run.training.eval_interval,
              eval_batches=run.training.eval_batches, save_interval=run.checkpoint.save_interval, save=save)
    summary: dict[str, Any] = {"output_dir": out, "trainable": trainable}
    if data.eval is not None and engine.global_steps == 0:
        before = evaluate(job)
        logger.scalars(0, before)
        summary["perplexity_before"] = before["eval/perplexity"]
        say(f"held-out perplexity before training: {before['eval/perplexity']:.2f}")
    start = engine.global_steps
    if start < derived.max_steps:
        history = train(job, start)
        evals = [h for h in history if "eval/perplexity" in h]
        if evals:
            summary["perplexity_after"] = evals[-1]["eval/perplexity"]
        summary["final_loss"] = history[-1]["train/loss"] if history else None
    export_engine(engine, peft_dir=os.path.join(out, ADAPTER, "peft"),
                  compact_dir=os.path.join(out, ADAPTER, "compact"),
                  base_model_name_or_path=None if source == TINY else os.path.abspath(source))
    sample = generate(engine, tokenizer, SAMPLE_PROMPT)
    if rank == 0:
        with open(os.path.join(out, "sample.txt"), "w") as f:
            f.write(sample + "\n")
    logger.text("sample", engine.global_steps, sample)
    summary.update(sample=sample, wall_seconds=time.time() - s.started, steps=engine.global_steps)
    if merger is not None:
        summary["live_B_groups"] = merger.policy.live_groups()
        summary["trainable_after_merges"] = count_trainable(engine.module)
    logger.close()
    return summary


def report(summary: dict) -> None:
    if "perplexity_before" in summary and "perplexity_after" in summary:
        say(f"held-out perplexity: {summary['perplexity_before']:.2f} -> {summary['perplexity_after']:.2f}")
    say(f"sample: {summary['sample']!r}")
    say(f"done in {summary['wall_seconds']:.0f} s ({summary['steps']} steps); adapters in "
        f"{os.path.join(summary['output_dir'], ADAPTER)}; TensorBoard: tensorboard --logdir "
        f"{os.path.join(summary['output_dir'], RUNS)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``launch/train.py``: exit status 0 on success, 2 on bad input (one line)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        run, ds_path = parse_run_config(argv)
    except ConfigError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    import deepspeed

    if "RANK" not in os.environ:  # plain `python launch/train.py`: a world of one, not MPI discovery
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    deepspeed.init_distributed()
    try:
        try:
            prepared = setup(run, ds_path)
        except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as err:
            if rank_and_world()[0] == 0:
                print(f"error: {err}", file=sys.stderr)
            return 2
        report(execute(prepared))
        # No rank tears down while another still talks to it: gloo/NCCL threads of a peer that
        # left mid-collective are what abort a finished job at exit.
        _barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


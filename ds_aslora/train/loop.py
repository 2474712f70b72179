"""The training loop: one function that reads top to bottom as one optimizer step does.

Per optimizer step: this rank's micro-batches of the global batch (``GlobalBatches``), each
through ``micro_step`` (forward, backward, the bank's all-reduce at the boundary, the engine's
and the bank's updates, ASLoRA's merges), the loss normalised by the global batch's target
tokens, a NaN/inf check of the loss and the gradient norm agreed by all ranks, then logging,
evaluation and checkpoints at their intervals (every checkpoint evaluated, so the best one is known;
``early_stopping_patience`` evaluations without improvement end the run). The learning rate comes from
the engine's schedule (``lr_at``, set up by the job).
"""
from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from ..adapters.count import count_trainable
from ..merging.coordinator import MergeCoordinator
from ..runtime.replicated_bank import ReplicatedBank
from ..runtime.step import micro_step
from ..utils.ranks import rank_and_world
from .batches import EvalBatches, GlobalBatches, model_inputs
from .best import BestTracker
from .resolved import Derived
from .run_log import RunLogger


class NonFiniteLoss(RuntimeError):
    """The loss or the gradients became NaN or inf: the run stops before anything poisoned is saved."""


@dataclass
class Job:
    """What the loop drives; built by ``job.build_job``."""

    engine: Any
    bank: Optional[ReplicatedBank]
    merger: Optional[MergeCoordinator]
    derived: Derived
    train_data: Any  # tokenised datasets.Dataset
    eval_data: Any
    pad_id: int
    seed: int
    logger: RunLogger
    log_interval: int
    eval_interval: int
    eval_batches: Optional[int]
    save_interval: int
    save: Callable[[int], None]  # collective: checkpoint at this step
    early_stopping_patience: Optional[int] = None
    best: BestTracker = field(default_factory=BestTracker)
    stopped_early: Optional[str] = None  # the reason, when early stopping ended the run
    history: list[dict] = field(default_factory=list)  # what was logged, for tests and the summary


def _all_reduce_sum(on_device: list[torch.Tensor], on_host: list[float], device: Any) -> list[float]:
    """Sums over ranks of device scalars (kept there: no host sync in the micro-steps) and host
    numbers, in one all-reduce; the step's one wait for the device is the ``tolist`` here."""
    tensor = torch.cat([torch.stack(on_device).double(), torch.tensor(on_host, dtype=torch.float64, device=device)])
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """A host batch's tensors on the accelerator without waiting for it (other values as they are):
    a copy from pageable memory blocks the host until the device has finished its queue (the last
    micro-step's backward); from pinned memory it is queued like a kernel."""
    if torch.device(device).type != "cuda":
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def peak_memory_gib() -> float:
    """Peak accelerator memory of this process, or its peak resident host memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _loss_scale(engine: Any) -> str:
    """The fp16 loss scaler's current scale, as DeepSpeed's optimizers (ZeRO or not) expose it."""
    scale = getattr(engine.optimizer, "cur_scale", None)
    return f"{scale:.0f}" if isinstance(scale, (int, float)) else "?"


def grad_norm(job: Job) -> Optional[float]:
    """Norm of the last step's gradients: the engine's tensors and the bank's together."""
    engine_norm = job.engine.get_global_grad_norm()
    bank_norm = job.bank.grad_norm if job.bank is not None else None
    parts = [float(n) for n in (engine_norm, bank_norm) if n is not None]
    return math.sqrt(sum(n * n for n in parts)) if parts else None


def attention_of(engine: Any) -> str:
    """The attention kernel the model was loaded with (transformers' ``attn_implementation``)."""
    return getattr(engine.module.config, "_attn_implementation", None) or "sdpa"


@torch.no_grad()
def evaluate(job: Job) -> dict[str, float]:
    """Mean loss per target token over the eval set (every rank takes part: ZeRO-3 forwards
    are collective), and its perplexity."""
    engine = job.engine
    rank, world = rank_and_world()
    engine.eval()
    total = torch.zeros((), dtype=torch.float64, device=engine.device)
    count = 0
    for step in EvalBatches(job.eval_data, micro_batch_size=job.derived.micro_batch_size, world_size=world,
                            rank=rank, pad_id=job.pad_id, max_batches=job.eval_batches):
        micro = step.micro_batches[0]
        targets = int((micro["labels"][:, 1:] != -100).sum())  # counted on the host batch
        batch = to_device(model_inputs(micro, attention_of(engine)), engine.device)
        # num_items_in_batch=1: the summed cross-entropy of this micro-batch
        loss_sum = engine(**batch, num_items_in_batch=torch.tensor(1.0, device=engine.device)).loss
        if targets:
            total += loss_sum.double()
        count += targets
    engine.train()
    total, count = _all_reduce_sum([total], [count], engine.device)
    loss = total / max(count, 1)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/target_tokens": count}


@torch.no_grad()
@contextlib.contextmanager
def _discovering_external_parameters(engine: Any) -> Iterator[None]:
    """What DeepSpeed's engine.forward turns on around a ZeRO-3 forward (and generate() bypasses):
    a module reading another module's parameter (a shared or tied adapter tensor) gets it fetched."""
    if engine.zero_optimization_stage() != 3:
        yield
        return
    from deepspeed.runtime.zero.parameter_offload import ZeROOrderedDict, ensure_zero_ordered_dict

    modules = list(engine.module.modules())
    for module in modules:
        ensure_zero_ordered_dict(module)
        module._parameters._in_forward = True
    try:
        yield
    finally:
        for module in modules:
            if isinstance(module._parameters, ZeROOrderedDict):
                module._parameters._in_forward = False


SAMPLE_REPETITION_PENALTY = 1.2  # CTRL's value (Keskar et al. 2019): a small model's plain greedy text loops


def generate(engine: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int = 48) -> str:
    """Greedy continuation with the KV cache and a repetition penalty (deterministic, the same on every
    rank), run by every rank alike: under ZeRO-3 the forwards are collective, so ranks that finish
    early keep stepping until all have (``synced_gpus``)."""
    engine.eval()
    ids = torch.tensor([prompt_ids], device=engine.device)
    with torch.no_grad(), _discovering_external_parameters(engine):
        out = engine.module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, repetition_penalty=SAMPLE_REPETITION_PENALTY,
                                     pad_token_id=tokenizer.pad_token_id,
                                     synced_gpus=engine.zero_optimization_stage() == 3 and rank_and_world()[1] > 1)
    engine.train()
    return tokenizer.decode(out[0], skip_special_tokens=True)


def _log_merges(job: Job, step: int, merges: list) -> None:
    merger = job.merger
    job.logger.merge_event(step, merges)
    job.logger.distance_heatmaps(step, merger.last_distances, merger.last_groups, merger.policy.num_layers)


def train(job: Job, start_step: int) -> list[dict]:
    """Optimizer steps ``start_step + 1 .. max_steps`` (``start_step``: steps already taken, e.g.
    restored from a checkpoint). Returns the logged records."""
    from tqdm import tqdm

    engine, derived = job.engine, job.derived
    rank, world = rank_and_world()
    batches = GlobalBatches(job.train_data, micro_batch_size=derived.micro_batch_size,
                            gradient_accumulation_steps=derived.gradient_accumulation_steps, world_size=world,
                            rank=rank, seed=job.seed, pad_id=job.pad_id, start_step=start_step)
    per_rank_share = derived.gradient_accumulation_steps * world
    attention = attention_of(engine)
    bar = tqdm(total=derived.max_steps, initial=start_step, disable=rank != 0, unit="step", dynamic_ncols=True)
    window = {"loss": 0.0, "steps": 0, "tokens": 0.0, "seconds": 0.0}
    engine.train()
    try:
        for step_batch in batches:
            step = step_batch.step + 1  # the optimizer step being taken, 1-based
            if step > derived.max_steps:
                break
            started = time.perf_counter()
            lr = engine.get_lr()[0]  # this step's (the engine's schedule advances in step(), not on skipped steps)
            # Each micro-batch's loss is its summed cross-entropy / (global target tokens / (accumulation x world)):
            # the engine divides by the accumulation and averages ranks, so the step's gradient is that of the
            # global batch's mean token loss however the batch is split (the gradient-accumulation loss fix).
            n_items = torch.tensor(max(step_batch.global_target_tokens, 1) / per_rank_share, device=engine.device)
            skipped_before = engine.skipped_steps
            # The loss stays on the device and tokens are counted on the host batch: reading either from the
            # device every micro-step would make the host wait for each backward before the next forward.
            local_loss = torch.zeros((), dtype=torch.float64, device=engine.device)
            local_tokens, merges = 0, []
            for micro in step_batch.micro_batches:
                local_tokens += int(micro["attention_mask"].sum())
                batch = to_device(model_inputs(micro, attention), engine.device)
                loss, applied = micro_step(engine, {**batch, "num_items_in_batch": n_items}, job.bank, job.merger)
                local_loss += loss.double()
                merges += applied
            # fp16: overflowing scaled gradients make the loss scaler skip the update and lower its scale (all
            # ranks agree). Expected, not a divergence (the loss above was finite): counted and logged, not fatal.
            skipped = engine.skipped_steps > skipped_before
            # Without a loss scaler a non-finite gradient (a finite loss can have one) is a divergence: DeepSpeed
            # skipped the update (ZeRO-1/2/3 check the norm) or applied it (bf16 without the check: the weights are
            # poisoned). Under fp16 it is the scaler's (the bank's overflow lowers the scale too: ReplicatedBank).
            # norm None: this engine keeps no norm (stage 0 in fp32 without clipping).
            norm = None if skipped else grad_norm(job)
            bad_grad = job.derived.dtype != "fp16" and (skipped or (norm is not None and not math.isfinite(norm)))
            summed_loss, bad_loss, tokens, bad_grad = _all_reduce_sum(
                [local_loss, (~torch.isfinite(local_loss)).double()], [local_tokens, float(bad_grad)], engine.device)
            if bad_loss or bad_grad:  # every rank sees the same sums: all stop together, before any save
                rows = batches.global_indices(step_batch.step).tolist()
                what = "loss" if bad_loss else "gradient norm"
                raise NonFiniteLoss(f"non-finite {what} at optimizer step {step} (epoch {step_batch.epoch}; training "
                                    f"rows {rows} of the tokenised dataset); no checkpoint was written for it")
            loss = summed_loss / per_rank_share
            if skipped and rank == 0:
                bar.write(f"step {step}: fp16 gradient overflow; the loss scaler skipped this update (loss scale now "
                          f"{_loss_scale(engine)}; {engine.skipped_steps} steps skipped so far)")
            elapsed = time.perf_counter() - started
            window = {"loss": window["loss"] + loss, "steps": window["steps"] + 1,
                      "tokens": window["tokens"] + tokens, "seconds": window["seconds"] + elapsed}
            if merges:
                _log_merges(job, step, merges)
            record: dict[str, Any] = {"step": step, "train/loss": loss}
            logged: dict[str, Any] = {}
            if step % job.log_interval == 0 or step == derived.max_steps:
                logged.update({"train/loss": window["loss"] / window["steps"], "train/learning_rate": lr,
                               "train/skipped_steps": engine.skipped_steps,  # fp16 overflows the loss scaler skipped
                               "train/grad_norm": norm,  # None when skipped (DeepSpeed reports inf there)
                               "train/tokens_per_second": window["tokens"] / window["seconds"],
                               "memory/peak_gib": peak_memory_gib(),
                               "params/trainable": count_trainable(engine.module)})
                if job.merger is not None:
                    logged.update({f"aslora/live_B_groups/{m}": n for m, n in job.merger.policy.live_groups().items()})
                bar.set_postfix(loss=f"{logged['train/loss']:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{logged['train/tokens_per_second']:.0f}")
                window = {"loss": 0.0, "steps": 0, "tokens": 0.0, "seconds": 0.0}
            saving = bool(job.save_interval and step % job.save_interval == 0) or step == derived.max_steps
            if job.eval_data is not None and job.eval_interval and (step % job.eval_interval == 0 or saving):
                scores = evaluate(job)
                logged.update(scores)
                job.best.observe(step, scores["eval/loss"])  # every rank: the same all-reduced loss
            if logged:  # passes over the training rows so far, as Hugging Face's epoch
                logged["train/epoch"] = step * derived.global_batch_size / len(job.train_data)
                job.logger.scalars(step, logged)
                record.update(logged)
            job.logger.flush()  # the step's line in trainer_log.jsonl, before its checkpoint
            job.history.append(record)
            bar.update(1)
            job.stopped_early = job.best.stop_reason(job.early_stopping_patience)
            if saving or job.stopped_early:
                job.save(step)
            if job.stopped_early:
                if rank == 0:
                    bar.write(f"step {step}: {job.stopped_early}")
                break
    finally:
        bar.close()  # also on an error: its line ends before the error's
    return job.history

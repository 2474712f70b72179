"""The run as it will execute: numbers settled between the run config, the DeepSpeed JSON and the world.

Settings that also exist in a DeepSpeed JSON (batch sizes, learning rate, weight decay,
clipping, precision, warmup and total steps) default to *unset* in the run config: ``derive``
takes the JSON's explicit value then, its documented default when neither sets it, and refuses
a run config and a JSON that set different values. ``derive`` is the one place where effective
numbers come from; ``deepspeed_config`` writes them into the DeepSpeed config and removes its
``scheduler`` (the loop drives the learning rate with ``lr_at``: DeepSpeed's ``WarmupCosineLR``
trains its first steps at lr 0).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import yaml

from ..runtime.ds_config import AUTO, auto_values, fill_auto
from ..utils.atomic import write_text
from .run_config import (
    DEFAULT_GRADIENT_ACCUMULATION_STEPS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_LR_SCHEDULER,
    DEFAULT_MAX_GRAD_NORM,
    DEFAULT_MICRO_BATCH_SIZE,
    DEFAULT_WARMUP_RATIO,
    DEFAULT_WEIGHT_DECAY,
    DS_SCHEDULERS,
    SECTIONS,
    ConfigError,
    RunConfig,
    require,
)

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Derived:
    """Effective numbers of a run: the run config merged with the DeepSpeed JSON and the world size."""

    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int  # sequences per optimizer step: micro batch x accumulation x world
    max_steps: int
    warmup_steps: int
    learning_rate: float
    lr_scheduler: str
    weight_decay: float
    max_grad_norm: float
    dtype: str  # bf16 | fp16 | fp32
    run_name: str


def _explicit(ds: Mapping[str, Any], path: str) -> Any:
    """The DeepSpeed JSON's value at dotted ``path``; None when absent or ``"auto"``."""
    node: Any = ds
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return None if node == AUTO else node


class _Settle:
    """Picks each effective value: run config, else the DeepSpeed JSON, else the default; refuses conflicts."""

    def __init__(self, ds: Mapping[str, Any], ds_path: str):
        self.ds, self.ds_path = ds, ds_path

    def pick(self, name: str, run_value: Any, ds_keys: Sequence[str], default: Any, label: Any = None) -> Any:
        """``label``: how the run value is shown in a conflict (default: the value itself)."""
        chosen, chosen_from = run_value, f"{name}={run_value if label is None else label} (run config)"
        for key in ds_keys:
            value = _explicit(self.ds, key)
            if value is None:
                continue
            if chosen is not None and value != chosen:
                raise ConfigError(f"{chosen_from} contradicts {key}={value} in {self.ds_path}")
            if chosen is None:
                chosen, chosen_from = value, f"{key}={value} in {self.ds_path}"
        return default if chosen is None else chosen


def _on_gpu_with_bf16() -> bool:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return accelerator.device_name() != "cpu" and accelerator.is_bf16_supported()


def _settle_dtype(dtype: str, ds: Mapping[str, Any], ds_path: str, on_gpu: Optional[bool]) -> str:
    bf16, fp16 = _explicit(ds, "bf16.enabled"), _explicit(ds, "fp16.enabled")
    require(not (bf16 and fp16), f"bf16.enabled and fp16.enabled are both true in {ds_path}")
    if dtype != "auto":
        for key, value in (("bf16.enabled", bf16), ("fp16.enabled", fp16)):
            wanted = dtype == key.split(".")[0]
            require(value is None or bool(value) == wanted,
                   f"dtype={dtype} (run config) contradicts {key}={json.dumps(value)} in {ds_path}")
        return dtype
    if bf16 or fp16:
        return "bf16" if bf16 else "fp16"
    if bf16 is None and (_on_gpu_with_bf16() if on_gpu is None else on_gpu):
        return "bf16"
    return "fp32"


def _check_scheduler(ds: Mapping[str, Any], ds_path: str) -> None:
    """The loop replaces DeepSpeed's scheduler; refuse settings of it that the replacement would drop."""
    scheduler = ds.get("scheduler")
    if not scheduler:
        return
    kind = scheduler.get("type")
    require(kind in DS_SCHEDULERS, f"scheduler.type={kind!r} in {ds_path} is not supported: the training loop "
                                  f"drives the learning rate (types it reproduces: {list(DS_SCHEDULERS)})")
    for key, value in scheduler.get("params", {}).items():
        if value == AUTO or key in ("total_num_steps", "warmup_num_steps", "warmup_max_lr"):
            continue
        require(key == "warmup_type" and value == "linear",
               f"scheduler.params.{key}={json.dumps(value)} in {ds_path} has no equivalent in the training loop's "
               "schedule (linear warmup from 0, decay to 0 at max_steps): remove it")


def derive(run: RunConfig, world_size: int, ds_json: Optional[Mapping[str, Any]] = None, *,
           ds_path: str = "the DeepSpeed config", on_gpu: Optional[bool] = None,
           train_sequences: Optional[int] = None) -> Derived:
    """Every effective number of the run, in one place (see the module docstring for the rule).

    ``on_gpu``: whether ``dtype: auto`` may pick bf16; unset: asks DeepSpeed's accelerator.
    ``train_sequences``: the prepared training set's size, which ``num_train_epochs`` needs.
    """
    require(world_size >= 1, f"world_size must be >= 1, got {world_size}")
    ds = ds_json or {}
    t = run.training
    settle = _Settle(ds, ds_path)
    _check_scheduler(ds, ds_path)
    micro = settle.pick("micro_batch_size", t.micro_batch_size, ["train_micro_batch_size_per_gpu"],
                        DEFAULT_MICRO_BATCH_SIZE)
    accum = settle.pick("gradient_accumulation_steps", t.gradient_accumulation_steps,
                        ["gradient_accumulation_steps"], DEFAULT_GRADIENT_ACCUMULATION_STEPS)
    global_batch = micro * accum * world_size
    explicit_batch = _explicit(ds, "train_batch_size")
    require(explicit_batch is None or explicit_batch == global_batch,
           f"train_batch_size={explicit_batch} in {ds_path} is not micro_batch_size {micro} x "
           f"gradient_accumulation_steps {accum} x world size {world_size} = {global_batch}")
    lr = settle.pick("learning_rate", t.learning_rate, ["optimizer.params.lr", "scheduler.params.warmup_max_lr"],
                     DEFAULT_LEARNING_RATE)
    ds_kind = _explicit(ds, "scheduler.type")
    ds_shape = DS_SCHEDULERS.get(ds_kind)
    require(t.lr_scheduler is None or ds_shape is None or ds_shape == t.lr_scheduler,
           f"lr_scheduler={t.lr_scheduler} (run config) contradicts scheduler.type={ds_kind} in {ds_path} "
           f"(that is {ds_shape})")
    max_steps = settle.pick("max_steps", t.max_steps, ["scheduler.params.total_num_steps"], None)
    if t.num_train_epochs is not None:
        require(max_steps is None, f"num_train_epochs={t.num_train_epochs} (run config) contradicts "
                                   f"scheduler.params.total_num_steps={max_steps} in {ds_path}: set one of them")
        require(train_sequences is not None, "num_train_epochs needs the training set's size (derive after the "
                                             "data is prepared)")
        max_steps = epoch_steps(t.num_train_epochs, train_sequences, global_batch)
    require(max_steps is not None, f"max_steps is not set: pass --max_steps N or --num_train_epochs E (or set "
                                   f"scheduler.params.total_num_steps in {ds_path})")
    run_warmup = t.warmup_steps if t.warmup_ratio is None else math.ceil(t.warmup_ratio * max_steps)
    label = None if t.warmup_ratio is None else f"{run_warmup} (warmup_ratio {t.warmup_ratio})"
    warmup = settle.pick("warmup_steps", run_warmup, ["scheduler.params.warmup_num_steps"],
                         math.ceil(DEFAULT_WARMUP_RATIO * max_steps), label=label)
    require(warmup <= max_steps, f"warmup_steps={warmup} exceeds max_steps={max_steps}")
    return Derived(
        world_size=world_size, micro_batch_size=micro, gradient_accumulation_steps=accum,
        global_batch_size=global_batch, max_steps=max_steps, warmup_steps=warmup, learning_rate=float(lr),
        lr_scheduler=t.lr_scheduler or ds_shape or DEFAULT_LR_SCHEDULER,
        weight_decay=float(settle.pick("weight_decay", t.weight_decay, ["optimizer.params.weight_decay"],
                                       DEFAULT_WEIGHT_DECAY)),
        max_grad_norm=float(settle.pick("max_grad_norm", t.max_grad_norm, ["gradient_clipping"],
                                        DEFAULT_MAX_GRAD_NORM)),
        dtype=_settle_dtype(run.model.dtype, ds, ds_path, on_gpu),
        run_name=run.logging.run_name or os.path.basename(os.path.normpath(run.logging.output_dir)))


def epoch_steps(epochs: float, train_sequences: int, global_batch: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``train_sequences``, the last one partial."""
    return max(1, math.ceil(epochs * train_sequences / global_batch))


def lr_at(step: int, derived: Derived) -> float:
    """Learning rate of optimizer step ``step`` (1-based: the first update is step 1).

    Linear warmup ``lr * step / warmup`` (step 1 already trains at ``lr / warmup``, never 0), then
    cosine or linear decay from ``lr`` at step ``warmup + 1`` towards 0 one step past ``max_steps``
    (as Hugging Face's schedules: every step trains; constant: stays at ``lr``).
    """
    lr, warmup, total = derived.learning_rate, derived.warmup_steps, derived.max_steps
    if not 1 <= step <= total:
        raise ValueError(f"step {step} outside the schedule's 1..{total}")
    if step <= warmup:
        return lr * step / warmup
    if derived.lr_scheduler == "constant":
        return lr
    progress = (step - warmup - 1) / (total - warmup)
    if derived.lr_scheduler == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (1.0 - progress)


def _set(config: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        config = config.setdefault(key, {})
    config[leaf] = value


def deepspeed_config(ds_json: Mapping[str, Any], derived: Derived, monitor_dir: Optional[str] = None, *,
                     ds_path: str = "the DeepSpeed config", hidden_size: Optional[int] = None,
                     engine_numel: Optional[int] = None) -> dict:
    """The DeepSpeed config the engine gets: ``"auto"`` values filled from ``derived``, the effective values
    written where DeepSpeed reads them, and ``scheduler`` removed (the loop sets the lr with ``lr_at``).

    ``derived`` must come from ``derive(..., ds_json)`` (which refused contradictions). ``hidden_size``
    fills the bucket-size ``"auto"`` values (unset: those stay unfilled, an error naming them), capped by
    ``engine_numel``, the trainable elements DeepSpeed will hold.
    A monitor output path left ``"auto"`` (``csv_monitor``, ``tensorboard``) is ``<monitor_dir>/<run_name>``.
    """
    config = copy.deepcopy(dict(ds_json))
    scheduler = config.pop("scheduler", None)
    if scheduler is not None:
        log.info("DeepSpeed scheduler %s in %s is replaced by the training loop's schedule: linear warmup over %d "
                 "steps to lr %g, then %s decay to step %d", scheduler.get("type"), ds_path, derived.warmup_steps,
                 derived.learning_rate, derived.lr_scheduler, derived.max_steps)
    values = auto_values(micro_batch=derived.micro_batch_size, grad_accum=derived.gradient_accumulation_steps,
                         world_size=derived.world_size, lr=derived.learning_rate, weight_decay=derived.weight_decay,
                         clip=derived.max_grad_norm, bf16=derived.dtype == "bf16", monitor_dir=monitor_dir,
                         job_name=derived.run_name, hidden_size=hidden_size or 1, engine_numel=engine_numel)
    values["fp16.enabled"] = derived.dtype == "fp16"
    if hidden_size is None:  # no model width: leave ZeRO-3's bucket "auto"s for fill_auto to name
        values = {k: v for k, v in values.items() if not k.startswith("zero_optimization.")}
    config = fill_auto(config, values)
    effective = {"train_micro_batch_size_per_gpu": derived.micro_batch_size,
                 "gradient_accumulation_steps": derived.gradient_accumulation_steps,
                 "train_batch_size": derived.global_batch_size, "gradient_clipping": derived.max_grad_norm}
    if "optimizer" in config:
        effective.update({"optimizer.params.lr": derived.learning_rate,
                          "optimizer.params.weight_decay": derived.weight_decay})
    for half in ("bf16", "fp16"):
        if half in config or derived.dtype == half:
            effective[f"{half}.enabled"] = derived.dtype == half
    for path, value in effective.items():
        _set(config, path, value)
    return config


def save_resolved(run: RunConfig, ds_config: Mapping[str, Any], out_dir: str) -> None:
    """Write ``run_config.yaml`` (flat, loadable with ``--config``) and ``ds_config.json`` into ``out_dir``:
    with both, the run can be repeated exactly and a resumed job can compare its configuration."""
    os.makedirs(out_dir, exist_ok=True)
    parts = []
    for section in SECTIONS:
        body = yaml.safe_dump(dataclasses.asdict(getattr(run, section)), sort_keys=False, default_flow_style=False)
        parts.append(f"# {section}\n{body}")
    write_text(os.path.join(out_dir, "run_config.yaml"), "\n".join(parts))
    write_text(os.path.join(out_dir, "ds_config.json"), json.dumps(ds_config, indent=2) + "\n")

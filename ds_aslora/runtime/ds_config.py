"""DeepSpeed JSON configs: load one and fill its ``"auto"`` values from the run's settings.

The shipped ``ds_configs/*.json`` leave batch sizes, optimizer numbers, precision and bucket
sizes as ``"auto"``, so one file serves every model and run; the values come from one place (our
run config) and an ``"auto"`` left without a value is an error naming its key, never a silent
DeepSpeed default. A user's monitor sections may say ``"auto"`` too (paths: the run folder).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping

from ..planning.inventory import bucket_size

AUTO = "auto"
# DeepSpeed's monitor sections (deepspeed.monitor.config): the engine starts a monitor for each enabled one.
MONITORS = ("tensorboard", "wandb", "csv_monitor", "comet")


def load_ds_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepSpeed config {path!r} not found (shipped ones are in ds_configs/)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"DeepSpeed config {path!r} is not valid JSON: {err}") from err


def auto_paths(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of every ``"auto"`` value."""
    out = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += auto_paths(value, path + ".")
        elif value == AUTO:
            out.append(path)
    return out


def fill_auto(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict:
    """A copy of ``config`` with each ``"auto"`` at path P replaced by ``values[P]``.
    Explicit values in the file win; an ``"auto"`` with no value raises."""
    filled = copy.deepcopy(dict(config))
    missing = []
    for path in auto_paths(filled):
        if path not in values:
            missing.append(path)
            continue
        *parents, leaf = path.split(".")
        node = filled
        for key in parents:
            node = node[key]
        node[leaf] = values[path]
    if missing:
        raise ValueError(f"DeepSpeed config keys set to \"auto\" that this run cannot fill: {missing}")
    return filled


def without_monitors(config: Mapping[str, Any]) -> dict:
    """A copy of ``config`` without DeepSpeed's monitor sections: an engine that writes no events of
    its own, for a caller that logs every metric itself (the training job's ``RunLogger``)."""
    return {key: value for key, value in config.items() if key not in MONITORS}


def auto_values(*, micro_batch: int, grad_accum: int, world_size: int, lr: float, weight_decay: float = 0.0,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, clip: float = 1.0,
                bf16: bool = False, monitor_dir: str | None = None, job_name: str = "ds_aslora",
                hidden_size: int = 4096, engine_numel: int | None = None) -> dict:
    """The values of every ``"auto"`` key the shipped configs use, from run settings; and of the
    monitor keys a user's JSON may leave ``"auto"``: output paths ``<monitor_dir>/<job_name>``, and
    ``tensorboard.enabled`` false (the job writes TensorBoard itself; DeepSpeed's monitor would add
    a second loss curve)."""
    bucket = bucket_size(hidden_size, engine_numel)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": clip,
        "bf16.enabled": bf16,
        "optimizer.params.lr": lr,
        "optimizer.params.betas": list(betas),
        "optimizer.params.eps": eps,
        "optimizer.params.weight_decay": weight_decay,
        "tensorboard.enabled": False,
        "tensorboard.output_path": monitor_dir or "",
        "tensorboard.job_name": job_name,
        "csv_monitor.output_path": monitor_dir or "",
        "csv_monitor.job_name": job_name,
        # ZeRO-3 prefetch as the HF integration derives it from the model width; the persistence
        # threshold is raised further to cover every adapter tensor.
        "zero_optimization.reduce_bucket_size": bucket,
        "zero_optimization.allgather_bucket_size": bucket,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }

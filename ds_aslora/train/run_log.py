"""Where the training job's metrics go: TensorBoard, DeepSpeed's monitors and ``trainer_log.jsonl``.

``RunLogger(output_dir, run_name, enabled=rank == 0, ...)`` sends each call to every sink. Only
the enabled logger (global rank 0) imports TensorBoard or touches the disk; on every other rank
each method returns at once, so the loop can call them unconditionally.

- **TensorBoard**, ``<output_dir>/runs/<run_name>/``: everything. Scalars under the tags the
  caller passes (``train/loss``, ``eval/perplexity``, ...: ``scalars``), one markdown table per
  ASLoRA merge event (``aslora/merges``: ``merge_event``), the B-distance heatmap per module
  type (``aslora/distance/<module_type>``, ``heatmap.render_heatmap``) with
  ``aslora/distance_max/<module_type>``, the distance its brightest colour stands for
  (``distance_heatmaps``), free markdown (``text``). TensorBoard stores a text entry under
  ``<tag>/text_summary`` (plugin ``text``).
- **DeepSpeed's monitors** enabled in the DeepSpeed JSON (``wandb``, ``csv_monitor``,
  ``comet``): every scalar, under the same tag, x = the optimizer step, through DeepSpeed's
  ``MonitorMaster`` (``deepspeed_monitor``). They take scalars only: texts and images stay in
  TensorBoard.
- **``<output_dir>/trainer_log.jsonl``**: one JSON object per step that logged a scalar,
  ``{"step": 6, "train/loss": ..., "eval/loss": ..., "train/epoch": 0.5}``, written and flushed when
  the step's logging is complete (``flush``). Its keys are the TensorBoard tags, not Hugging
  Face's ``log_history`` names (``loss``, ``eval_loss``, ``learning_rate``): one name finds a
  metric in every sink, and per-module-type values (``aslora/live_B_groups/q_proj``) keep their
  place in the name. A resumed run (``purge_step``) first drops the lines of the steps it will log
  again, as TensorBoard's ``purge_step`` hides their events; a new run starts the file empty.

One curve per metric: the engine gets a config without monitor sections
(``runtime.ds_config.without_monitors``), so DeepSpeed's own events (``Train/Samples/lr``, ...,
``Train/Samples/train_loss``: rank 0's last micro-batch, against samples) do not mix a second
x-axis and a second loss into the user's dashboards (wandb also drops points logged at a lower
step than its last). DeepSpeed's ``tensorboard`` monitor is never started: this logger writes
TensorBoard, and DeepSpeed's would add that second loss curve to the same run folder.
"""
from __future__ import annotations

import csv
import glob
import importlib.util
import io
import json
import os
import uuid
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from ..utils.atomic import write_text
from .heatmap import heatmap_scale, layer_distances, render_heatmap

if TYPE_CHECKING:
    from ..merging.policy import Merge

MERGES_TAG = "aslora/merges"
DISTANCE_TAG = "aslora/distance/"
DISTANCE_MAX_TAG = "aslora/distance_max/"
TRAINER_LOG = "trainer_log.jsonl"
# DeepSpeed's monitors that get the job's scalars; its "tensorboard" is left out (RunLogger writes TensorBoard).
JOB_MONITORS = ("wandb", "csv_monitor", "comet")
WANDB_RUN_ID = "wandb_run_id"  # in output_dir: the wandb run this job's restarts continue


def missing_monitor_package(ds_config: Mapping[str, Any], ds_path: str = "the DeepSpeed config") -> Optional[str]:
    """Which enabled monitor lacks its package (one line), or None: checked before the model loads,
    so a JSON asking for wandb where it is not installed fails in seconds, before anything is removed."""
    for section, package in (("wandb", "wandb"), ("comet", "comet_ml")):
        if ds_config.get(section, {}).get("enabled") is True and importlib.util.find_spec(package) is None:
            return f"{section}.enabled is true in {ds_path} but {package!r} is not installed (pip install {package})"
    return None


def deepspeed_monitor(ds_config: Mapping[str, Any]) -> Optional[Any]:
    """DeepSpeed's ``MonitorMaster`` over the ``wandb``, ``csv_monitor`` and ``comet`` sections of
    ``ds_config``, or None when none is enabled. Build it on global rank 0 only, after DeepSpeed's
    communication is set up: wandb and comet start their run here.

    Comet thins each metric to one point per ``samples_log_interval`` of x; x is the optimizer
    step here, so unless the JSON sets it, it is 1 (every logged point: ``--log_interval`` thins).
    """
    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.monitor.monitor import MonitorMaster

    sections = {name: dict(ds_config.get(name, {})) for name in JOB_MONITORS}
    sections["comet"].setdefault("samples_log_interval", 1)
    config = get_monitor_config(sections)
    return MonitorMaster(config) if config.enabled else None


def continue_wandb_run(output_dir: str, resuming: bool) -> str:
    """The wandb run id this job logs to, handed to wandb (which DeepSpeed's monitor starts) as
    ``WANDB_RUN_ID`` with ``WANDB_RESUME=allow``: a job resumed from its output_dir continues the run
    it started, as a new job starts a new one, instead of a new wandb run per restart. The id is kept
    in ``<output_dir>/wandb_run_id``; a ``WANDB_RUN_ID`` the user exported wins. wandb refuses points
    below its last step, so the steps the crashed attempt logged past its checkpoint keep its values."""
    run_id = os.environ.get("WANDB_RUN_ID")
    path = os.path.join(output_dir, WANDB_RUN_ID)
    if not run_id and resuming and os.path.isfile(path):
        with open(path) as f:
            run_id = f.read().strip()
    run_id = run_id or uuid.uuid4().hex[:12]
    write_text(path, run_id + "\n")
    os.environ["WANDB_RUN_ID"] = run_id
    os.environ.setdefault("WANDB_RESUME", "allow")
    return run_id


def _layer_ranges(layers: Sequence[int]) -> str:
    """(0, 1, 2, 5) -> "0-2, 5": readable for 30-layer models."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def merges_markdown(merges: Sequence["Merge"]) -> str:
    """One row per merge: the lower group folds into the upper one (whose top layer stays the
    representative); ``distance`` is the plain Frobenius distance that chose the pair."""
    rows = ["| step | module type | merged layers (lower → upper) | distance |", "|---|---|---|---|"]
    rows += [f"| {m.step} | {m.module_type} | {_layer_ranges(m.lower)} → {_layer_ranges(m.upper)} "
             f"| {m.distance:.4g} |" for m in merges]
    return "\n".join(rows)


def keep_steps_before(path: str, purge_step: int) -> None:
    """Rewrite the JSON-lines file ``path`` (atomically) without the lines of steps >= ``purge_step``
    and without a line a crash tore; no file: nothing to do."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] < purge_step:
                    kept.append(line.rstrip("\n") + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    write_text(path, "".join(kept))


def resume_csv_monitor(csv_monitor: Any, purge_step: int) -> None:
    """DeepSpeed's ``csvMonitor`` appends, and writes a header the first time its process writes a
    file: after a resume its files would hold the interrupted run's steps past the checkpoint and a
    second header. Its files lose the rows of steps >= ``purge_step`` (atomically; a torn row too)
    and it is told they have their header."""
    for path in sorted(glob.glob(os.path.join(csv_monitor.log_dir, "*.csv"))):
        with open(path, newline="") as f:
            lines = list(csv.reader(f))
        if not lines:  # the monitor writes its header into it
            continue
        header, *rows = lines
        kept = [header]
        for row in rows:
            try:
                if len(row) == 2 and int(row[0]) < purge_step:
                    kept.append(row)
            except ValueError:  # a header written again by an earlier resume, or a torn row
                pass
        text = io.StringIO()
        csv.writer(text).writerows(kept)
        write_text(path, text.getvalue())
        name = os.path.basename(path)[:-len(".csv")]
        if name not in csv_monitor.filenames:
            csv_monitor.filenames.append(name)


def _json_number(value: Any) -> Any:
    return value if isinstance(value, int) else float(value)


class RunLogger:
    """The run's metrics to TensorBoard, DeepSpeed's monitors and ``trainer_log.jsonl``, active on
    global rank 0 only (``enabled``).

    ``purge_step``: a resumed run's first step; what the interrupted run logged from there on is
    dropped (TensorBoard hides it, the jsonl and csv_monitor's files lose their lines). ``monitor``:
    DeepSpeed's monitors (``deepspeed_monitor``; anything with ``write_events([(tag, value, step), ...])``).
    A context manager: ``with RunLogger(...) as log: ...`` flushes and closes on exit.
    """

    def __init__(self, output_dir: str, run_name: str, enabled: bool, purge_step: Optional[int] = None,
                 monitor: Optional[Any] = None):
        self.log_dir = os.path.join(output_dir, "runs", run_name)
        self.jsonl_path = os.path.join(output_dir, TRAINER_LOG)
        self._writer: Optional[Any] = None
        self._monitor = monitor if enabled else None
        self._jsonl: Optional[Any] = None
        self._row: dict[str, Any] = {}  # the current step's line, written by flush
        if enabled:
            # Imported here: other ranks never load TensorBoard nor create the folder.
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=self.log_dir, purge_step=purge_step)
            keep_steps_before(self.jsonl_path, purge_step or 0)
            csv_monitor = getattr(monitor, "csv_monitor", None)
            if purge_step is not None and csv_monitor is not None:
                resume_csv_monitor(csv_monitor, purge_step)
            self._jsonl = open(self.jsonl_path, "a")

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: dict[str, Optional[float]]) -> None:
        """One point per tag at ``step`` in every sink; ``None`` values (not measured this step) are
        skipped, so the caller can pass optional metrics without branching."""
        if self._writer is None:
            return
        measured = {tag: value for tag, value in values.items() if value is not None}
        for tag, value in measured.items():
            self._writer.add_scalar(tag, float(value), step)
        if self._monitor is not None:
            self._monitor.write_events([(tag, float(value), step) for tag, value in measured.items()])
        if self._row.get("step", step) != step:  # a step left without flush: its line first
            self._write_row()
        self._row.setdefault("step", step)
        self._row.update({tag: _json_number(value) for tag, value in measured.items()})

    def merge_event(self, step: int, merges: Sequence["Merge"]) -> None:
        """The merges of one event as a markdown table under ``aslora/merges``, so the order in
        which layers came to share a B can be read back after the run. Empty events log nothing."""
        if self._writer is None or not merges:
            return
        self._writer.add_text(MERGES_TAG, merges_markdown(merges), step)

    def distance_heatmaps(self, step: int, distances: dict[str, Any], groups: dict[str, list[tuple[int, ...]]],
                          num_layers: dict[str, int]) -> None:
        """Per module type, the layer x layer distance heatmap (see ``heatmap.render_heatmap``; the
        caller passes squared distances, the image shows their square root) under
        ``aslora/distance/<module_type>``, and the distance of its brightest colour as the scalar
        ``aslora/distance_max/<module_type>``: the sharing structure forming over the run."""
        if self._writer is None:
            return
        scales = {}
        for mtype in sorted(distances):
            image = render_heatmap(distances[mtype], groups[mtype], num_layers[mtype])
            scales[DISTANCE_MAX_TAG + mtype] = heatmap_scale(
                layer_distances(distances[mtype], groups[mtype], num_layers[mtype]))
            self._writer.add_image(DISTANCE_TAG + mtype, image, step, dataformats="HWC")
        self.scalars(step, scales)

    def text(self, tag: str, step: int, markdown: str) -> None:
        """Free markdown (the resolved config at start, a generated sample at the end), kept next
        to the curves it explains."""
        if self._writer is not None:
            self._writer.add_text(tag, markdown, step)

    def _write_row(self) -> None:
        self._jsonl.write(json.dumps(self._row) + "\n")
        self._row = {}

    def flush(self) -> None:
        """The step's logging is complete: write its ``trainer_log.jsonl`` line and push pending
        events to disk. The loop calls it at the end of every step, before a checkpoint, so a
        checkpoint's steps are all in the files a resumed run trims."""
        if self._writer is None:
            return
        if self._row:
            self._write_row()
        self._jsonl.flush()
        self._writer.flush()

    def close(self) -> None:
        """Flush and release the files; later calls are no-ops."""
        if self._writer is not None:
            self.flush()
            self._writer.close()
            self._jsonl.close()
            self._writer = self._jsonl = self._monitor = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

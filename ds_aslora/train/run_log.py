"""The training job's TensorBoard log: scalars, ASLoRA merge events, distance heatmaps, free text.

``RunLogger(output_dir, run_name, enabled=rank == 0)`` owns one ``SummaryWriter`` at
``<output_dir>/runs/<run_name>/``. Only the enabled logger (global rank 0) imports TensorBoard
or touches the disk; on every other rank each method returns at once, so the loop can call
them unconditionally.

Tags (names as the caller passes them, HF/torchtune style, for scalars):

- ``train/loss``, ``eval/perplexity``, ... : ``scalars(step, {...})``
- ``aslora/merges``: one markdown table per merge event (``merge_event``)
- ``aslora/distance/<module_type>``: the B-distance heatmap per layer (``distance_heatmaps``,
  ``heatmap.render_heatmap``), with ``aslora/distance_max/<module_type>``, the distance the
  brightest colour stands for
- anything else: ``text(tag, step, markdown)``

TensorBoard stores a text entry under ``<tag>/text_summary`` (plugin ``text``).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .heatmap import heatmap_scale, layer_distances, render_heatmap

if TYPE_CHECKING:
    from ..merging.policy import Merge

MERGES_TAG = "aslora/merges"
DISTANCE_TAG = "aslora/distance/"
DISTANCE_MAX_TAG = "aslora/distance_max/"


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


class RunLogger:
    """TensorBoard writer for one run, active on global rank 0 only (``enabled``).

    A context manager: ``with RunLogger(out, name, enabled=rank == 0) as tb: ...`` closes the
    writer (flushing it) on exit.
    """

    def __init__(self, output_dir: str, run_name: str, enabled: bool, purge_step: Optional[int] = None):
        self.log_dir = os.path.join(output_dir, "runs", run_name)
        self._writer: Optional[Any] = None
        if enabled:
            # Imported here: other ranks never load TensorBoard nor create the folder.
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: a resumed run hides what the crashed one logged past its checkpoint
            self._writer = SummaryWriter(log_dir=self.log_dir, purge_step=purge_step)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: dict[str, Optional[float]]) -> None:
        """One point per tag at ``step``; ``None`` values (not measured this step) are skipped,
        so the caller can pass optional metrics without branching."""
        if self._writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self._writer.add_scalar(tag, float(value), step)

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
        for mtype in sorted(distances):
            image = render_heatmap(distances[mtype], groups[mtype], num_layers[mtype])
            scale = heatmap_scale(layer_distances(distances[mtype], groups[mtype], num_layers[mtype]))
            self._writer.add_image(DISTANCE_TAG + mtype, image, step, dataformats="HWC")
            self._writer.add_scalar(DISTANCE_MAX_TAG + mtype, scale, step)

    def text(self, tag: str, step: int, markdown: str) -> None:
        """Free markdown (the resolved config at start, a generated sample at the end), kept next
        to the curves it explains."""
        if self._writer is not None:
            self._writer.add_text(tag, markdown, step)

    def flush(self) -> None:
        """Push pending events to disk (e.g. before a checkpoint, so the log matches it)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and release the event file; later calls are no-ops."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

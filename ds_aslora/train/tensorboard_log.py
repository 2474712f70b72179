"""The training job's TensorBoard log: scalars, ASLoRA merge events, distance heatmaps, free text.

``RunLogger(output_dir, run_name, enabled=rank == 0)`` owns one ``SummaryWriter`` at
``<output_dir>/runs/<run_name>/``. Only the enabled logger (global rank 0) imports TensorBoard
or touches the disk; on every other rank each method returns at once, so the loop can call
them unconditionally.

Tags (names as the caller passes them, HF/torchtune style, for scalars):

- ``train/loss``, ``eval/perplexity``, ... : ``scalars(step, {...})``
- ``aslora/merges``: one markdown table per merge event (``merge_event``)
- ``aslora/distance/<module_type>``: the B-distance heatmap per layer (``distance_heatmaps``),
  with ``aslora/distance_max/<module_type>``, the distance the brightest colour stands for
- anything else: ``text(tag, step, markdown)``

TensorBoard stores a text entry under ``<tag>/text_summary`` (plugin ``text``).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from ..merging.policy import Merge

MERGES_TAG = "aslora/merges"
DISTANCE_TAG = "aslora/distance/"
DISTANCE_MAX_TAG = "aslora/distance_max/"

# Viridis sampled at 0, 1/8, ..., 1: perceptually ordered (luminance rises with the value),
# readable in grey scale and by colour-blind readers. Dark purple = close, yellow = far.
_ANCHORS = np.array([(68, 1, 84), (72, 40, 120), (62, 73, 137), (49, 104, 142), (38, 130, 142),
                     (31, 158, 137), (53, 183, 121), (110, 206, 88), (253, 231, 37)], dtype=np.float64)
MISSING_RGB = (128, 128, 128)   # inf / NaN: pair not computed
OUTLINE_RGB = (255, 40, 40)    # border of a merged group's cells: red, a hue viridis never uses


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) -> uint8 RGB, anchors linearly interpolated (no matplotlib)."""
    x = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.minimum(np.floor(x).astype(np.int64), len(_ANCHORS) - 2)
    frac = (x - lo)[..., None]
    return np.rint(_ANCHORS[lo] * (1.0 - frac) + _ANCHORS[lo + 1] * frac).astype(np.uint8)


def _layer_to_group(groups: Sequence[Sequence[int]], num_layers: int) -> np.ndarray:
    owner = np.full(num_layers, -1, dtype=np.int64)
    for index, group in enumerate(groups):
        for layer in group:
            if not 0 <= layer < num_layers or owner[layer] != -1:
                raise ValueError(f"layer {layer} out of range [0, {num_layers}) or in two groups: {groups}")
            owner[layer] = index
    return owner


def _as_float_array(matrix: Any) -> np.ndarray:
    if hasattr(matrix, "detach"):   # a torch tensor, possibly on an accelerator
        matrix = matrix.detach().cpu().double().numpy()
    return np.asarray(matrix, dtype=np.float64)


def layer_distances(sq_distances: Any, groups: Sequence[Sequence[int]], num_layers: int) -> np.ndarray:
    """(L, L) float64: entry (a, b) is ``sqrt(D[group(a), group(b)])``, NaN where ``D`` is inf / NaN
    or a layer is in no group. ``sq_distances`` holds *squared* Frobenius distances between the
    live groups' running means (``merging.policy.squared_distances``), rows in ``groups`` order."""
    dist = _as_float_array(sq_distances)
    n = len(groups)
    if dist.shape != (n, n):
        raise ValueError(f"need a {n}x{n} distance matrix for {n} groups, got shape {dist.shape}")
    owner = _layer_to_group(groups, num_layers)
    with np.errstate(invalid="ignore"):
        plain = np.sqrt(np.maximum(dist, 0.0))   # a sharded sum can round slightly below 0
    plain[~np.isfinite(dist)] = np.nan
    values = plain[np.ix_(np.maximum(owner, 0), np.maximum(owner, 0))]
    covered = owner >= 0
    values[~(covered[:, None] & covered[None, :])] = np.nan
    return values


def heatmap_scale(values: np.ndarray) -> float:
    """The distance the brightest colour stands for: the largest finite entry (0 if none)."""
    finite = np.isfinite(values)
    return float(values[finite].max()) if finite.any() else 0.0


def render_heatmap(sq_distances: Any, groups: Sequence[Sequence[int]], num_layers: int,
                   target_px: int = 384, min_cell_px: int = 3) -> np.ndarray:
    """The sharing structure of one module type as an (H, W, 3) uint8 image, H = W = L * cell.

    Cell (a, b) shows the distance between the groups of layers a and b (``layer_distances``: the
    square root of the squared distances passed in), so the layers of one group form a block of
    zeros. Colours run from 0 (dark purple) to ``heatmap_scale`` (yellow, the largest finite
    distance); inf / NaN and layers in no group are grey. A cell is
    ``max(min_cell_px, target_px // L)`` pixels square.

    Outline: every cell (a, b) with a and b in the same group of two or more layers gets a red
    border (drawn inside the cell, ``max(1, cell // 10)`` px wide: 1 px up to 19-px cells) on each
    side it shares with a cell outside that set. A contiguous group is thus one outlined square on
    the diagonal; a non-contiguous group (``merge_candidates='all'``) shows one outlined rectangle
    per pair of its contiguous runs, off the diagonal too, so every pair of layers sharing a B is
    marked. Singleton groups are not outlined (their 1-cell zero diagonal says enough, and boxes on
    every cell would hide the blocks).
    """
    values = layer_distances(sq_distances, groups, num_layers)
    finite = np.isfinite(values)
    scale = heatmap_scale(values)
    rgb = colormap(np.where(finite, values / scale, 0.0) if scale > 0 else np.zeros_like(values))
    rgb[~finite] = MISSING_RGB

    owner = _layer_to_group(groups, num_layers)
    size = np.array([len(g) for g in groups] + [0])   # index -1 (no group) -> size 0
    shared = (owner[:, None] == owner[None, :]) & (size[owner] >= 2)[:, None]
    label = np.where(shared, owner[:, None], -1)

    cell = max(min_cell_px, target_px // max(num_layers, 1))
    image = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    inner = np.repeat(np.repeat(label, cell, axis=0), cell, axis=1)
    width = max(1, cell // 10)
    padded = np.pad(inner, width, constant_values=-1)
    size_px = inner.shape[0]
    border = np.zeros_like(inner, dtype=bool)
    for k in range(1, width + 1):   # a pixel within ``width`` of a change of label
        for dy, dx in ((-k, 0), (k, 0), (0, -k), (0, k)):
            border |= padded[width + dy:width + dy + size_px, width + dx:width + dx + size_px] != inner
    image[border & (inner >= 0)] = OUTLINE_RGB
    return image


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
        """Per module type, the layer x layer distance heatmap (see ``render_heatmap``; the caller
        passes squared distances, the image shows their square root) under
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

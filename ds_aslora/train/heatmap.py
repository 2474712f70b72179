"""ASLoRA's sharing structure as a picture: the layer x layer B-distance heatmap of one module type.

Pure numpy (no matplotlib): ``render_heatmap`` turns the squared distances between live B groups
into an RGB image, viridis-coloured, merged groups outlined in red; ``run_log.RunLogger`` logs it
to TensorBoard at every merge event.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

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
    or a layer is in no group; 0 within a group, whatever ``D``'s diagonal holds (the coordinator
    leaves it inf: a group is never its own merge candidate). ``sq_distances`` holds *squared*
    Frobenius distances between the live groups' running means (``merging.policy.squared_distances``),
    rows in ``groups`` order."""
    dist = _as_float_array(sq_distances).copy()
    n = len(groups)
    if dist.shape != (n, n):
        raise ValueError(f"need a {n}x{n} distance matrix for {n} groups, got shape {dist.shape}")
    np.fill_diagonal(dist, 0.0)
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

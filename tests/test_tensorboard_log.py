"""The TensorBoard run log: what rank 0 writes reads back (scalars, merge tables, text, heatmap
images), other ranks write and import nothing, and the heatmap's pixels mean what its docstring says."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ds_aslora.merging.policy import Merge
from ds_aslora.train.tensorboard_log import (
    MISSING_RGB,
    OUTLINE_RGB,
    RunLogger,
    colormap,
    layer_distances,
    merges_markdown,
    render_heatmap,
)

INF = float("inf")


def read_run(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def text_at(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    """add_text stores a string tensor (plugin 'text') under ``<tag>/text_summary``."""
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag + "/text_summary")]


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def red_mask(image: np.ndarray) -> np.ndarray:
    return np.all(image == OUTLINE_RGB, axis=-1)


def perimeter(size: int, lo: int, hi: int) -> np.ndarray:
    """1-px border of the square [lo, hi) x [lo, hi) in a size x size mask."""
    mask = np.zeros((size, size), dtype=bool)
    mask[lo, lo:hi] = mask[hi - 1, lo:hi] = mask[lo:hi, lo] = mask[lo:hi, hi - 1] = True
    return mask


# -- the logger, read back ------------------------------------------------------------------

def test_scalars_text_merges_and_heatmaps_read_back(tmp_path):
    merges = [Merge("q_proj", upper=(2, 3), lower=(0, 1), distance=0.125, step=10),
              Merge("v_proj", upper=(5,), lower=(4,), distance=0.5, step=10)]
    groups = {"q_proj": [(0, 1), (2,), (3,)]}
    distances = {"q_proj": torch.tensor([[0.0, 1.0, 9.0], [1.0, 0.0, 4.0], [9.0, 4.0, 0.0]], dtype=torch.float64)}
    with RunLogger(str(tmp_path), "run1", enabled=True) as tb:
        assert tb.enabled and tb.log_dir == os.path.join(str(tmp_path), "runs", "run1")
        tb.text("config", 0, "| key | value |\n|---|---|\n| r | 8 |")
        tb.scalars(1, {"train/loss": 2.5, "train/grad_norm": None, "train/learning_rate": 1e-4})
        tb.scalars(2, {"train/loss": 2.0, "aslora/live_B_groups/q_proj": 3})
        tb.merge_event(10, merges)
        tb.merge_event(11, [])                       # nothing to say: nothing written
        tb.distance_heatmaps(10, distances, groups, {"q_proj": 4})
    assert not tb.enabled                            # closed; later calls are no-ops
    tb.scalars(3, {"train/loss": 1.0})

    acc = read_run(os.path.join(str(tmp_path), "runs", "run1"))
    tags = acc.Tags()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 2.0)]
    assert [(e.step, e.value) for e in acc.Scalars("aslora/live_B_groups/q_proj")] == [(2, 3.0)]
    assert acc.Scalars("train/learning_rate")[0].value == pytest.approx(1e-4)
    assert "train/grad_norm" not in tags["scalars"]
    assert [(e.step, e.value) for e in acc.Scalars("aslora/distance_max/q_proj")] == [(10, 3.0)]

    assert text_at(acc, "config") == [(0, "| key | value |\n|---|---|\n| r | 8 |")]
    ((step, table),) = text_at(acc, "aslora/merges")
    assert step == 10
    lines = table.splitlines()
    assert lines[0] == "| step | module type | merged layers (lower → upper) | distance |"
    assert lines[2:] == ["| 10 | q_proj | 0-1 → 2-3 | 0.125 |", "| 10 | v_proj | 4 → 5 | 0.5 |"]

    assert tags["images"] == ["aslora/distance/q_proj"]
    (event,) = acc.Images("aslora/distance/q_proj")
    assert (event.step, event.width, event.height) == (10, 384, 384)    # 4 layers x 96 px
    pixels = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(pixels, render_heatmap(distances["q_proj"], groups["q_proj"], 4))
    merged, apart = pixels[48, 144], pixels[48, 240]          # centres of cells (0, 1) and (0, 2)
    assert tuple(merged) == tuple(colormap(0.0)) and tuple(apart) != tuple(merged)
    assert tuple(pixels[48, 336]) == tuple(colormap(1.0))     # (0, 3): the largest distance, 3


def test_disabled_logger_writes_and_imports_nothing(tmp_path):
    out = tmp_path / "out"
    code = f"""
import sys
from ds_aslora.train.tensorboard_log import RunLogger
with RunLogger({str(out)!r}, "run", enabled=False) as tb:
    tb.scalars(1, {{"train/loss": 1.0}})
    tb.text("config", 0, "x")
    tb.merge_event(1, [])
    tb.distance_heatmaps(1, {{"q": [[0.0]]}}, {{"q": [(0,)]}}, {{"q": 1}})
    tb.flush()
print(sorted(m for m in sys.modules if "tensorboard" in m and not m.startswith("ds_aslora")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert not out.exists()


# -- the heatmap, pixel by pixel ------------------------------------------------------------

def test_layer_distances_expand_groups_to_layers_and_take_the_root():
    sq = np.array([[0.0, 4.0, INF], [4.0, 0.0, 16.0], [INF, 16.0, 0.0]])
    values = layer_distances(sq, [(0, 1), (2,), (3, 4, 5)], 6)
    assert values.shape == (6, 6)
    assert values[0, 1] == 0.0 and values[1, 2] == 2.0 and values[2, 5] == 4.0 and values[4, 3] == 0.0
    assert np.isnan(values[0, 3]) and np.isnan(values[5, 1])
    assert np.array_equal(values, values.T, equal_nan=True)


def test_render_heatmap_colours_grey_and_outlines():
    groups = [(0, 1), (2,), (3, 4, 5)]
    sq = np.array([[0.0, 4.0, INF], [4.0, 0.0, 16.0], [INF, 16.0, 0.0]])
    image = render_heatmap(sq, groups, 6, target_px=60)          # 10-px cells, 1-px outline
    assert image.shape == (60, 60, 3) and image.dtype == np.uint8

    def centre(a: int, b: int) -> tuple[int, ...]:
        return tuple(image[10 * a + 5, 10 * b + 5])

    assert centre(0, 3) == centre(5, 1) == MISSING_RGB        # inf: grey
    assert centre(0, 1) == centre(2, 2) == tuple(colormap(0.0))
    assert centre(1, 2) == tuple(colormap(0.5))               # 2 of the largest finite 4
    assert centre(2, 4) == tuple(colormap(1.0))
    # Merged groups outlined on their diagonal block, the singleton (layer 2) not.
    np.testing.assert_array_equal(red_mask(image), perimeter(60, 0, 20) | perimeter(60, 30, 60))


def test_render_heatmap_outlines_every_cell_pair_of_a_non_contiguous_group():
    image = render_heatmap(np.array([[0.0, 1.0], [1.0, 0.0]]), [(1,), (0, 2)], 3, target_px=30)
    expected = np.zeros((30, 30), dtype=bool)
    for a in (0, 2):
        for b in (0, 2):
            cell = np.zeros((30, 30), dtype=bool)
            cell[10 * a:10 * a + 10, 10 * b:10 * b + 10] = perimeter(10, 0, 10)
            expected |= cell
    np.testing.assert_array_equal(red_mask(image), expected)


def test_render_heatmap_outline_grows_with_large_cells():
    image = render_heatmap(np.zeros((1, 1)), [(0, 1)], 2, target_px=60)   # 30-px cells: 3-px outline
    red = red_mask(image)
    assert red[:3].all() and red[-3:].all() and red[:, :3].all() and red[:, -3:].all()
    assert not red[3:-3, 3:-3].any()


def test_colour_brightens_monotonically_with_distance():
    assert np.all(np.diff(luminance(colormap(np.linspace(0.0, 1.0, 20)))) > 0)
    n = 6
    sq = torch.tensor([[float(i - j) ** 2 for j in range(n)] for i in range(n)])
    row = render_heatmap(sq, [(i,) for i in range(n)], n, target_px=60)[5, 5::10]
    assert np.all(np.diff(luminance(row.astype(np.float64))) > 0)
    assert not red_mask(render_heatmap(sq, [(i,) for i in range(n)], n)).any()   # singletons: no outline


def test_render_heatmap_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2x2"):
        render_heatmap(np.zeros((3, 3)), [(0,), (1,)], 2)
    with pytest.raises(ValueError, match="two groups"):
        render_heatmap(np.zeros((2, 2)), [(0, 1), (1,)], 2)


def test_merges_markdown_compresses_layer_runs():
    table = merges_markdown([Merge("mlp.up_proj", upper=(3, 7, 8), lower=(0, 1, 2, 5), distance=1.5e-3, step=4)])
    assert table.splitlines()[-1] == "| 4 | mlp.up_proj | 0-2, 5 → 3, 7-8 | 0.0015 |"

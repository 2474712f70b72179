"""The run log: what rank 0 writes reads back from TensorBoard (scalars, merge tables, text,
heatmap images); other ranks write and import nothing."""
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
from ds_aslora.train.heatmap import colormap, render_heatmap
from ds_aslora.train.run_log import RunLogger, merges_markdown


def read_run(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def text_at(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    """add_text stores a string tensor (plugin 'text') under ``<tag>/text_summary``."""
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag + "/text_summary")]


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
from ds_aslora.train.run_log import RunLogger
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


def test_merges_markdown_compresses_layer_runs():
    table = merges_markdown([Merge("mlp.up_proj", upper=(3, 7, 8), lower=(0, 1, 2, 5), distance=1.5e-3, step=4)])
    assert table.splitlines()[-1] == "| 4 | mlp.up_proj | 0-2, 5 → 3, 7-8 | 0.0015 |"

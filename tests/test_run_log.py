"""Where the job's metrics go: what RunLogger writes reads back from TensorBoard, DeepSpeed's
monitors and trainer_log.jsonl alike; other ranks write and import nothing; a resumed run logs
each step once. The slow tests read a real 2-rank ASLoRA job's csv_monitor files, its jsonl and
its TensorBoard run through a TensorBoard server's HTTP API, as a user's browser would."""
from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from launcher import ROOT, launch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ds_aslora.merging.policy import Merge
from ds_aslora.train.heatmap import OUTLINE_RGB, colormap, render_heatmap
from ds_aslora.train.run_log import TRAINER_LOG, RunLogger, merges_markdown
from ds_aslora.utils.ranks import free_port


def read_run(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def text_at(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    """add_text stores a string tensor (plugin 'text') under ``<tag>/text_summary``."""
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag + "/text_summary")]


def read_jsonl(out: Any) -> list[dict]:
    with open(os.path.join(out, TRAINER_LOG)) as f:
        return [json.loads(line) for line in f]


class Events:
    """What DeepSpeed's MonitorMaster is given: ``write_events([(tag, value, step), ...])``."""

    def __init__(self):
        self.events: list[tuple[str, float, int]] = []

    def write_events(self, events):
        self.events += events


# -- the logger, read back ------------------------------------------------------------------

def test_every_sink_reads_back_the_same_scalars(tmp_path):
    merges = [Merge("q_proj", upper=(2, 3), lower=(0, 1), distance=0.125, step=10),
              Merge("v_proj", upper=(5,), lower=(4,), distance=0.5, step=10)]
    groups = {"q_proj": [(0, 1), (2,), (3,)]}
    distances = {"q_proj": torch.tensor([[0.0, 1.0, 9.0], [1.0, 0.0, 4.0], [9.0, 4.0, 0.0]], dtype=torch.float64)}
    monitor = Events()
    with RunLogger(str(tmp_path), "run1", enabled=True, monitor=monitor) as log:
        assert log.enabled and log.log_dir == os.path.join(str(tmp_path), "runs", "run1")
        log.text("config", 0, "| key | value |\n|---|---|\n| r | 8 |")
        log.scalars(1, {"train/loss": 2.5, "train/grad_norm": None, "train/learning_rate": 1e-4})
        log.flush()
        assert read_jsonl(tmp_path) == [{"step": 1, "train/loss": 2.5, "train/learning_rate": 1e-4}]  # on disk
        log.scalars(2, {"train/loss": 2.0, "aslora/live_B_groups/q_proj": 3})
        log.scalars(2, {"eval/loss": 1.5})               # same step: the same line
        log.merge_event(10, merges)
        log.merge_event(11, [])                          # nothing to say: nothing written
        log.distance_heatmaps(10, distances, groups, {"q_proj": 4})
    assert not log.enabled                               # closed; later calls are no-ops
    log.scalars(3, {"train/loss": 1.0})

    assert read_jsonl(tmp_path) == [{"step": 1, "train/loss": 2.5, "train/learning_rate": 1e-4},
                                    {"step": 2, "train/loss": 2.0, "aslora/live_B_groups/q_proj": 3, "eval/loss": 1.5},
                                    {"step": 10, "aslora/distance_max/q_proj": 3.0}]
    assert monitor.events == [("train/loss", 2.5, 1), ("train/learning_rate", 1e-4, 1), ("train/loss", 2.0, 2),
                              ("aslora/live_B_groups/q_proj", 3.0, 2), ("eval/loss", 1.5, 2),
                              ("aslora/distance_max/q_proj", 3.0, 10)]

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


def test_a_resumed_logger_drops_the_lines_it_will_log_again_and_a_new_run_starts_empty(tmp_path):
    with RunLogger(str(tmp_path), "run", enabled=True) as log:
        for step in range(7):
            log.scalars(step, {"train/loss": float(step)})
            log.flush()
    with open(tmp_path / TRAINER_LOG, "a") as f:
        f.write('{"step": 7, "train/lo')                 # torn by a crash
    with RunLogger(str(tmp_path), "run", enabled=True, purge_step=4) as log:   # resumed from step 3's checkpoint
        assert [r["step"] for r in read_jsonl(tmp_path)] == [0, 1, 2, 3]
        for step in (4, 5):
            log.scalars(step, {"train/loss": 10.0 + step})
    assert read_jsonl(tmp_path) == [{"step": s, "train/loss": float(s) if s < 4 else 10.0 + s} for s in range(6)]
    RunLogger(str(tmp_path), "run", enabled=True).close()  # no purge_step: a new run
    assert read_jsonl(tmp_path) == []


def test_disabled_logger_writes_and_imports_nothing(tmp_path):
    out = tmp_path / "out"
    code = f"""
import sys
from ds_aslora.train.run_log import RunLogger
class Refuse:
    def write_events(self, events):
        raise AssertionError("a disabled logger wrote to a monitor")
with RunLogger({str(out)!r}, "run", enabled=False, monitor=Refuse()) as log:
    log.scalars(1, {{"train/loss": 1.0}})
    log.text("config", 0, "x")
    log.merge_event(1, [])
    log.distance_heatmaps(1, {{"q": [[0.0]]}}, {{"q": [(0,)]}}, {{"q": 1}})
    log.flush()
print(sorted(m for m in sys.modules if "tensorboard" in m and not m.startswith("ds_aslora")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert not out.exists()


def test_merges_markdown_compresses_layer_runs():
    table = merges_markdown([Merge("mlp.up_proj", upper=(3, 7, 8), lower=(0, 1, 2, 5), distance=1.5e-3, step=4)])
    assert table.splitlines()[-1] == "| 4 | mlp.up_proj | 0-2, 5 → 3, 7-8 | 0.0015 |"


# -- a real job: csv_monitor, trainer_log.jsonl, TensorBoard over HTTP ----------------------

# merge events at steps 4 and 6 (4 layers down to 2 B groups per module type), eval at 0, 3 and 6, a checkpoint at 3
ARGS = ["--method", "aslora", "--merge_start", "2", "--merge_interval", "2", "--merge_end", "6", "--target_groups",
        "2", "--max_steps", "6", "--eval_interval", "3", "--save_interval", "3", "--learning_rate", "1e-2",
        "--run_name", "r"]
MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def job(assets, tmp_path_factory):
    """One 2-rank ASLoRA job under ZeRO-2 whose DeepSpeed JSON enables csv_monitor and DeepSpeed's
    own tensorboard (both with "auto" paths: the run folder), shared by the tests below."""
    root = tmp_path_factory.mktemp("run_log")
    with open(os.path.join(ROOT, "ds_configs", "zero2.json")) as f:
        ds = json.load(f)
    for monitor in ("csv_monitor", "tensorboard"):
        ds[monitor] = {"enabled": True, "output_path": "auto", "job_name": "auto"}
    (root / "ds.json").write_text(json.dumps(ds))
    done = launch(assets, root / "out", *ARGS, ds=root / "ds.json", stage=2)
    return {"out": root / "out", "ds": root / "ds.json", "stdout": done.stdout}


def read_csv_monitor(run_dir: Any) -> dict[str, list[tuple[int, float]]]:
    """csv_monitor's files: one per tag, named by the tag with '/' as '_', rows (step, value)."""
    files = {}
    for path in glob.glob(os.path.join(run_dir, "*.csv")):
        with open(path) as f:
            header, *rows = list(csv.reader(f))
        assert header[0] == "step", path
        files[os.path.basename(path)[:-len(".csv")]] = [(int(s), float(v)) for s, v in rows]
    return files


@pytest.mark.slow
def test_trainer_log_has_one_line_per_logged_step(job):
    rows = read_jsonl(job["out"])
    assert [r["step"] for r in rows] == list(range(7))  # eval before training at 0, then every step (log_interval 1)
    assert [s for s, r in enumerate(rows) if "eval/loss" in r] == [0, 3, 6]
    per_step = rows[1]["train/epoch"]  # global batch / training rows
    assert rows[0]["train/epoch"] == 0.0 and 0 < per_step < 1
    for row in rows[1:]:
        assert row["train/epoch"] == pytest.approx(row["step"] * per_step)
        for key in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
                    "memory/peak_gib", "params/trainable"):
            assert key in row, (row["step"], key)
    assert [rows[s]["aslora/live_B_groups/q_proj"] for s in range(1, 7)] == [4, 4, 4, 3, 3, 2]
    assert [s for s, r in enumerate(rows) if "aslora/distance_max/q_proj" in r] == [4, 6]
    assert rows[6]["eval/loss"] < rows[0]["eval/loss"]
    assert "every logged step: " + str(job["out"] / TRAINER_LOG) in job["stdout"]


@pytest.mark.slow
def test_csv_monitor_gets_the_jobs_scalars_and_deepspeeds_tensorboard_stays_off(job):
    run_dir = job["out"] / "runs" / "r"
    files = read_csv_monitor(run_dir)
    rows = read_jsonl(job["out"])
    tags = {tag for row in rows for tag in row if tag != "step"}
    assert set(files) == {tag.replace("/", "_") for tag in tags}  # the job's tags, none of DeepSpeed's own
    for tag in ("train/loss", "train/grad_norm", "eval/loss", "train/epoch", "aslora/live_B_groups/q_proj",
                "aslora/distance_max/down_proj"):
        assert tag in tags
    for tag in tags:  # same steps, same values (csv and json both write Python's shortest repr)
        assert files[tag.replace("/", "_")] == [(r["step"], r[tag]) for r in rows if tag in r], tag
    # DeepSpeed's tensorboard monitor was enabled in the JSON: not started, and the job says so
    assert len(glob.glob(str(run_dir / "events.out.tfevents.*"))) == 1
    assert "Train/Samples/train_loss" not in read_run(str(run_dir)).Tags()["scalars"]
    assert "note: DeepSpeed's tensorboard monitor" in job["stdout"]


@pytest.mark.slow
def test_a_resumed_run_logs_each_step_once(assets, job, tmp_path):
    """As after a crash past the step-3 checkpoint: the resumed run drops steps 4-6 from the jsonl and the
    csv_monitor files and logs them again, equal to the uninterrupted run's."""
    resumed = tmp_path / "resumed"
    shutil.copytree(job["out"], resumed)
    (resumed / "checkpoints" / "latest").write_text("global_step3")
    shutil.rmtree(resumed / "adapter")
    launch(assets, resumed, *ARGS, "--resume", "auto", ds=job["ds"], stage=2)
    full, again = read_jsonl(job["out"]), read_jsonl(resumed)
    assert [r["step"] for r in again] == list(range(7))
    csv_full, csv_again = read_csv_monitor(job["out"] / "runs" / "r"), read_csv_monitor(resumed / "runs" / "r")
    assert {k: [s for s, _ in v] for k, v in csv_again.items()} == {k: [s for s, _ in v] for k, v in csv_full.items()}
    exact = ("train/loss", "train/learning_rate", "train/epoch", "eval/loss", "aslora/live_B_groups/q_proj",
             "aslora/distance_max/q_proj")
    for a, b in zip(full, again, strict=True):  # fp32 on CPU, same ranks and data: exactly
        for key in exact:
            assert a.get(key) == b.get(key), (a["step"], key)
    for key in exact:  # one header per csv file (read_csv_monitor reads every other row as numbers)
        assert csv_again[key.replace("/", "_")] == csv_full[key.replace("/", "_")], key


# -- TensorBoard's HTTP API ------------------------------------------------------------------

@contextlib.contextmanager
def tensorboard_server(logdir: Any, log_path: Any) -> Iterator[str]:
    """A real TensorBoard server on a free local port; yields its base URL, stops it on exit.
    The Python loader (``--load_fast=false``): no data-server child process to leave behind."""
    port = free_port()
    log = open(log_path, "w")
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
                               "127.0.0.1", "--port", str(port), "--load_fast=false"], stdout=log, stderr=log)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def get_json(url: str) -> Any:
    return json.loads(get(url))


def wait_until_loaded(base: str, run: str, last_tag: str, last_step: int, timeout: float = 120.0) -> None:
    """Poll until the server answers and has read the whole run: it reads event files in order, in
    the background, and ``last_tag`` at ``last_step`` is the job's last event."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            points = get_json(f"{base}/data/plugin/scalars/scalars?{query(run=run, tag=last_tag)}")
            if points and points[-1][1] == last_step:
                return
        except (urllib.error.URLError, ConnectionError):
            pass  # not listening yet, or the tag not read yet (400)
        assert time.monotonic() < deadline, f"TensorBoard did not serve run {run!r} within {timeout} s"
        time.sleep(1.0)


def query(**params: Any) -> str:
    return urllib.parse.urlencode(params)


@pytest.mark.slow
def test_a_tensorboard_server_shows_the_scalars_merge_tables_and_heatmaps(job, tmp_path):
    rows = {r["step"]: r for r in read_jsonl(job["out"])}
    with tensorboard_server(job["out"] / "runs", tmp_path / "tensorboard.log") as base:
        wait_until_loaded(base, "r", "train/epoch", 6)  # the last scalar of the last step
        scalar_tags = get_json(f"{base}/data/plugin/scalars/tags")["r"]
        assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "train/epoch",
                "eval/loss", "eval/perplexity", "memory/peak_gib", "params/trainable",
                "aslora/live_B_groups/q_proj", "aslora/distance_max/q_proj"} <= set(scalar_tags)
        assert not any(tag.startswith("Train/") for tag in scalar_tags)  # no DeepSpeed monitor curve
        for tag in ("train/loss", "eval/loss", "train/grad_norm", "aslora/live_B_groups/q_proj",
                    "aslora/distance_max/q_proj"):
            points = get_json(f"{base}/data/plugin/scalars/scalars?{query(run='r', tag=tag)}")
            # [wall_time, step, value]; TensorBoard keeps float32
            assert [(step, value) for _, step, value in points] == [
                (s, float(np.float32(r[tag]))) for s, r in sorted(rows.items()) if tag in r], tag

        texts = get_json(f"{base}/data/plugin/text/tags")["r"]
        assert "aslora/merges/text_summary" in texts and "aslora/schedule/text_summary" in texts
        merges = get_json(f"{base}/data/plugin/text/text?{query(run='r', tag='aslora/merges/text_summary')}")
        assert [m["step"] for m in merges] == [4, 6]
        for m in merges:  # the markdown table, rendered: one row per module type
            assert "<table>" in m["text"] and all(f"<td>{t}</td>" in m["text"] for t in MODULE_TYPES), m["text"]

        images = get_json(f"{base}/data/plugin/images/tags")["r"]
        assert set(images) == {f"aslora/distance/{t}" for t in MODULE_TYPES}
        for tag in ("aslora/distance/q_proj", "aslora/distance/down_proj"):
            shown = get_json(f"{base}/data/plugin/images/images?{query(run='r', tag=tag, sample=0)}")
            assert [i["step"] for i in shown] == [4, 6]
            for entry in shown:
                png = get(f"{base}/data/plugin/images/individualImage?{entry['query']}")
                assert png.startswith(b"\x89PNG")
                image = Image.open(io.BytesIO(png)).convert("RGB")
                assert image.size == (384, 384)  # 4 layers x 96 px
                pixels = np.asarray(image)
                for layer in range(4):  # each layer's distance to itself: 0, the darkest colour
                    assert tuple(pixels[96 * layer + 48, 96 * layer + 48]) == tuple(colormap(0.0))
                # the groups the event chose from: all single at step 4, a merged pair (outlined) at step 6
                assert np.all(pixels == OUTLINE_RGB, axis=-1).any() == (entry["step"] == 6)


def test_a_resumed_job_continues_its_wandb_run(tmp_path, monkeypatch):
    """wandb.init reads WANDB_RUN_ID and WANDB_RESUME: a restart continues the run its job started,
    a new job (or --overwrite_output_dir) starts a new one, and an id the user exported wins."""
    from ds_aslora.train.run_log import WANDB_RUN_ID, continue_wandb_run

    for name in ("WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    first = continue_wandb_run(str(tmp_path), resuming=False)
    assert os.environ["WANDB_RUN_ID"] == first and os.environ["WANDB_RESUME"] == "allow"
    assert open(tmp_path / WANDB_RUN_ID).read().strip() == first
    monkeypatch.delenv("WANDB_RUN_ID")
    assert continue_wandb_run(str(tmp_path), resuming=True) == first
    monkeypatch.delenv("WANDB_RUN_ID")
    second = continue_wandb_run(str(tmp_path), resuming=False)
    assert second != first and open(tmp_path / WANDB_RUN_ID).read().strip() == second
    monkeypatch.setenv("WANDB_RUN_ID", "mine")
    monkeypatch.setenv("WANDB_RESUME", "must")
    assert continue_wandb_run(str(tmp_path), resuming=True) == "mine" and os.environ["WANDB_RESUME"] == "must"
    assert open(tmp_path / WANDB_RUN_ID).read().strip() == "mine"


def test_csv_monitor_files_of_a_resumed_run_keep_one_header_and_each_step_once(tmp_path, monkeypatch):
    """DeepSpeed's csvMonitor (real) appends and writes a header per process: the resumed run's logger
    drops the interrupted run's rows from the checkpoint's step on, and the files keep their one header."""
    import deepspeed.comm as dist
    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.monitor.monitor import MonitorMaster

    monkeypatch.setattr(dist, "get_rank", lambda *args, **kwargs: 0)  # rank 0 of a job, without a process group

    def monitor():  # one per process, as the job builds it
        return MonitorMaster(get_monitor_config({"csv_monitor": {"enabled": True, "output_path": str(tmp_path),
                                                                 "job_name": "r"}}))

    with RunLogger(str(tmp_path), "r", enabled=True, monitor=monitor()) as log:
        for step in range(1, 7):  # the interrupted run got to step 6; its checkpoint is at 3
            log.scalars(step, {"train/loss": float(step), "eval/loss": 0.5 if step == 6 else None})
            log.flush()
    with RunLogger(str(tmp_path), "r", enabled=True, purge_step=4, monitor=monitor()) as log:
        for step in range(4, 9):
            log.scalars(step, {"train/loss": 10.0 + step})
            log.flush()
    assert read_csv_monitor(tmp_path / "r") == {
        "train_loss": [(1, 1.0), (2, 2.0), (3, 3.0)] + [(s, 10.0 + s) for s in range(4, 9)], "eval_loss": []}

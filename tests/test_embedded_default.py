"""The embedded default run (no --data): the Shakespeare sample trained with ASLoRA down to a
quarter of LoRA's parameters within its 40 steps, each preset value applying only where the user
set nothing."""
import os

import pytest

from ds_aslora.adapters.count import build_on_meta
from ds_aslora.merging.schedule import model_schedule, param_counts
from ds_aslora.train.job import EMBEDDED, apply_embedded_defaults
from ds_aslora.train.run_config import parse_run_config

SMOLLM2 = os.path.join(os.path.dirname(__file__), "assets", "configs", "smollm2-135m.json")
DS = ["--deepspeed", "ds.json"]


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DS_ASLORA_CACHE", str(tmp_path))


def embedded(*flags):
    run, _ = parse_run_config([*flags, *DS])
    apply_embedded_defaults(run)
    return run


def test_the_preset_applies_where_the_user_set_nothing():
    run = embedded()
    assert (run.adapter.method, run.adapter.target_ratio, run.training.max_steps) == ("aslora", 0.25, 40)
    assert os.path.isfile(run.data.data) and os.path.isfile(run.data.eval_data)
    # a value the user gives wins, even when it equals the field's own default (lora)
    assert embedded("--method", "lora").adapter.method == "lora"
    assert embedded("--max_steps", "100").training.max_steps == 100
    assert embedded("--lora_r", "16").adapter.r == 16  # an alias counts as given
    other_target = embedded("--target_groups", "3").adapter
    assert (other_target.method, other_target.target_groups, other_target.target_ratio) == ("aslora", 3, None)


def test_the_default_schedule_merges_within_its_run_on_smollm2():
    """SmolLM2-135M (30 layers, every linear layer adapted at r=8): 40 steps reach the target."""
    run = embedded()
    model = build_on_meta(SMOLLM2, run.adapter)
    schedule = model_schedule(model, EMBEDDED["training"]["max_steps"])
    assert schedule.events and schedule.events[-1][0] <= 40
    text = schedule.describe({m: 30 for m in schedule.final_groups}, None)
    assert "merge events" in text
    counts = param_counts(model)
    assert 0.2 < counts.live(schedule.final_groups) / counts.lora <= 0.25

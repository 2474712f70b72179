"""bench/quality.py's budget arithmetic: ASLoRA's schedule ends within a quarter of LoRA's
parameters and inside the training steps, for the budgets the README's table comes from."""
import importlib.util
import os
import sys

import pytest

from ds_aslora import AdapterConfig
from ds_aslora.adapters.count import build_on_meta, count_trainable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = os.path.join(ROOT, "tests", "assets", "configs", "smollm2-135m.json")


def _quality():
    spec = importlib.util.spec_from_file_location("quality", os.path.join(ROOT, "bench", "quality.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["QUICK", "FULL"])
def test_aslora_schedule_ends_within_a_quarter_of_lora_before_the_last_steps(mode):
    quality = _quality()
    budget = getattr(quality, mode)
    s = quality.aslora_schedule(SMOLLM2, budget)
    adapter = dict(r=budget.r, alpha=budget.alpha, target_modules=budget.targets.split(","))
    lora = count_trainable(build_on_meta(SMOLLM2, AdapterConfig(method="lora", **adapter)))
    assert lora == 30 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8)  # q: 576->576, v: 576->192 (GQA)
    # final ASLoRA count: one A per module type, target_groups B groups per module type
    final = (8 * 576) * 2 + s["target_groups"] * (576 * 8 + 192 * 8)
    assert final <= quality.PARAM_BUDGET * lora
    assert (s["target_groups"] + 1) * (576 * 8 + 192 * 8) + 2 * 8 * 576 > quality.PARAM_BUDGET * lora  # the most kept
    events_needed = -(-(30 - s["target_groups"]) // s["merges_per_event"])
    last_event = s["merge_start"] + events_needed * s["merge_interval"]
    assert last_event <= budget.steps * 3 // 4, "the merged groups get the last quarter of training"

"""bench/quality.py's protocol: each method's best lr chosen on validation (the grid extended past an
edge best), and ASLoRA's schedule within a quarter of LoRA's parameters for every budget it runs."""
import importlib.util
import os
import sys

import pytest

from ds_aslora import AdapterConfig
from ds_aslora.adapters.count import build_on_meta, count_trainable
from ds_aslora.merging.schedule import model_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = os.path.join(ROOT, "tests", "assets", "configs", "smollm2-135m.json")


def _quality():
    spec = importlib.util.spec_from_file_location("quality", os.path.join(ROOT, "bench", "quality.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


quality = _quality()
BUDGETS = [(name, mode) for name in quality.TASKS for mode in ("budget", "quick")]


@pytest.mark.parametrize("task, mode", BUDGETS)
@pytest.mark.parametrize("variant", [v for v, flags in quality.VARIANTS.items() if flags["method"] == "aslora"])
def test_every_aslora_variant_ends_within_a_quarter_of_lora(task, mode, variant):
    budget = getattr(quality.TASKS[task], mode)
    adapter = dict(r=budget.r, alpha=budget.alpha, target_modules=budget.targets.split(","))
    lora = count_trainable(build_on_meta(SMOLLM2, AdapterConfig(method="lora", **adapter)))
    assert lora == 30 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8)  # q: 576->576, v: 576->192 (GQA)
    flags = {k: v for k, v in quality.VARIANTS[variant].items()}
    schedule = model_schedule(build_on_meta(SMOLLM2, AdapterConfig(**adapter, **flags)), budget.steps)
    groups = schedule.final_groups["q_proj"]
    final = 2 * 8 * 576 + groups * (576 * 8 + 192 * 8)  # one A per module type + the B groups
    assert final <= 0.25 * lora < final + 576 * 8 + 192 * 8  # the most groups within the quarter
    assert all(step <= budget.steps for step, _ in schedule.events)


class FakeStudy(quality.Study):
    """best_lr's protocol against a fixed validation curve (no training)."""

    def __init__(self, curve, higher, budget):
        self.curve, self.budget, self.asked = curve, budget, []
        self.scorer = type("S", (), {"higher_is_better": higher})()

    def run(self, variant, lr, seed):
        self.asked.append(round(lr, 12))
        return {"val": self.curve(lr)}


def test_the_sweep_extends_past_an_edge_best_and_stops_at_an_inner_one():
    budget = quality.TASKS["sentiment"].budget  # 3e-4, 1e-3, 3e-3; two extensions a side
    peak = FakeStudy(lambda lr: -abs(lr - 2e-2), True, budget)  # peak beyond the grid's top
    assert peak.best_lr("LoRA") == pytest.approx(1e-2)  # 1e-2 added, then 1e-2 * 10/3 shows it is inner
    assert sorted(set(peak.asked)) == pytest.approx([3e-4, 1e-3, 3e-3, 1e-2, 1e-2 * 10 / 3])
    rising = FakeStudy(lambda lr: lr, True, budget)  # still improving: two steps past the edge, no more
    assert rising.best_lr("LoRA") == pytest.approx(3e-3 * (10 / 3) ** 2) and len(set(rising.asked)) == 5
    inner = FakeStudy(lambda lr: abs(lr - 1e-3), False, budget)  # perplexity: lower is better
    assert inner.best_lr("LoRA") == pytest.approx(1e-3) and len(set(inner.asked)) == 3
    flat = FakeStudy(lambda lr: 0.5, True, budget)  # ties go to the smaller lr, then the grid extends down
    assert flat.best_lr("LoRA") == pytest.approx(3e-4 * 0.09)

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

    def run(self, variant, lr, seed, test=True):
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


def _record(task, tests_by_variant):
    """A study record: the sweep's seed 0 at lr 1e-3 and (only there) the seeds."""
    runs = {}
    for variant, tests in tests_by_variant.items():
        start = 1000 if variant != "LoRA" else 4000
        for seed, test in enumerate(tests):
            runs[quality.run_key(task, variant, 1e-3, seed)] = dict(
                task=task, variant=variant, lr=1e-3, seed=seed, val=test, test=test,
                trainable_start=start, trainable=start // 2 if "ASLoRA" in variant else start)
        runs[quality.run_key(task, variant, 1e-2, 0)] = dict(
            task=task, variant=variant, lr=1e-2, seed=0, val=tests[0] * 0.5 if task == "sentiment" else 1e3,
            test=0.0, trainable_start=start, trainable=start)
    return {"runs": runs, "base": {task: {"val": 0.5, "test": 0.5}}}


def test_report_splits_methods_and_ablations_and_judges_each_claim_by_the_seed_spread():
    saved = _record("sentiment", {
        "LoRA": [0.85, 0.86, 0.84],                # std 0.010
        "ShareLoRA A": [0.845, 0.85, 0.84],        # 0.005 worse: within
        "ASLoRA": [0.80, 0.81, 0.79],              # 0.050 worse: beyond
        "ASLoRA lam=1.0": [0.83, 0.84, 0.82],
    })
    text = quality.report(saved, ["sentiment"])
    methods, ablations = text.split("ASLoRA ablations")
    assert "| ShareLoRA A | 1,000 | 25.0% | 0.001: 0.845, 0.01: 0.422 | 0.001 | 0.845 ± 0.005 | 3 |" in methods
    assert "lam=1.0" not in methods
    assert "| ASLoRA lam=1.0 | merge_lam=1.0 | 1,000 -> 500 | 12.5% | 0.830 ± 0.010 | -0.030 | 3 |" in ablations
    assert "- ShareLoRA A: 0.005 worse than LoRA (std 0.010, 3 seeds) with 25.0% of its parameters: held" in text
    assert "- ASLoRA: 0.050 worse than LoRA (std 0.010, 3 seeds) with 12.5% of its parameters: did not hold" in text


def test_report_judges_perplexity_lower_is_better():
    saved = _record("shakespeare", {"LoRA": [20.0, 21.0, 19.0], "ASLoRA": [18.0, 18.5, 17.5]})
    text = quality.report(saved, ["shakespeare"])
    assert "- ASLoRA: 2.000 better than LoRA (std 1.000, 3 seeds) with 12.5% of its parameters: held" in text


def test_the_sweep_scores_the_test_split_only_at_the_chosen_lr(monkeypatch, tmp_path):
    """Sweep runs skip the test split (a third of a run's time) until their lr is chosen; an interim
    report leaves out a method whose chosen run is not scored yet."""
    scored = []

    class Scorer:
        higher_is_better = True

        def __call__(self, split, adapter_dir):
            scored.append((split, os.path.basename(os.path.dirname(os.path.dirname(adapter_dir)))))
            return 1.0 - abs(float(adapter_dir.split("-lr")[1].split("-")[0]) - 1e-3)

    monkeypatch.setattr(quality, "train", lambda *args: {"trainable": 10, "wall_seconds": 1.0, "final_loss": 0.1})
    study = quality.Study.__new__(quality.Study)
    task = quality.TASKS["sentiment"]
    study.name, study.task, study.budget, study.scorer = "sentiment", task, task.budget, Scorer()
    study.saved, study.record, study.work, study.data = {"runs": {}}, str(tmp_path / "q.json"), str(tmp_path), ""
    assert study.best_lr("LoRA") == pytest.approx(1e-3)
    assert [s for s in scored if s[0] == "test"] == [("test", "LoRA-lr0.001-seed0")]
    assert sorted(r["test"] is None for r in study.saved["runs"].values()) == [False, True, True]
    study.run("LoRA", 1e-3, 0)  # the seeds step asks again: nothing is scored twice
    assert len(scored) == 4
    study.saved["runs"][quality.run_key("sentiment", "LoRA", 1e-3, 0)]["test"] = None  # killed before scoring
    assert quality.chosen(study.saved, "sentiment", "LoRA", True) is None
    study.run("LoRA", 1e-3, 0)
    assert quality.chosen(study.saved, "sentiment", "LoRA", True)[0] == pytest.approx(1e-3) and len(scored) == 5

"""ASLoRA's schedule reaches what it promises: the final groups equal the target for runs of any
length, merges spread over the window (several per event when needed), explicit intervals kept,
and an unreachable explicit schedule refused with numbers that would work."""
import pytest

from ds_aslora import AdapterConfig
from ds_aslora.merging.schedule import MergeSchedule, ParamCounts, ScheduleError, build_schedule, final_groups

TYPES = {"q_proj": 80, "v_proj": 80}


def cfg(**kw):
    return AdapterConfig(method="aslora", **kw)


def run_to_end(schedule, num_layers, total):
    """Groups per type after every event of a run of ``total`` steps."""
    live = dict(num_layers)
    for step in range(1, total + 1):
        for m in live:
            live[m] -= min(schedule.merges_at(step), live[m] - schedule.final_groups[m])
    return live


@pytest.mark.parametrize("total", [40, 100, 3000, 100_000])
@pytest.mark.parametrize("target", [1, 5, 20, 79])
def test_defaults_reach_the_target_for_runs_of_any_length(total, target):
    schedule = build_schedule(cfg(target_groups=target), TYPES, total)
    assert run_to_end(schedule, TYPES, total) == {m: target for m in TYPES}
    steps = [s for s, _ in schedule.events]
    assert steps == sorted(set(steps)) and round(0.1 * total) < steps[0] and steps[-1] == round(0.8 * total)
    assert sum(k for _, k in schedule.events) == 80 - target


def test_every_event_makes_no_more_merges_than_it_always_can():
    """Pairs are disjoint and taken closest first: among g groups with neighbours only, an event can
    always make ceil((g - 1) / 3) merges and no more is guaranteed; a window too short for the target
    is refused (a 7-step run has 5 steps of window: enough for 79 -> 20 groups, not for one)."""
    from ds_aslora.merging.schedule import deliverable

    schedule = build_schedule(cfg(target_groups=1), TYPES, 100)
    live = 80
    for _, k in schedule.events:
        assert k <= deliverable(live, "adjacent")
        live -= k
    assert live == 1
    assert run_to_end(build_schedule(cfg(target_groups=20), TYPES, 7), TYPES, 7) == {m: 20 for m in TYPES}
    with pytest.raises(ScheduleError, match="79 merges per module type do not fit in a merge window of 5 steps"):
        build_schedule(cfg(), TYPES, 7)
    with pytest.raises(ScheduleError, match="merges_per_event=30 is more than one event can always make"):
        build_schedule(cfg(merges_per_event=30), TYPES, 1000)


def test_merges_spread_evenly_one_per_event_when_the_window_has_room():
    schedule = build_schedule(cfg(target_groups=20, merge_start=300, merge_end=2700), TYPES, 3000)
    steps = [s for s, _ in schedule.events]
    assert len(steps) == 60 and all(k == 1 for _, k in schedule.events) and steps[-1] == 2700
    gaps = {b - a for a, b in zip(steps, steps[1:], strict=False)}
    assert gaps <= {40}  # 2400 steps / 60 merges


def test_several_merges_per_event_when_the_window_is_short():
    # 15 merges in 4 steps, any two groups as candidates: an event can make half the live groups
    schedule = build_schedule(cfg(merge_start=2, merge_end=6, merge_candidates="all"), {"q_proj": 16}, 10)
    assert schedule.events == ((3, 8), (4, 4), (5, 2), (6, 1))


def test_explicit_interval_keeps_its_events_and_derives_merges_per_event():
    schedule = build_schedule(cfg(target_groups=20, merge_start=300, merge_interval=50, merge_end=3000), TYPES, 3000)
    assert [s for s, _ in schedule.events][:3] == [350, 400, 450]
    assert run_to_end(schedule, TYPES, 3000) == {m: 20 for m in TYPES}
    assert schedule.events[-1] == (1800, 2) and {k for _, k in schedule.events} == {2}  # 60 merges, 2 per event


def test_an_unreachable_explicit_schedule_is_refused_with_values_that_work():
    """The 70B example as it was: 54 events of one merge cannot take 80 groups to 20."""
    with pytest.raises(ScheduleError) as err:
        build_schedule(cfg(target_groups=20, merge_start=300, merge_interval=50, merges_per_event=1, merge_end=3000),
                       TYPES, 3000)
    assert str(err.value) == (
        "ASLoRA cannot reach 20 B groups per module type by step 3000: 54 merge events (merge_start=300, "
        "merge_interval=50, merge_end=3000) x merges_per_event=1 = 54 merges, 60 needed; merge_interval=45 or "
        "merges_per_event=2 would")
    fixed = build_schedule(cfg(target_groups=20, merge_start=300, merge_interval=45, merges_per_event=1,
                               merge_end=3000), TYPES, 3000)
    assert run_to_end(fixed, TYPES, 3000) == {m: 20 for m in TYPES}


def test_fractions_need_the_run_length_and_steps_alone_run_unbounded():
    with pytest.raises(ScheduleError, match="needs the run's length"):
        build_schedule(cfg(), TYPES, None)
    schedule = build_schedule(cfg(merge_start=2, merge_interval=3, target_groups=78), TYPES, None)
    assert not schedule.bounded and [schedule.merges_at(t) for t in range(1, 9)] == [0, 0, 0, 0, 1, 0, 0, 1]
    with pytest.raises(ScheduleError, match="must lie within the run's 100 steps"):
        build_schedule(cfg(merge_start=50, merge_end=200), TYPES, 100)


def test_target_ratio_picks_the_most_groups_within_it():
    counts = ParamCounts(fixed=1000, b_numel={"q_proj": 100, "v_proj": 100}, lora=80 * 2 * 200)
    groups = final_groups(cfg(target_ratio=0.25), TYPES, counts)
    # live(g) = 1000 + 200 g <= 0.25 x 32000 = 8000  ->  g = 35
    assert groups == {"q_proj": 35, "v_proj": 35}
    with pytest.raises(ScheduleError, match=r"target_ratio=0\.01 is below what ASLoRA can reach"):
        final_groups(cfg(target_ratio=0.01), TYPES, counts)


def test_the_schedule_survives_a_checkpoint():
    schedule = build_schedule(cfg(target_groups=5, merge_start=2, merge_end=9), TYPES, 10)
    assert MergeSchedule.from_state_dict(schedule.state_dict()) == schedule
    unbounded = build_schedule(cfg(merge_start=2, merge_interval=3), TYPES, None)
    assert MergeSchedule.from_state_dict(unbounded.state_dict()) == unbounded


# ---------------------------------------------------------------------------------------- the examples, the planner

ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))
EXAMPLES = {"llama2-13b-1x8.yaml": "llama2-13b.json", "llama2-70b-4x8.yaml": "llama2-70b.json"}


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_each_example_config_reaches_what_its_comment_promises(example):
    """The YAML as the job reads it, its schedule derived on the model's shape (meta, no weights)."""
    import os
    import re

    from ds_aslora.adapters.count import build_on_meta
    from ds_aslora.merging.schedule import model_schedule, owners_by_type, param_counts
    from ds_aslora.train.run_config import parse_run_config

    path = os.path.join(ROOT, "launch", "configs", example)
    text = open(path).read()
    promise = re.search(r"ends at (\d+) B groups per module type .*: ([\d.]+)% of LoRA's trainable parameters", text)
    assert promise, "the example states where ASLoRA ends"
    run, _ = parse_run_config(["--config", path, "--deepspeed", "ds.json"])
    model = build_on_meta(os.path.join(ROOT, "tests", "assets", "configs", EXAMPLES[example]), run.adapter)
    schedule = model_schedule(model, run.training.max_steps)
    owners, counts = owners_by_type(model), param_counts(model)
    assert run_to_end(schedule, owners, run.training.max_steps) == {m: int(promise[1]) for m in owners}
    assert f"{100 * counts.live(schedule.final_groups) / counts.lora:.1f}" == promise[2]


def test_the_planner_prints_the_end_state_the_job_reaches(capsys):
    import os
    import sys

    sys.path.insert(0, os.path.join(ROOT, "launch"))
    from plan import main as plan_main

    argv = ["--model-config", os.path.join(ROOT, "tests", "assets", "configs", "llama2-70b.json"), "--method",
            "aslora", "--r", "64", "--targets", "all-linear", "--target_groups", "20", "--max_steps", "3000"]
    plan_main(argv)
    out = capsys.readouterr().out
    assert "aslora at the end of the run, after 60 merges per module type (20 B groups)" in out
    assert ("ASLoRA schedule: 60 merge events from step 335 to 2400 (1 merge per module type at each, 420 in all), "
            "ending at 20 B groups per module type, 112,459,776 trainable = 13.6% of LoRA's in 3000 steps") in out
    with pytest.raises(SystemExit, match="ASLoRA cannot reach 20 B groups per module type by step 2400"):
        plan_main(argv + ["--merge_start", "300", "--merge_interval", "50", "--merges_per_event", "1"])


def test_resuming_compares_the_adapters_not_the_window_and_an_old_checkpoint_still_fits():
    from ds_aslora.runtime.checkpoint import comparable_adapter

    old = {k: v for k, v in cfg().to_dict().items() if k not in ("merge_end", "target_ratio")}
    old.update(method="lora", merge_start=100, merge_interval=100, merges_per_event=1)  # saved before the window
    assert comparable_adapter(old) == comparable_adapter(AdapterConfig().to_dict())
    assert comparable_adapter({**old, "r": 16}) != comparable_adapter(AdapterConfig().to_dict())


def test_a_resume_that_would_end_before_the_saved_schedule_is_refused():
    from types import SimpleNamespace

    from ds_aslora import MergePolicy
    from ds_aslora.train.job import check_schedule_fits
    from ds_aslora.train.run_config import ConfigError

    merger = SimpleNamespace(policy=MergePolicy(cfg(target_groups=20), TYPES, 3000))
    check_schedule_fits(merger, 2400)
    with pytest.raises(ConfigError, match=r"until step 2400, after max_steps=2000: resume with max_steps >= 2400"):
        check_schedule_fits(merger, 2000)


def test_merge_start_and_end_read_integers_as_steps_and_floats_as_fractions(tmp_path):
    from ds_aslora.train.run_config import parse_run_config

    path = tmp_path / "run.yaml"
    path.write_text("method: aslora\nmerge_start: 1e3\nmerge_end: 0.9\n")  # YAML reads 1e3 as a string
    run, _ = parse_run_config(["--config", str(path), "--deepspeed", "ds.json"])
    assert (run.adapter.merge_start, run.adapter.merge_end) == (1000, 0.9) and isinstance(run.adapter.merge_start, int)
    run, _ = parse_run_config(["--method", "aslora", "--merge_start", "300", "--merge_end", "1.0", "--deepspeed", "x"])
    assert (run.adapter.merge_start, run.adapter.merge_end) == (300, 1.0) and isinstance(run.adapter.merge_end, float)


def test_static_grouping_is_the_target_in_contiguous_blocks_from_the_start():
    from ds_aslora.merging.policy import MergePolicy
    from ds_aslora.merging.schedule import contiguous_blocks

    assert contiguous_blocks(10, 3) == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    policy = MergePolicy(cfg(target_groups=7, merge_grouping="static"), {"q_proj": 30, "v_proj": 30}, 100)
    blocks = policy.groups["q_proj"]
    assert [len(b) for b in blocks] == [5, 5, 4, 4, 4, 4, 4] and sum(blocks, ()) == tuple(range(30))
    assert policy.tie_map("v_proj")[:11] == [4] * 5 + [9] * 5 + [13]
    assert not any(policy.due(step) for step in range(1, 101))  # no events, whatever the window says
    schedule = policy.schedule
    assert schedule.static and schedule.final_groups == {"q_proj": 7, "v_proj": 7}
    assert "static grouping: 7 blocks of contiguous layers" in schedule.describe(policy.num_layers)
    assert MergeSchedule.from_state_dict(schedule.state_dict()) == schedule

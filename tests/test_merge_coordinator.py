"""MergeCoordinator on real ranks equals LocalMerger, the single-process PyTorch reference.

A tiny LLaMA whose down_proj has 33 outputs, so ZeRO-3 slices cut B rows on 2 and 4 ranks
(the effective distance's hard case). Several merge events; after each one the plan, every
per-layer adapter's fp32 value and both Adam moments must match the reference within 1e-5,
on world sizes 1, 2, 4 and ZeRO stages 0-3.
"""
import time

import pytest
import torch
from conftest import adam_atol, tiny_model, tokens
from multirank import run_ranks, train_steps
from test_zero_parity import ds_config as parity_config

from ds_aslora import AdapterConfig, LocalMerger, count_trainable, inject_adapters

STEPS, MICRO, LR = 8, 2, 1e-2
SHAPE = dict(hidden_size=33, head_dim=8, num_attention_heads=3, num_key_value_heads=1)
OPTIONS = {  # events at steps 4, 6, 8 (3 merges per module type)
    "raw-adjacent": dict(),
    "effective-all": dict(merge_distance="effective", merge_candidates="all", merges_per_event=2),
    "static": dict(merge_grouping="static"),  # one block of 4 layers per module type, no events
}


def adapted(options):
    cfg = AdapterConfig(method="aslora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        merge_start=2, merge_interval=2, merge_count=3, merge_lam=0.75, **OPTIONS[options])
    model = inject_adapters(tiny_model(**SHAPE), cfg)
    with torch.no_grad():  # distinct non-zero B per layer, so distances differ from step 1
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name) * 7)) * 0.05)
    return model


def batch(step, world, ga=1):
    return tokens(batch=world * ga * MICRO, length=10, seed=200 + step)


def plan_key(plan):
    return [(m.module_type, m.upper, m.lower, m.step) for m in plan]


def distances(plan):
    return torch.tensor([m.distance for m in plan], dtype=torch.float64)


def reference(options, world, ga=1, clip=0.0):
    model = adapted(options)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    merger = LocalMerger(model, opt)
    events = {}
    for step in range(1, STEPS + 1):
        ids = batch(step, world, ga)
        model(ids, labels=ids).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
        opt.zero_grad()
        plan = merger.after_step(step)
        if plan:
            events[step] = (plan_key(plan), distances(plan), {
                n: (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
                for n, p in model.named_parameters() if p.requires_grad and "shared_bank" not in n})
    return events, count_trainable(model)


def ds_config(stage, world, ga=1, offload=False, clip=0.0):
    """The parity tests' config (same micro batch, lr, AdamW) with merge-test options."""
    config = parity_config(stage, ga, world)
    # ZeRO-3: no prefetching, so nothing but the fetch logic itself makes a B resident
    config["zero_optimization"]["stage3_prefetch_bucket_size"] = 0
    if offload:  # fp32 master, moments and parameters on the CPU (torch AdamW: no op build)
        config["zero_optimization"].update(offload_optimizer={"device": "cpu", "pin_memory": False},
                                           offload_param={"device": "cpu", "pin_memory": False})
        config["zero_force_ds_cpu_optimizer"] = False
    return {**config, "gradient_clipping": clip}


def full_state(engine):
    """Every per-layer adapter's fp32 value and Adam moments, gathered (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if engine.zero_optimization_stage() == 0:
            state = engine.optimizer.state[p]
            out[name] = (p.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone())
        else:
            out[name] = tuple(t.clone() for t in (safe_get_full_fp32_param(p),
                                                  safe_get_full_optimizer_state(p, "exp_avg"),
                                                  safe_get_full_optimizer_state(p, "exp_avg_sq")))
    return out


def train(engine, bank, merger, world, steps, ga=1, on_event=None):
    return train_steps(engine, steps, lambda step: batch(step, world, ga), MICRO, bank=bank, merger=merger,
                       on_event=on_event)


def coordinated(rank, options, stage, ga, offload=False, shared_mode="replicated", clip=0.0):
    import deepspeed.comm as dist

    from ds_aslora.merging.coordinator import MergeCoordinator
    from ds_aslora.runtime.engine import initialize

    world = dist.get_world_size()
    engine, bank = initialize(adapted(options), ds_config(stage, world, ga, offload, clip), shared_mode)
    merger = MergeCoordinator(engine)
    events, accounting = {}, {}

    def record(step, plan):
        events[step] = (plan_key(plan), distances(plan), full_state(engine))
        accounting[step] = merger.accounting()

    losses = train(engine, bank, merger, world, range(1, STEPS + 1), ga, on_event=record)
    return events, accounting, end_state(engine, bank, merger, losses)


def end_state(engine, bank, merger, losses):
    """(losses, every adapter's fp32 value and Adam moments and the bank's tensors, merge history) at the
    end of a run: what a resumed run must reproduce (test_checkpoint). A collective."""
    state = full_state(engine)
    if bank:
        state.update({k: bank.bank.get(k).detach().clone() for k in bank.bank.keys()})
    history = [(m.module_type, m.upper, m.lower, m.step, m.distance) for m in merger.policy.history]
    return losses, state, history


_RAW_ADJACENT = {}


def raw_adjacent(stage, world):
    """Every rank's result of the 8-step raw-adjacent run on ``stage`` and ``world`` (ga 1), run once per
    session: test_checkpoint's resumed runs must end where this uninterrupted one does. Read-only."""
    if (stage, world) not in _RAW_ADJACENT:
        _RAW_ADJACENT[stage, world] = run_ranks(coordinated, world, "raw-adjacent", stage, 1)
    return _RAW_ADJACENT[stage, world]


R, D_IN, D_OUT = 4, {"q_proj": 33, "v_proj": 33, "down_proj": 64}, {"q_proj": 24, "v_proj": 8, "down_proj": 33}


def formula(live_groups):
    """methods.md 1.4: one A per module type plus g_m live B groups of r x d_out."""
    return sum(R * D_IN[m] + g * R * D_OUT[m] for m, g in live_groups.items())


def assert_same_events(events, expected):
    assert events.keys() == expected.keys()
    for step, (plan, dists, state) in expected.items():
        assert events[step][0] == plan, f"plan at step {step}"
        torch.testing.assert_close(events[step][1], dists, rtol=1e-6, atol=0)  # float64 sums, other order
        assert_same_state(events[step][2], state, f"step {step}")


def assert_same_state(state, expected, where):
    for name, tensors in expected.items():
        for what, got, want in zip(("value", "exp_avg", "exp_avg_sq"), state[name], tensors, strict=True):
            # moments: the same 1e-3 fraction, of their own scale (a wrong blend or a missed zeroing is O(1))
            atol = adam_atol(LR, STEPS) if what == "value" else 1e-3 * float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=f"{where} {name} {what}")


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_merges_match_the_single_process_reference(stage, world):
    expected, trainable = reference("raw-adjacent", world)
    assert sorted(expected) == [4, 6, 8]
    for events, accounting, _ in raw_adjacent(stage, world):
        assert_same_events(events, expected)
        live = {step: acc["live_groups"] for step, acc in accounting.items()}
        assert live == {4: dict.fromkeys(D_IN, 3), 6: dict.fromkeys(D_IN, 2), 8: dict.fromkeys(D_IN, 1)}
        for acc in accounting.values():
            assert acc["trainable"] == formula(acc["live_groups"])
        assert accounting[8]["trainable"] == trainable == 780


@pytest.mark.slow
@pytest.mark.parametrize("stage, world, ga, offload, shared_mode", [
    (3, 4, 1, False, "replicated"), (2, 2, 2, False, "replicated"), (3, 2, 1, True, "replicated"),
    (1, 4, 1, False, "replicated"), (2, 2, 1, True, "replicated"),
    (3, 2, 1, False, "engine"),  # the shared A partitioned inside the engine: gathered for the distance
])
def test_effective_distance_and_all_pairs_on_sliced_rows(stage, world, ga, offload, shared_mode):
    expected, _ = reference("effective-all", world, ga)
    assert {s: len(plan) for s, (plan, *_) in expected.items()} == {4: 6, 6: 3}  # 2 then 1 per module type
    for events, *_ in run_ranks(coordinated, world, "effective-all", stage, ga, offload, shared_mode):
        assert_same_events(events, expected)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_merges_under_joint_gradient_clipping(stage):
    # Clipping binds at every step (grad norms 0.21-0.33); retired B must add nothing to the norm
    # (ZeRO-3 would add its stale last gradient) and the shared A is clipped jointly (engine mode).
    expected, _ = reference("raw-adjacent", 2, clip=0.02)
    for events, *_ in run_ranks(coordinated, 2, "raw-adjacent", stage, 1, False, "engine", 0.02):
        assert_same_events(events, expected)


def static_reference(world):
    model = adapted("static")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    merger = LocalMerger(model, opt)
    losses = []
    for step in range(1, STEPS + 1):
        ids = batch(step, world)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert merger.after_step(step) == []
        losses.append(loss.item())
    state = {n: (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
             for n, p in model.named_parameters() if p.requires_grad and "shared_bank" not in n}
    return losses, state, count_trainable(model)


def static_ranks(rank, stage):
    import deepspeed.comm as dist

    from ds_aslora.merging.coordinator import MergeCoordinator
    from ds_aslora.runtime.engine import initialize

    world = dist.get_world_size()
    engine, bank = initialize(adapted("static"), ds_config(stage, world))
    merger = MergeCoordinator(engine)
    events = []
    losses = train(engine, bank, merger, world, range(1, STEPS + 1), on_event=lambda step, _: events.append(step))
    return losses, events, full_state(engine), merger.accounting()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_static_grouping_trains_its_blocks_like_the_reference(stage):
    losses, state, trainable = static_reference(2)
    assert trainable == formula(dict.fromkeys(D_IN, 1))
    for got_losses, events, got_state, accounting in run_ranks(static_ranks, 2, stage):
        assert events == [] and got_losses == pytest.approx(losses, rel=1e-5)
        assert_same_state(got_state, state, f"after {STEPS} steps")
        assert accounting["live_groups"] == dict.fromkeys(D_IN, 1) and accounting["trainable"] == trainable


def disagreeing(rank, stage):
    import deepspeed.comm as dist

    from ds_aslora.merging.coordinator import MergeCoordinator, MergeDisagreement
    from ds_aslora.runtime.engine import initialize

    world = dist.get_world_size()
    engine, bank = initialize(adapted("raw-adjacent"), ds_config(stage, world))
    drop_last = (lambda plan: plan[:-1]) if rank == world - 1 else None  # one rank's plan differs
    merger = MergeCoordinator(engine, perturb_plan=drop_last)
    start = time.monotonic()
    with pytest.raises(MergeDisagreement) as info:
        train(engine, bank, merger, world, range(1, STEPS + 1))
    return str(info.value), time.monotonic() - start, engine.global_steps, merger.policy.live_groups()


@pytest.mark.slow
@pytest.mark.parametrize("stage, world", [(3, 2), (1, 4)])
def test_a_disagreeing_rank_makes_every_rank_fail_alike(stage, world):
    results = run_ranks(disagreeing, world, stage, timeout=120)
    messages = {message for message, *_ in results}
    assert len(messages) == 1 and "plans differ across ranks at step 4" in messages.pop()
    for _, seconds, step, live in results:
        assert seconds < 30 and step == 4  # four short steps, then the check: no hang
        assert live == {"q_proj": 4, "v_proj": 4, "down_proj": 4}  # nothing was applied


def bf16_merge(rank, stage):
    import deepspeed.comm as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from ds_aslora.merging.coordinator import MergeCoordinator
    from ds_aslora.runtime.engine import initialize

    world = dist.get_world_size()
    config = {**ds_config(stage, world), "bf16": {"enabled": True}}
    engine, bank = initialize(adapted("raw-adjacent").to(torch.bfloat16), config)
    merger = MergeCoordinator(engine)
    plans = []
    train(engine, bank, merger, world, range(1, 5), on_event=lambda step, plan: plans.append(plan_key(plan)))
    stale = []  # the forward must read bf16(fp32 master) right after the merge, on every rank
    for name, p in engine.module.named_parameters():
        if p.requires_grad and name.endswith("lora_B"):
            if not torch.equal(p.detach(), safe_get_full_fp32_param(p).to(torch.bfloat16)):
                stale.append(name)
    return plans, stale


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_working_copy_is_refreshed_after_a_merge(stage):
    results = run_ranks(bf16_merge, 2, stage)
    for plans, stale in results:
        assert len(plans) == 1 and len(plans[0]) == 3 and stale == []


def refused_engines(rank):
    from ds_aslora.merging.coordinator import MergeCoordinator
    from ds_aslora.runtime.engine import initialize

    engine, _ = initialize(adapted("raw-adjacent").to(torch.bfloat16), {**ds_config(0, 1), "bf16": {"enabled": True}})
    with pytest.raises(ValueError, match="stage 1-3") as half:
        MergeCoordinator(engine)
    shared = inject_adapters(tiny_model(**SHAPE), AdapterConfig(method="sharelora", target_modules=["q_proj"]))
    engine, _ = initialize(shared, ds_config(2, 1))
    with pytest.raises(ValueError, match="aslora") as method:
        MergeCoordinator(engine)
    return str(half.value), str(method.value)


@pytest.mark.slow
def test_half_precision_stage0_and_other_methods_are_refused_before_training():
    ((half, method),) = run_ranks(refused_engines, 1)
    assert "no per-parameter state" in half and "'sharelora'" in method


def monitored(rank, out_dir):
    from ds_aslora.merging.coordinator import MergeCoordinator
    from ds_aslora.runtime.engine import initialize

    config = {**ds_config(2, 1), "tensorboard": {"enabled": True, "output_path": out_dir, "job_name": "aslora"}}
    engine, bank = initialize(adapted("raw-adjacent"), config)
    merger = MergeCoordinator(engine)
    train(engine, bank, merger, 1, range(1, STEPS + 1))
    engine.monitor.tb_monitor.summary_writer.flush()
    return merger.accounting()["trainable"]


@pytest.mark.slow
def test_merge_events_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (trainable,) = run_ranks(monitored, 1, str(tmp_path))
    events = EventAccumulator(str(tmp_path / "aslora")).Reload()
    groups = events.Scalars("Train/ASLoRA/live_B_groups")
    assert [e.step for e in groups] == [4 * MICRO, 6 * MICRO, 8 * MICRO]  # x axis: samples, as DeepSpeed's
    assert [e.value for e in groups] == [9, 6, 3]
    assert events.Scalars("Train/ASLoRA/trainable_params")[-1].value == trainable


class SkippingEngine:
    """The slice of a DeepSpeed engine the coordinator reads: ZeRO-0, a torch optimizer, and
    optimizer steps that can be skipped (as fp16 overflow does: the step count still moves)."""

    def __init__(self, module):
        self.module, self.device, self.global_steps, self.applied = module, torch.device("cpu"), 0, False
        self.optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=LR)

    def zero_optimization_stage(self):
        return 0

    def was_step_applied(self):
        return self.applied

    def step(self, ids, apply):
        self.module(ids, labels=ids).loss.backward()
        if apply:
            self.optimizer.step()
        self.optimizer.zero_grad()
        self.global_steps, self.applied = self.global_steps + 1, apply


def test_an_event_on_a_skipped_step_runs_at_the_next_applied_step():
    from ds_aslora.merging.coordinator import MergeCoordinator

    engine = SkippingEngine(adapted("raw-adjacent"))
    merger = MergeCoordinator(engine)  # no process group: a world of one
    merged_at = {}
    for step in range(1, STEPS + 1):
        engine.step(batch(step, 1), apply=step != 4)  # step 4, an event, is skipped
        plan = merger.after_step()
        merger.after_step()  # a second call in the same step does nothing
        if plan:
            merged_at[step] = {m.step for m in plan}
    assert merged_at == {5: {5}, 6: {6}, 8: {8}} and merger.observations == STEPS - 1

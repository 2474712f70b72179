"""ASLoRA merge policy: schedule, candidates, choice, tie map, with planted distances."""
import pytest
import torch

from ds_aslora import AdapterConfig, MergePolicy
from ds_aslora.merging.policy import blend, squared_distances, update_running_means


def policy(n=6, total_steps=None, **kw):
    return MergePolicy(AdapterConfig(method="aslora", **kw), {"q_proj": n}, total_steps)


def planted(values):
    """Squared distances between scalars placed on a line (|v_i - v_j|^2)."""
    v = torch.tensor(values, dtype=torch.float64)
    return (v[:, None] - v[None, :]) ** 2


def test_events_start_after_merge_start_and_repeat_every_interval():
    p = policy(merge_start=10, merge_interval=5)
    assert [t for t in range(1, 31) if p.is_event(t)] == [15, 20, 25, 30]


def test_adjacent_merge_takes_the_closest_neighbours_and_keeps_the_upper_representative():
    p = policy(merge_start=0, merge_interval=1)
    plan = p.plan(1, {"q_proj": planted([0.0, 5.0, 5.2, 9.0, 20.0, 21.0])})
    assert [(m.lower, m.upper) for m in plan] == [((1,), (2,))]
    assert plan[0].distance == pytest.approx(0.2)
    p.apply(plan)
    assert p.tie_map("q_proj") == [0, 2, 2, 3, 4, 5]
    assert p.representatives("q_proj") == [0, 2, 3, 4, 5]


def test_all_pairs_can_merge_non_neighbours_but_adjacent_cannot():
    d = {"q_proj": planted([0.0, 10.0, 0.1, 30.0])}
    assert [(m.lower, m.upper) for m in policy(4, merge_candidates="all").plan(1, d, 1)] == [((0,), (2,))]
    assert [(m.lower, m.upper) for m in policy(4).plan(1, d, 1)] == [((1,), (2,))]


def test_several_merges_per_event_use_disjoint_groups():
    p = policy(6)
    plan = p.plan(1, {"q_proj": planted([0.0, 0.1, 0.13, 0.2, 8.0, 9.0])}, 2)  # two merges due
    # (1,2) is closest; (2,3) and (0,1) come next but reuse group 1 or 2, so (4,5) follows
    assert [(m.lower, m.upper) for m in plan] == [((1,), (2,)), ((4,), (5,))]


def test_equal_distances_break_towards_lower_layers():
    plan = policy(4).plan(1, {"q_proj": planted([0.0, 1.0, 2.0, 3.0])}, 1)
    assert (plan[0].lower, plan[0].upper) == ((0,), (1,))


def test_merges_stop_at_merge_count_or_target_groups():
    for kw, left in (({"merge_count": 2}, 4), ({"target_groups": 3}, 3), ({}, 1)):
        p = policy(6, merge_start=0, merge_interval=1, **kw)
        step = 0
        while p.is_event(step + 1):
            step += 1
            reps = p.representatives("q_proj")
            p.apply(p.plan(step, {"q_proj": planted([float(r) for r in reps])}))
        assert p.live_groups() == {"q_proj": left}
        assert p.merges_left("q_proj") == 0


def test_groups_grow_as_contiguous_blocks_and_state_round_trips():
    p = policy(6, merge_start=0, merge_end=3, target_groups=3, total_steps=3)
    for step, values in enumerate(([0, 1, 1.1, 5, 6, 9], [0, 5, 5.5, 8, 20], [0, 5.5, 6, 20]), start=1):
        p.apply(p.plan(step, {"q_proj": planted(values)}, 1))
    assert p.groups["q_proj"] == [(0,), (1, 2, 3, 4), (5,)]
    assert p.tie_map("q_proj") == [0, 4, 4, 4, 4, 5]
    assert p.schedule.events == ((1, 1), (2, 1), (3, 1))  # 3 merges down to 3 groups, spread over steps 1-3
    q = policy(6, total_steps=1000)  # a resumed run keeps the schedule it started with
    q.load_state_dict(p.state_dict())
    assert q.groups == p.groups and q.history == p.history and q.schedule == p.schedule


def test_plan_rejects_a_wrong_or_non_finite_matrix():
    with pytest.raises(ValueError, match="3x3"):
        policy(3).plan(1, {"q_proj": torch.zeros(2, 2)}, 1)
    with pytest.raises(ValueError, match="finite"):
        policy(2).plan(1, {"q_proj": torch.tensor([[0.0, float("nan")], [float("nan"), 0.0]])}, 1)


def test_running_mean_and_blend_arithmetic():
    means = [torch.zeros(2), torch.zeros(3, dtype=torch.float64)]
    for t, v in enumerate([1.0, 2.0, 6.0], start=1):
        update_running_means(means, [torch.full((2,), v), torch.full((3,), -v, dtype=torch.bfloat16)], t)
    torch.testing.assert_close(means[0], torch.full((2,), 3.0))
    torch.testing.assert_close(means[1], torch.full((3,), -3.0, dtype=torch.float64))
    torch.testing.assert_close(blend(torch.tensor(4.0), torch.tensor(0.0), 0.75), torch.tensor(3.0))


def test_effective_distance_is_gauge_invariant_and_raw_is_not():
    torch.manual_seed(0)
    A = torch.randn(3, 8, dtype=torch.float64)
    Bs = [torch.randn(5, 3, dtype=torch.float64) for _ in range(3)]
    Q = torch.randn(3, 3, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    A2, Bs2 = torch.linalg.solve(Q, A), [B @ Q for B in Bs]  # same B A products
    eff = squared_distances(Bs, A @ A.T)
    torch.testing.assert_close(eff, squared_distances(Bs2, A2 @ A2.T))
    torch.testing.assert_close(eff[0, 1], ((Bs[0] - Bs[1]) @ A).pow(2).sum())
    assert not torch.allclose(squared_distances(Bs), squared_distances(Bs2))


def test_distances_from_row_blocks_sum_to_the_full_matrix():
    torch.manual_seed(1)
    Bs = [torch.randn(6, 2) for _ in range(4)]
    parts = sum(squared_distances([B[rows] for B in Bs]) for rows in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(parts, squared_distances(Bs))

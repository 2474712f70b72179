"""LocalMerger on a tiny LLaMA with torch AdamW, checked against values recomputed here."""
import copy

import pytest
import torch
from conftest import tiny_model, tokens
from test_methods import folded_reference

from ds_aslora import AdapterConfig, LocalMerger, count_after_merges, count_trainable, inject_adapters
from ds_aslora.merging.merger import layers_by_type


def train_until_event(merge_distance="raw", lam=0.75):
    cfg = AdapterConfig(method="aslora", r=4, alpha=8, target_modules=["q_proj", "v_proj"], merge_start=3,
                        merge_interval=2, merge_count=2, merge_lam=lam, merge_distance=merge_distance)
    base = tiny_model()
    model = inject_adapters(copy.deepcopy(base), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    merger = LocalMerger(model, opt)
    history = {m: [[] for _ in ls] for m, ls in merger.layers.items()}
    ids = tokens(batch=4, length=16)
    for step in range(1, 5):
        optimizer_step(model, opt, ids, merger, history)
        assert merger.after_step(step) == []  # first event is step 5
    return base, model, opt, merger, history, ids


def optimizer_step(model, opt, ids, merger, history):
    """One AdamW step; records every layer's own B afterwards (the running-mean input)."""
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    for m, layers in merger.layers.items():
        for i, layer in enumerate(layers):
            history[m][i].append(layer.lora_B.detach().clone())


def test_first_event_merges_the_closest_running_means_and_blends_value_and_moments():
    base, model, opt, merger, history, ids = train_until_event()
    optimizer_step(model, opt, ids, merger, history)  # step 5: (5 - 3) % 2 == 0, an event
    snap = {m: [(lay.lora_B.detach().clone(), {k: v.clone() for k, v in opt.state[lay.lora_B].items()})
                for lay in ls] for m, ls in merger.layers.items()}
    plan = merger.after_step(5)
    assert [m.module_type for m in plan] == ["q_proj", "v_proj"]
    for merge in plan:
        means = [torch.stack(h).mean(0) for h in history[merge.module_type]]
        dists = [(means[i] - means[i + 1]).norm().item() for i in range(len(means) - 1)]
        lo = min(range(len(dists)), key=dists.__getitem__)
        assert (merge.lower, merge.upper) == ((lo,), (lo + 1,))
        assert merge.distance == pytest.approx(dists[lo], rel=1e-5)
        layers = merger.layers[merge.module_type]
        (b_up, s_up), (b_lo, s_lo) = snap[merge.module_type][lo + 1], snap[merge.module_type][lo]
        torch.testing.assert_close(layers[lo + 1].lora_B, 0.75 * b_up + 0.25 * b_lo)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[layers[lo + 1].lora_B][key], 0.75 * s_up[key] + 0.25 * s_lo[key])
            assert torch.count_nonzero(opt.state[layers[lo].lora_B][key]) == 0
        assert layers[lo].tied_to is layers[lo + 1] and layers[lo].weight_B is layers[lo + 1].lora_B
        torch.testing.assert_close(merger.means[merge.module_type][lo + 1], 0.75 * means[lo + 1] + 0.25 * means[lo])
    # the tied model computes what its folded weights say, and counts only live groups
    torch.testing.assert_close(model(ids).logits, folded_reference(base, model)(ids).logits, rtol=1e-5, atol=1e-5)
    unmerged = count_after_merges(model, 0) + sum(4 * o for o in (32, 16))  # + retired q and v groups
    assert count_trainable(model) == unmerged - 4 * (32 + 16)


def test_tied_layers_train_their_representative_and_stop_at_merge_count():
    base, model, opt, merger, history, ids = train_until_event()
    for step in range(5, 12):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        merger.after_step(step)
    assert merger.policy.live_groups() == {"q_proj": 2, "v_proj": 2}
    assert len(merger.policy.history) == 4
    r = 4
    assert count_trainable(model) == r * 32 * 2 + 2 * r * 32 + 2 * r * 16  # A_q, A_v + 2 live groups each
    # a retired B gets an exact zero gradient and has zeroed moments: only weight decay moves it
    retired = [lay for ls in merger.layers.values() for lay in ls if lay.is_tied]
    frozen = [lay.lora_B.detach().clone() for lay in retired]
    model(ids, labels=ids).loss.backward()
    assert all(lay.lora_B.grad is not None and torch.count_nonzero(lay.lora_B.grad) == 0 for lay in retired)
    opt.step()
    lr, wd = opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]
    for layer, before in zip(retired, frozen, strict=True):
        torch.testing.assert_close(layer.lora_B.detach(), before * (1 - lr * wd), rtol=1e-6, atol=0)


def test_effective_distance_uses_the_shared_A():
    *_, merger, history, _ = train_until_event(merge_distance="effective")
    A = merger.layers["q_proj"][0].weight_A.detach()
    means = [merger.means["q_proj"][i] for i in merger.policy.representatives("q_proj")]
    want = ((means[0] - means[1]).double() @ A.double()).pow(2).sum()
    torch.testing.assert_close(merger.distances()["q_proj"][0, 1], want)


def test_state_round_trip_restores_ties_and_means():
    *_, merger, _, ids = train_until_event()
    model2 = inject_adapters(tiny_model(), copy.deepcopy(merger.cfg))
    merger.after_step(5)
    other = LocalMerger(model2)
    other.load_state_dict(merger.state_dict())
    tied = lambda mg: [[lay.tied_to is not None for lay in ls] for ls in mg.layers.values()]  # noqa: E731
    assert tied(other) == tied(merger) and any(any(t) for t in tied(other))
    for m in merger.means:
        assert merger.means[m].keys() == other.means[m].keys()


def test_merger_needs_aslora():
    with pytest.raises(ValueError, match="aslora"):
        LocalMerger(inject_adapters(tiny_model(), AdapterConfig(method="sharelora")))
    assert layers_by_type(inject_adapters(tiny_model(), AdapterConfig(method="sharelora", share="B"))) == {}


def test_static_grouping_ties_contiguous_blocks_from_the_first_step_and_never_merges():
    cfg = AdapterConfig(method="aslora", r=4, alpha=8, target_modules=["q_proj", "v_proj"], target_groups=1,
                        merge_grouping="static")
    base = tiny_model()
    model = inject_adapters(copy.deepcopy(base), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    merger = LocalMerger(model, opt, total_steps=6)
    ids = tokens(batch=4, length=16)
    for step in range(1, 7):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        assert merger.after_step(step) == []
    for layers in merger.layers.values():  # one block: every layer computes with the top layer's B
        top = layers[-1]
        assert all(layer.weight_B is top.lora_B for layer in layers) and torch.count_nonzero(top.lora_B) > 0
        assert all(torch.count_nonzero(layer.lora_B) == 0 for layer in layers[:-1])  # never trained
    torch.testing.assert_close(model(ids).logits, folded_reference(base, model)(ids).logits, rtol=1e-5, atol=1e-5)
    assert count_trainable(model) == 4 * 32 * 2 + 4 * 32 + 4 * 16  # A_q, A_v + one B group each

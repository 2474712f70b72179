"""Sibling adapter layers (q/k/v, gate/up) compute their projections x @ A^T once per input.

The reference is the same model with each layer computing its own (``link_siblings(False)``):
outputs and gradients agree to fp32 rounding (one GEMM with the A's side by side sums in another
order than three; K = hidden = 32 here, so the error is ~1e-6 of the values), the number of
projection matmuls drops to one per input, and nothing changes where the reuse must not apply.
"""
import copy

import pytest
import torch
from conftest import logits_and_grads, randomize_adapters, tiny_model, tokens
from peft import LoraConfig, get_peft_model

import ds_aslora.adapters.siblings as siblings_module
from ds_aslora import AdapterConfig, adapter_layers, inject_adapters
from ds_aslora.adapters.inject import link_siblings

TOL = dict(rtol=1e-5, atol=1e-6)
METHODS = {
    "lora": dict(method="lora"),
    "shareA": dict(method="sharelora", share="A"),
    "shareA-qkv": dict(method="sharelora", share="A", scope="qkv"),
    "shareB": dict(method="sharelora", share="B"),
    "shareAB-qkv": dict(method="sharelora", share="AB", scope="qkv"),  # one B for q, k, v: no GQA (below)
    "aslora": dict(method="aslora"),
    "aslora-in_dim": dict(method="aslora", a_scope="in_dim"),
}


def pair(method: str, **model_overrides):
    """(reuse on, reuse off) copies of one randomised all-linear adapter model."""
    if METHODS[method].get("share") == "AB":
        model_overrides.setdefault("num_key_value_heads", 4)
    ours = inject_adapters(tiny_model(**model_overrides), AdapterConfig(r=4, **METHODS[method]))
    randomize_adapters(ours)
    ref = copy.deepcopy(ours)
    link_siblings(ref, enabled=False)
    return ours, ref


run = logits_and_grads


def assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], **TOL)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], **TOL, msg=name)


@pytest.fixture
def projections(monkeypatch):
    """Counts the joint projection matmuls of a forward (the first layer called on an input leads)."""
    calls = []
    real = siblings_module._project
    monkeypatch.setattr(siblings_module, "_project", lambda x, members, factors, dtype: calls.append(len(factors))
                        or real(x, members, factors, dtype))
    return calls


@pytest.mark.parametrize("method", METHODS)
def test_outputs_and_gradients_equal_each_layer_computing_its_own(method, projections):
    ours, ref = pair(method)
    ids = tokens()
    want = run(ref, ids)
    for _ in range(2):
        projections.clear()
        assert_same(run(ours, ids), want)
    # per decoder layer: q leads k and v, gate leads up; o and down have no siblings (each its own input)
    assert projections == [3, 2] * ours.config.num_hidden_layers, projections


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("method", ["lora", "aslora-in_dim"])
def test_activation_checkpointing_recompute_gives_the_same_gradients(method, reentrant):
    ours, ref = pair(method)
    for model in (ours, ref):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        if reentrant:
            model.enable_input_require_grads()  # reentrant checkpointing needs an input with grad
    ids = tokens()
    want = run(ref, ids)
    for _ in range(2):
        assert_same(run(ours, ids), want)


def test_lora_with_reuse_matches_peft():
    ours, _ = pair("lora")
    ref = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    peft_params = dict(ref.named_parameters())
    with torch.no_grad():
        for path, layer in adapter_layers(ours):
            for key in ("lora_A", "lora_B"):
                peft_params[f"base_model.model.{path}.{key}.default.weight"].copy_(getattr(layer, key))
    ids = tokens()
    want_logits = ref(ids, labels=ids)
    want_logits.loss.backward()
    run(ours, ids)
    got = run(ours, ids)  # the second forward: the reuse on
    torch.testing.assert_close(got[0], want_logits.logits.detach(), **TOL)
    for path, _ in adapter_layers(ours):
        for key in ("lora_A", "lora_B"):
            torch.testing.assert_close(got[1][f"{path}.{key}"],
                                       peft_params[f"base_model.model.{path}.{key}.default.weight"].grad, **TOL)


def test_active_dropout_draws_its_own_mask_per_layer(projections):
    ours = inject_adapters(tiny_model(), AdapterConfig(r=4, dropout=0.3))
    randomize_adapters(ours)
    ref = copy.deepcopy(ours)
    link_siblings(ref, enabled=False)
    ours.train(), ref.train()
    ids = tokens()
    for _ in range(2):
        torch.manual_seed(5)
        got = run(ours, ids)
        torch.manual_seed(5)
        want = run(ref, ids)
        assert torch.equal(got[0], want[0])  # the same masks in the same order: bitwise
    assert projections == []
    ours.eval()  # no dropout in eval: the reuse is back
    with torch.no_grad():
        ours(ids), ours(ids)
    assert 3 in projections


def test_half_precision_base_casts_the_input_once_for_all_siblings(projections):
    ours, ref = pair("aslora")
    ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    for model in (ours, ref):  # the base in bf16, adapters back to fp32 (peft's autocast_adapter_dtype)
        for _, layer in adapter_layers(model):
            layer.float()
            layer.base_layer.to(torch.bfloat16)
        model.shared_bank.float()
    ids = tokens()
    want = run(ref, ids)
    run(ours, ids)
    projections.clear()
    got = run(ours, ids)
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=0, atol=0.05)  # bf16 logits: 2^-8 relative
    assert 3 in projections and 2 in projections


def test_a_model_copied_mid_forward_state_starts_clean():
    ours, _ = pair("lora")
    ids = tokens()
    ours(ids, labels=ids)
    ours(ids, labels=ids)  # a graph in flight; any unconsumed projection would be a non-leaf tensor
    copied = copy.deepcopy(ours)
    layer = next(layer for _, layer in adapter_layers(copied))
    assert layer.siblings is not None and layer.siblings._inputs == {}
    torch.testing.assert_close(copied(ids).logits, ours(ids).logits, **TOL)


def test_a_model_that_feeds_a_sibling_another_tensor_keeps_exact_numbers(projections):
    ours, ref = pair("lora")
    attention = ours.model.layers[0].self_attn
    real_forward = attention.k_proj.forward  # k gets a copy (same values, another tensor): no reuse for it
    attention.k_proj.forward = lambda x, *a, **kw: real_forward(x * 1.0, *a, **kw)
    ids = tokens()
    want = run(ref, ids)
    for _ in range(2):
        projections.clear()
        assert_same(run(ours, ids), want)
    # layer 0: q leads all three; k, called on its copy, leads again; v takes q's; then gate leads up
    assert projections == [3, 3, 2] + [3, 2] * (ours.config.num_hidden_layers - 1)


def test_inference_mode_and_an_input_changed_in_place_compute_their_own(projections):
    ours, ref = pair("aslora")
    ids = tokens()
    with torch.no_grad():
        want = ref(ids).logits
    with torch.inference_mode():  # inference tensors carry no version counter: each layer its own
        torch.testing.assert_close(ours(ids).logits, want, **TOL)
    assert projections == []
    attention = ours.model.layers[1].self_attn
    real_forward = attention.k_proj.forward

    def bumped(x, *a, **kw):  # the same tensor object, changed in place after q projected it
        x.mul_(1.0)
        return real_forward(x, *a, **kw)

    attention.k_proj.forward = bumped
    with torch.no_grad():
        ours(ids)
        projections.clear()
        torch.testing.assert_close(ours(ids).logits, want, **TOL)
    # layer 1: q leads, k (its input's version moved) leads again, v takes k's projection
    assert projections == [3, 2] + [3, 3, 2] + [3, 2] * (ours.config.num_hidden_layers - 2)


@pytest.mark.parametrize("method", ["lora", "aslora-in_dim"])
def test_autocast_forward_and_backward(method):
    # autocast runs the forward's matmuls in bf16 while B and the A's stay fp32: the hand-written
    # backwards must work in the gradient's dtype and return each input's own
    ours, ref = pair(method)
    ids = tokens()
    results = []
    for model in (ref, ours, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels=ids)
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g.dtype == torch.float32 for g in grads.values())
        results.append((out.logits.float(), grads))
    for got in results[1:]:  # bf16 matmuls: 2^-8 relative per rounding, summed in other orders
        torch.testing.assert_close(got[0], results[0][0], rtol=0.05, atol=0.05)
        for name, grad in results[0][1].items():
            torch.testing.assert_close(got[1][name], grad, rtol=0.1, atol=0.02 * grad.abs().max().item(), msg=name)


def test_fp16_update_gradient_scales_before_it_sums():
    # a loss-scaled fp16 gradient: 200 x 8 summed over 64 outputs is 102,400 (past fp16's 65,504) before
    # the scale 0.25, 25,600 after it. The unfused graph scaled first; the fused backward must too.
    from ds_aslora.adapters.layers import _LowRankUpdate

    result = torch.zeros(4, 64, dtype=torch.float16, requires_grad=True)
    projected = torch.ones(4, 8, dtype=torch.float16, requires_grad=True)
    B = torch.full((64, 8), 8.0, dtype=torch.float16, requires_grad=True)
    _LowRankUpdate.apply(result, projected, B, 0.25, None).backward(torch.full((4, 64), 200.0, dtype=torch.float16))
    assert torch.equal(projected.grad, torch.full((4, 8), 25600.0, dtype=torch.float16))
    assert torch.equal(B.grad, torch.full((64, 8), 200.0, dtype=torch.float16))  # 4 rows x 200 x 1 x 0.25

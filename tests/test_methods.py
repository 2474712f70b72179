"""Each method's forward equals the base model with W + (alpha/r) B_l A_l folded in, and a
shared tensor's gradient is the sum of what its users would get from private copies."""
import copy

import pytest
import torch
from conftest import randomize_adapters, tiny_model, tokens

from ds_aslora import AdapterConfig, adapter_layers, inject_adapters
from ds_aslora.merging.merger import layers_by_type

CASES = [
    dict(method="lora"),
    dict(method="sharelora", share="A"),
    dict(method="sharelora", share="B"),
    dict(method="sharelora", share="AB"),
    dict(method="sharelora", share="A", scope="qkv"),
    dict(method="aslora"),
    dict(method="aslora", a_scope="in_dim"),
]


def folded_reference(base, model):
    """The base model with every adapter's delta folded into its Linear weight."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for path, layer in adapter_layers(model):
            ref.get_submodule(path).weight += layer.scaling * layer.weight_B @ layer.weight_A
    return ref


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_forward_equals_folded_weights(case):
    base = tiny_model()
    model = inject_adapters(copy.deepcopy(base), AdapterConfig(r=4, alpha=8, **case))
    randomize_adapters(model)
    ids = tokens()
    torch.testing.assert_close(model(ids).logits, folded_reference(base, model)(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", ["A", "B"])
def test_shared_gradient_is_the_sum_over_layers(share):
    cfg = AdapterConfig(method="sharelora", share=share, r=4, target_modules=["q_proj"])
    shared = inject_adapters(tiny_model(), cfg)
    randomize_adapters(shared)
    private = inject_adapters(tiny_model(), AdapterConfig(method="lora", r=4, target_modules=["q_proj"]))
    key = f"lora_{share}"
    with torch.no_grad():
        for (_, s), (_, p) in zip(adapter_layers(shared), adapter_layers(private), strict=True):
            p.lora_A.copy_(s.weight_A)
            p.lora_B.copy_(s.weight_B)
    ids = tokens()
    shared(ids, labels=ids).loss.backward()
    private(ids, labels=ids).loss.backward()
    summed = sum(getattr(p, key).grad for _, p in adapter_layers(private))
    torch.testing.assert_close(getattr(shared.shared_bank, f"{share}_q_proj").grad, summed, rtol=1e-5, atol=1e-7)


def test_dropout_applies_to_the_adapter_input_only_in_training():
    model = inject_adapters(tiny_model(), AdapterConfig(r=4, dropout=0.5, target_modules=["q_proj"]))
    randomize_adapters(model)
    ids = tokens()
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_retired_b_gets_an_exact_zero_gradient_even_when_its_sum_would_overflow(dtype):
    cfg = AdapterConfig(method="aslora", r=4, alpha=8, target_modules=["q_proj"])
    model = inject_adapters(tiny_model(), cfg).to(dtype)
    layers = layers_by_type(model)["q_proj"]
    with torch.no_grad():
        layers[0].lora_B.fill_(60000.0 if dtype == torch.float16 else 3e38)  # its sum is inf in this dtype
    assert not torch.isfinite(layers[0].lora_B.sum())
    layers[0].tie_to(layers[1])
    ids = tokens()
    model(ids, labels=ids).loss.backward()
    out = model.model.layers[0].self_attn.q_proj(torch.ones(1, 3, 32, dtype=dtype))
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(layers[0].lora_B.grad) == 0 and torch.isfinite(layers[1].lora_B.grad).all()
    # the backward too: an incoming gradient whose sum overflows must not reach the retired B as NaN
    model.zero_grad()
    layers[0].lora_B.grad = None
    big = 60000.0 if dtype == torch.float16 else 3e38
    (model.model.layers[0].self_attn.q_proj(torch.ones(1, 3, 32, dtype=dtype)) * big).sum().backward()
    assert layers[0].lora_B.grad is not None and torch.count_nonzero(layers[0].lora_B.grad) == 0

"""A replicated fp32 bank read by 16-bit layers is cast once per forward of the model (bank.ForwardCasts).

The reference is the same model with the casts never opened (each use casts, as a layer called
alone does): logits and gradients must be equal bit for bit, since the copies hold the same
values and each use's gradient is still cast back to fp32 before the uses are summed.
"""
import copy

import pytest
import torch
from conftest import logits_and_grads, randomize_adapters, tiny_model, tokens
from torch.utils._python_dispatch import TorchDispatchMode

from ds_aslora import AdapterConfig, inject_adapters
from ds_aslora.adapters.bank import ForwardCasts
from ds_aslora.adapters.inject import find_bank, link_siblings

METHODS = {
    "aslora": dict(method="aslora"),
    "aslora-in_dim": dict(method="aslora", a_scope="in_dim"),
    "shareB": dict(method="sharelora", share="B"),
    "shareAB-qkv": dict(method="sharelora", share="AB", scope="qkv"),
}


def as_under_deepspeed(model):
    """The engine's tensors in bf16 (frozen base and per-layer factors), the replicated bank in fp32."""
    bank = {id(p) for p in find_bank(model).parameters()}
    model.to(torch.bfloat16)
    for p in find_bank(model).parameters():
        p.data = p.data.float()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if id(p) not in bank)
    return model


def pair(method, siblings=True):
    """(casts once per forward, casts at every use) copies of one randomised bf16 model."""
    overrides = {"num_key_value_heads": 4} if METHODS[method].get("share") == "AB" else {}
    ours = inject_adapters(tiny_model(**overrides), AdapterConfig(r=4, **METHODS[method]))
    randomize_adapters(ours)
    as_under_deepspeed(ours)
    link_siblings(ours, enabled=siblings)
    ref = copy.deepcopy(ours)
    find_bank(ref).casts = ForwardCasts()  # never opened: the model's hooks open the copy's own
    return ours, ref


class CountBankCasts(TorchDispatchMode):
    """fp32 -> bf16 copies of tensors shaped like the bank's (the input casts are bf16 already)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.count = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 \
                and tuple(args[0].shape) in self.shapes and kwargs.get("dtype") == torch.bfloat16:
            self.count += 1
        return func(*args, **kwargs)


run = logits_and_grads


def assert_equal(got, want):
    assert torch.equal(got[0], want[0])
    assert got[1].keys() == want[1].keys()
    for name, grad in want[1].items():
        assert torch.equal(got[1][name], grad), name


@pytest.mark.parametrize("siblings", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_one_cast_per_bank_tensor_and_the_same_bits(method, siblings):
    ours, ref = pair(method, siblings)
    ids = tokens()
    bank = find_bank(ours)
    shapes = {tuple(p.shape) for p in bank.parameters()}
    counts = {}
    for name, model in (("ours", ours), ("ref", ref)):
        with CountBankCasts(shapes) as casts:
            model(ids)
        counts[name] = casts.count
    assert counts["ours"] == len(bank.keys())
    assert counts["ref"] > counts["ours"]  # every layer cast it
    for _ in range(2):  # a second step: the copies are made afresh, not kept from the last forward
        assert_equal(run(ours, ids), run(ref, ids))
        with torch.no_grad():
            for p in bank.parameters():
                p.add_(0.01)
            for p in find_bank(ref).parameters():
                p.add_(0.01)
    assert bank.casts.open is False and bank.casts._copies == {}


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_recompute_casts_per_use_with_the_same_bits(reentrant):
    ours, ref = pair("aslora")
    for model in (ours, ref):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        if reentrant:
            model.enable_input_require_grads()
    ids = tokens()
    assert_equal(run(ours, ids), run(ref, ids))


def test_a_failed_forward_closes_the_casts_and_the_next_one_works():
    ours, ref = pair("aslora")
    bad = torch.full((1, 4), ours.config.vocab_size + 5)
    with pytest.raises(IndexError):
        ours(bad)
    assert find_bank(ours).casts.open is False
    ids = tokens()
    assert_equal(run(ours, ids), run(ref, ids))


def test_no_grad_and_inference_mode_forwards_give_the_same_logits():
    ours, ref = pair("aslora-in_dim")
    ids = tokens()
    want = ref(ids).logits
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, want)
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, want)
    assert_equal(run(ours, ids), run(ref, ids))  # training after inference: no inference tensor kept


def test_a_trainer_calling_the_decoder_itself_also_casts_once():
    ours, _ = pair("aslora")
    bank = find_bank(ours)
    with CountBankCasts({tuple(p.shape) for p in bank.parameters()}) as casts:
        ours.get_decoder()(tokens())
    assert casts.count == len(bank.keys()) and bank.casts.open is False


def test_adapters_made_under_inference_mode_serve_with_a_plain_cast():
    """A serving script may load the adapters under inference_mode: inference tensors keep no version
    counter, so their copies are not kept (a plain cast at each use, as before)."""
    ids = tokens()
    logits = []
    for inference in (True, False):
        with torch.inference_mode(inference):
            model = inject_adapters(tiny_model(num_key_value_heads=4),
                                    AdapterConfig(r=4, method="sharelora", share="AB", scope="qkv"))
            randomize_adapters(model)
            as_under_deepspeed(model)
        with torch.inference_mode():
            logits.append(model(ids).logits)
    assert torch.equal(*logits)

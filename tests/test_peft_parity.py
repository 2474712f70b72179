"""method=lora must be numerically identical to Hugging Face peft's LoRA (to fp32 rounding)."""
import copy

import pytest
import torch
from conftest import tiny_model, tokens
from peft import LoraConfig, get_peft_model

from ds_aslora import AdapterConfig, adapter_layers, count_trainable, inject_adapters

# Our update is one addmm with a fused backward (and siblings share one projection GEMM), peft's a
# matmul, a scale and an add: the same sums in another order, so fp32 rounding (eps 1.2e-7 per
# operation, accumulated over K <= 64 terms here) and never more than 1e-5 of the values.
FP32_RTOL = 1e-5


def assert_fp32_close(got: torch.Tensor, want: torch.Tensor) -> None:
    # relative to the tensor's scale: a near-zero element carries its neighbours' rounding
    torch.testing.assert_close(got, want, rtol=0, atol=FP32_RTOL * want.abs().max().item())


def peft_and_ours(family, targets, r=4, alpha=8, dtype=torch.float32):
    base = tiny_model(family).to(dtype)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    ours = inject_adapters(base, AdapterConfig(method="lora", r=r, alpha=alpha, target_modules=targets))
    gen = torch.Generator().manual_seed(7)
    peft_params = dict(ref.named_parameters())
    with torch.no_grad():
        for path, layer in adapter_layers(ours):
            for ours_p, key in ((layer.lora_A, "lora_A"), (layer.lora_B, "lora_B")):
                ours_p.copy_(torch.randn(ours_p.shape, generator=gen) * 0.2)
                peft_params[f"base_model.model.{path}.{key}.default.weight"].copy_(ours_p)
    return ref, ours


@pytest.mark.parametrize("family, targets", [
    ("llama", ["q_proj", "v_proj"]),
    ("llama", "all-linear"),
    ("mistral", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("qwen2", ["gate_proj", "up_proj", "down_proj"]),  # qwen2 q/k/v carry biases too
])
def test_logits_grads_and_counts_match_peft(family, targets):
    ref, ours = peft_and_ours(family, targets)
    ids = tokens()
    ref_out, ours_out = ref(ids, labels=ids), ours(ids, labels=ids)
    assert_fp32_close(ours_out.logits, ref_out.logits)
    ref_out.loss.backward()
    ours_out.loss.backward()
    peft_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for path, layer in adapter_layers(ours):
        for key in ("lora_A", "lora_B"):
            assert_fp32_close(getattr(layer, key).grad, peft_grads[f"base_model.model.{path}.{key}.default.weight"])
    assert count_trainable(ours) == ref.get_nb_trainable_parameters()[0]


def test_bf16_base_keeps_fp32_adapters_and_bf16_output_like_peft():
    ref, ours = peft_and_ours("llama", ["q_proj"], dtype=torch.bfloat16)
    layer = next(layer for _, layer in adapter_layers(ours))
    assert layer.lora_A.dtype == torch.float32
    ids = tokens()
    assert torch.equal(ref(ids).logits, ours(ids).logits)


def test_init_is_peft_lora_init():
    model = inject_adapters(tiny_model(), AdapterConfig(method="lora", r=4))
    layer = next(layer for _, layer in adapter_layers(model))
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1.0 / (layer.in_features ** 0.5)  # kaiming_uniform(a=sqrt 5) on fan_in
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4

import pytest
import torch
from conftest import tiny_model, tokens
from torch import nn

from ds_aslora import AdapterConfig, adapter_layers, count_trainable, inject_adapters
from ds_aslora.adapters.layers import AdapterLinear


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_all_linear_adapts_every_linear_but_the_head_and_freezes_the_base(family):
    model = inject_adapters(tiny_model(family), AdapterConfig(method="lora", r=2))
    names = [n for n, _ in adapter_layers(model)]
    assert len(names) == 4 * 7 and not any("lm_head" in n for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_shared_tensors_appear_once_in_parameters_and_state_dict(llama):
    cfg = AdapterConfig(method="sharelora", share="AB", r=2, target_modules=["q_proj", "v_proj"])
    model = inject_adapters(llama, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["shared_bank.A_q_proj", "shared_bank.B_q_proj", "shared_bank.A_v_proj", "shared_bank.B_v_proj"]
    keys = [k for k in model.state_dict() if "lora" in k or "shared_bank" in k]
    assert keys == trainable
    # ShareAB: every q_proj layer uses the very same tensors
    qs = [layer for n, layer in adapter_layers(model) if n.endswith("q_proj")]
    assert all(q.weight_A is qs[0].weight_A and q.weight_B is qs[0].weight_B for q in qs)


def test_plain_torch_optimizer_trains_shared_tensors(llama):
    model = inject_adapters(llama, AdapterConfig(method="sharelora", share="A", r=2, alpha=4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = model.shared_bank.A_q_proj.detach().clone()
    ids = tokens()
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(before, model.shared_bank.A_q_proj)


def test_qkv_scope_shares_one_A_for_q_k_v_and_per_type_for_others(llama):
    model = inject_adapters(llama, AdapterConfig(method="sharelora", scope="qkv", r=2))
    assert sorted(model.shared_bank.keys()) == ["A_down_proj", "A_gate_proj", "A_o_proj", "A_qkv", "A_up_proj"]


def test_share_B_with_qkv_scope_on_gqa_model_explains_the_shape_clash(llama):
    with pytest.raises(ValueError, match="grouped-query"):
        inject_adapters(llama, AdapterConfig(method="sharelora", share="B", scope="qkv", r=2))


def test_aslora_a_scope_in_dim_shares_A_across_types_with_equal_input(llama):
    model = inject_adapters(llama, AdapterConfig(method="aslora", a_scope="in_dim", r=2))
    assert sorted(model.shared_bank.keys()) == ["A_in32", "A_in64"]  # hidden, intermediate


def test_missing_or_misspelt_targets_fail_with_the_available_names(llama):
    with pytest.raises(ValueError, match=r"\['q_prj'\].*q_proj"):
        inject_adapters(llama, AdapterConfig(target_modules=["q_proj", "q_prj"]))


def test_non_linear_target_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="Conv1D"):
        inject_adapters(model, AdapterConfig(target_modules=["c_attn"]))


def test_injecting_twice_is_an_error(llama):
    inject_adapters(llama, AdapterConfig())
    with pytest.raises(ValueError, match="already"):
        inject_adapters(llama, AdapterConfig())


def test_meta_device_injection_takes_dims_from_features():
    with torch.device("meta"):
        model = tiny_model()
    inject_adapters(model, AdapterConfig(method="aslora", r=4, target_modules=["k_proj"]))
    layer = next(layer for _, layer in adapter_layers(model))
    assert layer.lora_B.is_meta and tuple(layer.lora_B.shape) == (16, 4)


def test_partitioned_base_weight_is_never_read_for_shapes():
    # A ZeRO-3 partitioned Linear has an empty local weight; dimensions must come from the
    # module's in_features/out_features.
    base = nn.Linear(32, 16, bias=False)
    base.weight = nn.Parameter(torch.empty(0))
    holder = nn.Module()
    holder.layers = nn.ModuleList([nn.Module()])
    holder.layers[0].k_proj = base
    inject_adapters(holder, AdapterConfig(method="lora", r=4, target_modules=["k_proj"]))
    layer = holder.layers[0].k_proj
    assert isinstance(layer, AdapterLinear)
    assert (tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)) == ((4, 32), (16, 4))
    assert count_trainable(holder) == 4 * 32 + 16 * 4

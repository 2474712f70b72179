"""The 13B-70B planner: exact counts, ZeRO-3 residency, DeepSpeed's estimators, activations, CLI.

Expected numbers are derived here from the configs' dimensions, never copied from the program.
"""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch

from ds_aslora import AdapterConfig, inject_adapters
from ds_aslora.adapters.count import build_on_meta
from ds_aslora.adapters.inject import find_bank, link_siblings
from ds_aslora.planning.activations import activation_bytes
from ds_aslora.planning.inventory import inventory, zero3_resident_adapter_bytes, zero3_resident_adapter_numel
from ds_aslora.planning.memory import (
    TrainSetup,
    deepspeed_estimator_checks,
    memory_plan,
    schedule_merges,
    trainable_counts,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "tests", "assets", "configs")
R = 64


def dims(name):
    with open(os.path.join(CONFIGS, f"{name}.json")) as f:
        c = json.load(f)
    h, f_, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c.get("num_key_value_heads", c["num_attention_heads"])
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, f_), (h, f_), (f_, h)]  # (in, out): q k v o gate up down
    frozen = 2 * V * h + L * (sum(i * o for i, o in shapes) + 2 * h) + h  # embed, head, layers, final norm
    return L, h, V, shapes, frozen


def expected_counts(name, r=R):
    L, _, _, shapes, _ = dims(name)
    lora = L * sum(r * (i + o) for i, o in shapes)
    share_a = sum(r * i for i, _ in shapes) + L * sum(r * o for _, o in shapes)
    per_merge = sum(r * o for _, o in shapes)  # one B group per module type
    return lora, share_a, per_merge


@functools.lru_cache(maxsize=None)
def meta(name, method, **kw):
    return build_on_meta(os.path.join(CONFIGS, f"{name}.json"), AdapterConfig(method=method, r=R, **kw))


@pytest.mark.parametrize("name", ["llama2-13b", "llama2-70b"])
def test_exact_counts_lora_sharelora_aslora_before_and_after_merges(name):
    L = dims(name)[0]
    lora, share_a, per_merge = expected_counts(name)
    assert trainable_counts(meta(name, "lora")) == (lora, None)
    assert trainable_counts(meta(name, "sharelora", share="A")) == (share_a, None)
    # default schedule: down to one B group per type
    assert trainable_counts(meta(name, "aslora")) == (share_a, share_a - (L - 1) * per_merge)
    assert trainable_counts(meta(name, "aslora", merge_count=7)) == (share_a, share_a - 7 * per_merge)
    assert schedule_merges(meta(name, "aslora", target_groups=5)) == L - 5


def test_llama2_70b_zero3_residency():
    L, h, _, shapes, _ = dims("llama2-70b")
    lora, _, _ = expected_counts("llama2-70b")
    assert lora == 828_375_040
    # previous rule: every adapter tensor persistent, 3.3 GB per GPU in fp32 (1.66 GB in bf16)
    assert zero3_resident_adapter_bytes(meta("llama2-70b", "lora"), 4, every_adapter=True) == 4 * lora
    # policy: DeepSpeed's rule (numel <= 1e5). Not "none" at 70B: under GQA the k/v B are 1024 x 64 = 65,536
    kv_b = [R * o for i, o in shapes if R * o <= 100_000]
    assert kv_b == [65_536, 65_536]
    for model in (meta("llama2-70b", "lora"), meta("llama2-70b", "sharelora", share="A")):
        assert zero3_resident_adapter_numel(model) == L * sum(kv_b) == 10_485_760
    # a threshold under 65,536 keeps no LoRA tensor whole
    assert zero3_resident_adapter_numel(meta("llama2-70b", "lora"), threshold=65_535) == 0
    # ASLoRA: every per-layer B whole = L x r x (sum of d_out)
    b = L * R * sum(o for _, o in shapes)
    assert b == 80 * 64 * (8192 + 1024 + 1024 + 8192 + 28672 + 28672 + 8192) == 429_916_160
    aslora = meta("llama2-70b", "aslora")
    assert zero3_resident_adapter_numel(aslora) == b
    assert zero3_resident_adapter_bytes(aslora, 2) == 859_832_320
    # raised threshold = largest B (down/gate/up: 28672 x 64); only the RMSNorm weights of the base fall under it
    plan = memory_plan(aslora, TrainSetup(zero_stage=3, nodes=4, gpus_per_node=8))
    assert plan.threshold == 28672 * R
    assert plan.persistent_frozen_numel == (2 * L + 1) * h
    assert plan.row("adapter_resident").gpu == 859_832_320
    assert plan.row("bank").gpu == 16 * sum(R * i for i, _ in shapes)  # replicated, whatever the world


def test_rows_follow_the_policy_per_stage_and_offload():
    lora, share_a, _ = expected_counts("llama2-13b")
    _, _, _, shapes, frozen = dims("llama2-13b")
    bank = sum(R * i for i, _ in shapes)
    model = meta("llama2-13b", "sharelora", share="A")
    n = share_a - bank  # per-layer B: the engine's parameters
    s0 = memory_plan(model, TrainSetup(zero_stage=0, gpus_per_node=8, dtype="fp32"))
    assert [s0.row(k).gpu for k in ("frozen", "adapter_working", "adapter_grads", "adapter_master",
                                    "adapter_moments", "bank")] == [4 * frozen, 4 * n, 4 * n, 0, 8 * n, 16 * bank]
    s1 = memory_plan(model, TrainSetup(zero_stage=1, gpus_per_node=8))
    assert (s1.row("adapter_grads").gpu, s1.row("adapter_moments").gpu) == (2 * n, 8 * n // 8)
    s2 = memory_plan(model, TrainSetup(zero_stage=2, gpus_per_node=8))
    assert (s2.row("frozen").gpu, s2.row("adapter_grads").gpu, s2.row("adapter_master").gpu) == (
        2 * frozen, 2 * n // 8, 4 * n // 8)
    off = memory_plan(model, TrainSetup(zero_stage=3, gpus_per_node=8, offload=True))
    assert off.row("adapter_moments").gpu == 0 and off.row("adapter_moments").host == 8 * n // 8
    assert off.row("bank").gpu == 16 * bank and off.row("bank").host == 0
    with pytest.raises(ValueError, match="ZeRO-3"):
        TrainSetup(zero_stage=2, offload=True)
    with pytest.raises(ValueError, match="shared_mode='engine'"):
        memory_plan(meta("llama2-13b", "sharelora", share="AB"), TrainSetup())


@pytest.mark.parametrize("name, stage, nodes", [("llama2-70b", 3, 4), ("llama2-13b", 3, 1), ("llama2-13b", 2, 1),
                                                ("llama2-13b", 1, 1)])
def test_agreement_with_deepspeed_estimators(name, stage, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, _, _, _, frozen = dims(name)
    model = meta(name, "aslora")
    setup = TrainSetup(zero_stage=stage, nodes=nodes, gpus_per_node=8)
    inv = inventory(model)
    assert inv.frozen_numel == frozen
    checks = deepspeed_estimator_checks(inv, setup)
    assert len(checks) == (2 if stage == 3 else 3) and all(c.agrees for c in checks), checks
    plan = memory_plan(model, setup)
    if stage == 3:  # the frozen term, directly: DeepSpeed's GPU figure with the optimizer offloaded
        world = 8 * nodes
        _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(frozen, 0, 8, nodes, True, False, True, 1)
        assert checks[0].ours == ds_gpu == 2 * frozen // world
        # the row adds the persistent RMSNorm weights whole and DeepSpeed's per-tensor padding
        row = plan.row("frozen").gpu
        assert 2 * plan.persistent_frozen_numel <= row - ds_gpu <= 2 * plan.persistent_frozen_numel + 2 * len(
            inv.frozen) * (world + 1)
    else:
        assert checks[0].ours == checks[0].deepspeed == 2 * frozen == plan.row("frozen").gpu


def _saved_bytes(model, ids):
    """Bytes autograd saves for backward (parameters excluded, each storage once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("attention, cfg", [
    ("sdpa", dict(method="lora")),
    ("sdpa", dict(method="lora", target_modules=["q_proj", "v_proj"])),
    ("sdpa", dict(method="lora", target_modules=["o_proj", "down_proj"])),
    ("sdpa", dict(method="aslora")),                           # fp32 bank cast once per forward
    ("sdpa", dict(method="aslora", a_scope="in_dim")),         # ... once for the siblings sharing it
    ("sdpa", dict(method="sharelora", share="A", scope="qkv")),
    ("sdpa", dict(method="sharelora", share="B")),
    ("sdpa", dict(method="aslora", dropout=0.1, target_modules=["o_proj", "up_proj"])),
    ("eager", dict(method="lora")),
    ("sdpa", dict(method="aslora", a_scope="in_dim", siblings=False)),  # ZeRO-3: each layer projects alone
    ("sdpa", dict(method="sharelora", share="A", scope="qkv", siblings=False)),
])
def test_activation_formula_matches_saved_tensors_exactly(attention, cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation=attention)
    torch.manual_seed(0)
    cfg = dict(cfg)
    siblings = cfg.pop("siblings", True)
    model = inject_adapters(LlamaForCausalLM(config).to(torch.bfloat16), AdapterConfig(r=4, **cfg)).train()
    link_siblings(model, enabled=siblings)
    bank = {id(p) for p in find_bank(model).parameters()}
    for p in model.parameters():  # as under DeepSpeed: engine tensors in bf16, the replicated bank in fp32
        if p.requires_grad and id(p) not in bank:
            p.data = p.data.to(torch.bfloat16)
    for b, s in ((1, 16), (2, 24)):
        ids = torch.randint(0, 96, (b, s), generator=torch.Generator().manual_seed(b))
        # PyTorch's CPU dropout keeps its mask in the input dtype (CUDA: bool)
        est = activation_bytes(model, dtype_bytes=2, micro_batch=b, seq_len=s, attention=attention,
                               dropout_mask_bytes=2, siblings=siblings)
        assert est.formula == "llama" and est.saved == _saved_bytes(model, ids)
        assert est.checkpointing < est.no_checkpointing


def test_cli_70b_aslora_zero3_4x8(capsys):
    from ds_aslora.planning.cli import main

    lora, share_a, per_merge = expected_counts("llama2-70b")
    main(["--model-config", os.path.join(CONFIGS, "llama2-70b.json"), "--method", "aslora", "--r", "64",
                      "--targets", "all-linear", "--zero", "3", "--nodes", "4", "--gpus", "8", "--merges", "60"])
    out = capsys.readouterr().out
    assert f"{lora:,}" in out and f"{share_a:,}" in out and f"{share_a - 60 * per_merge:,}" in out
    assert "aslora at the end of the run, after 60 merges per module type (20 B groups)" in out
    assert "world 32" in out and "raised to 1,835,008" in out
    assert "429,916,160 params =     859,832,320 B" in out and "10,485,760 params =      20,971,520 B" in out
    assert out.count(" agree ") == 2 and "DIFFER" not in out
    for label in ("frozen base weights", "ZeRO-3 resident (persistent) adapters", "replicated shared bank",
                  "activations, checkpointing (est.)", "peak with checkpointing"):
        assert label in out


def test_cli_13b_1x8_subprocess_and_bad_input():
    lora, share_a, _ = expected_counts("llama2-13b")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "plan.py"), "--model-config",
           os.path.join(CONFIGS, "llama2-13b.json"), "--method", "sharelora", "--share", "A", "--r", "64",
           "--zero", "3", "--nodes", "1", "--gpus", "8", "--offload", "--bytes"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"{lora:,}" in run.stdout and f"{share_a:,}" in run.stdout and "host" in run.stdout
    bad = subprocess.run(cmd[:4] + ["--method", "aslora", "--merge_count", "3", "--target_groups", "2"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "not allowed with" in bad.stderr


def test_gradient_buckets_are_sized_from_the_trainable_count_and_counted():
    from ds_aslora.planning.inventory import bucket_size

    lora, share_a, _ = expected_counts("llama2-13b")
    _, h, _, shapes, _ = dims("llama2-13b")
    n = share_a - sum(R * i for i, _ in shapes)  # per-layer B: what DeepSpeed holds and reduces
    assert bucket_size(h, 1000) == 1000 and bucket_size(h, 1001) == 1008 and bucket_size(h, 0) == 8  # even, aligned
    bucket = bucket_size(h, n)
    assert n > h * h and bucket == h * h  # r=64 all-linear: the HF integration's hidden^2
    model = meta("llama2-13b", "sharelora", share="A")
    s2 = memory_plan(model, TrainSetup(zero_stage=2, gpus_per_node=8))
    assert s2.row("zero_buckets").gpu == 2 * bucket * 2  # two buffers (overlap_comm) x bf16
    assert memory_plan(model, TrainSetup(zero_stage=2, overlap_comm=False)).row("zero_buckets").gpu == bucket * 2
    assert memory_plan(model, TrainSetup(zero_stage=1)).row("zero_buckets").gpu == 2 * bucket * 4  # fp32 staging
    assert memory_plan(model, TrainSetup(zero_stage=3)).row("zero_buckets").gpu == bucket * 2
    small = memory_plan(build_on_meta(os.path.join(CONFIGS, "llama2-13b.json"), AdapterConfig(
        method="aslora", r=4, target_modules=["q_proj"])), TrainSetup(zero_stage=2))
    assert small.row("zero_buckets").gpu == 2 * 40 * 4 * h * 2  # every q_proj B (40 layers x r x h), once
    fixed = memory_plan(model, TrainSetup(zero_stage=2, reduce_bucket_size=500_000_000))
    assert fixed.row("zero_buckets").gpu == 2 * 500_000_000 * 2  # the old zero2.json: 2 GB per GPU
    assert s2.peak_gpu(True) - fixed.peak_gpu(True) == s2.row("zero_buckets").gpu - 2_000_000_000


def test_flash_attention_is_planned_as_the_fused_kernels_save(capsys):
    """flash_attention_2/3 (the job's --attn_implementation values) keep what SDPA's fused kernels
    keep: q, k, v unrepeated, the output and an fp32 log-sum-exp; eager keeps the s x s probabilities."""
    from ds_aslora.planning.cli import main

    model = build_on_meta(os.path.join(CONFIGS, "llama2-13b.json"), AdapterConfig(method="aslora", r=16))
    sizes = {attention: activation_bytes(model, dtype_bytes=2, micro_batch=1, seq_len=4096, attention=attention).saved
             for attention in ("sdpa", "eager", "flash_attention_2", "flash_attention_3")}
    assert sizes["flash_attention_2"] == sizes["flash_attention_3"] == sizes["sdpa"] < sizes["eager"]
    main(["--model-config", os.path.join(CONFIGS, "llama2-13b.json"), "--method", "aslora",
          "--attn_implementation", "flash_attention_2"])
    assert "flash_attention_2 attention" in capsys.readouterr().out
    with pytest.raises(ValueError, match="attention must be one of"):
        activation_bytes(model, dtype_bytes=2, micro_batch=1, seq_len=8, attention="flash")

"""One precision and residency policy on every ZeRO stage (a bf16 model, as on GPUs):
per-layer adapters train as a bf16 working copy with an fp32 master, the replicated bank is
fp32, and under ZeRO-3 only ASLoRA's B (which ties read) stays resident."""
import pytest
import torch
from conftest import tiny_model, tokens
from multirank import run_ranks
from test_zero_parity import ds_config

from ds_aslora import AdapterConfig, inject_adapters

METHODS = {"lora": dict(method="lora"), "shareA": dict(method="sharelora", share="A"),
           "aslora": dict(method="aslora", merge_start=1, merge_interval=1, merge_count=1)}


def bf16_config(stage, world, **zero):
    config = ds_config(stage, 1, world)
    config["bf16"] = {"enabled": True}
    # 0: DeepSpeed's own rule alone would partition every tensor of this tiny model
    config["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0, **zero)
    return config


def policy_worker(rank, path, stage):
    import deepspeed.comm as dist

    from ds_aslora.adapters.inject import adapter_layers
    from ds_aslora.merging.coordinator import MergeCoordinator
    from ds_aslora.merging.zero_state import gather_fp32
    from ds_aslora.runtime.base_model import load_base_model
    from ds_aslora.runtime.engine import initialize
    from ds_aslora.runtime.step import micro_step

    out = {}
    for name, options in METHODS.items():
        config = bf16_config(stage, dist.get_world_size())
        model, keep_alive = load_base_model(path, config, dtype=torch.bfloat16)
        inject_adapters(model, AdapterConfig(r=4, target_modules=["q_proj", "down_proj"], **options))
        engine, bank = initialize(model, config)
        merger = MergeCoordinator(engine) if name == "aslora" else None
        ids = tokens(batch=2, length=8)
        losses = [micro_step(engine, {"input_ids": ids, "labels": ids}, bank, merger)[0].item() for _ in range(2)]
        own = [p for _, layer in adapter_layers(engine.module) for p in (layer.lora_A, layer.lora_B) if p is not None]
        out[name] = dict(
            working={str(p.dtype) for p in own}, master={str(gather_fp32(p).dtype) for p in own},
            bank={str(p.dtype) for p in bank.params} if bank else set(),
            resident={(n.rsplit(".", 1)[-1], bool(getattr(p, "ds_persist", False)))
                      for n, p in engine.module.named_parameters() if p.requires_grad},
            merged=len(merger.policy.history) if merger else 0, losses=losses)
        del keep_alive
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_adapters_train_as_bf16_working_copy_with_fp32_master_and_resident_only_for_ties(tmp_path, stage):
    tiny_model().to(torch.bfloat16).save_pretrained(tmp_path)
    for result in run_ranks(policy_worker, 2, str(tmp_path), stage):
        for name, seen in result.items():
            # stage 3 builds the model under zero.Init, which skips DeepSpeed's cast: same dtypes anyway
            assert seen["working"] == {"torch.bfloat16"} and seen["master"] == {"torch.float32"}, name
            assert seen["bank"] == (set() if name == "lora" else {"torch.float32"}), name
            assert all(torch.isfinite(torch.tensor(seen["losses"]))), name
        assert result["aslora"]["merged"] == 2  # one merge per module type at step 2
        if stage == 3:
            assert result["lora"]["resident"] == {("lora_A", False), ("lora_B", False)}
            assert result["shareA"]["resident"] == {("lora_B", False)}
            assert result["aslora"]["resident"] == {("lora_B", True)}


def capped_worker(rank, path):
    import deepspeed.comm as dist

    from ds_aslora.runtime.base_model import load_base_model
    from ds_aslora.runtime.engine import initialize

    config = bf16_config(3, dist.get_world_size(), stage3_model_persistence_threshold=64)
    model, keep_alive = load_base_model(path, config, dtype=torch.bfloat16)
    inject_adapters(model, AdapterConfig(method="aslora", r=4, target_modules=["down_proj"]))
    with pytest.raises(ValueError, match="left 4 ASLoRA B tensors partitioned") as info:
        initialize(model, config)
    return str(info.value)


@pytest.mark.slow
def test_a_persistence_cap_that_would_break_ties_is_refused(tmp_path):
    tiny_model().to(torch.bfloat16).save_pretrained(tmp_path)
    for message in run_ranks(capped_worker, 2, str(tmp_path)):
        assert "stage3_model_persistence_threshold" in message

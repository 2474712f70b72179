"""Exports: peft directories load in peft with identical logits; compact exports round-trip."""
import json

import pytest
import torch
from conftest import randomize_adapters, tiny_model, tokens
from peft import PeftModel
from safetensors.torch import load_file

from ds_aslora import (
    AdapterConfig,
    LocalMerger,
    count_trainable,
    export_compact,
    export_peft,
    inject_adapters,
    load_compact,
)

CASES = [
    dict(method="lora", target_modules=["q_proj", "v_proj"]),
    dict(method="sharelora", share="AB"),
    dict(method="sharelora", share="A", scope="qkv", target_modules=["q_proj", "k_proj", "v_proj"]),
    dict(method="aslora", target_modules=["q_proj", "v_proj"]),
]


def adapted(case):
    """Adapters with random non-zero values; ASLoRA also gets one real merge per type."""
    model = inject_adapters(tiny_model(), AdapterConfig(r=4, alpha=8, merge_start=0, merge_interval=1, **case))
    randomize_adapters(model)
    if case["method"] == "aslora":
        assert len(LocalMerger(model).after_step(1)) == 2
    return model


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["method"] + str(c.get("share", "")))
def test_peft_export_loads_in_peft_with_identical_logits(case, tmp_path):
    model = adapted(case)
    export_peft(model, str(tmp_path), base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == "tiny-llama"
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)
    loaded = PeftModel.from_pretrained(tiny_model(), str(tmp_path))
    ids = tokens()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["method"] + str(c.get("share", "")))
def test_compact_export_stores_shared_tensors_once_and_round_trips(case, tmp_path):
    model = adapted(case)
    export_compact(model, str(tmp_path))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == count_trainable(model)
    fresh = load_compact(tiny_model(), str(tmp_path))
    ids = tokens()
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert count_trainable(fresh) == count_trainable(model)


def test_aslora_compact_export_carries_the_tie_map(tmp_path):
    model = adapted(CASES[-1])
    export_compact(model, str(tmp_path))
    ties = json.loads((tmp_path / "adapter_config.json").read_text())["ties"]
    assert len(ties) == 2 and all(v.startswith("model.layers.") for v in ties.values())


def test_load_compact_reports_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_compact(tiny_model(), str(tmp_path / "missing"))
    export_peft(adapted(CASES[0]), str(tmp_path / "peft"))
    with pytest.raises(ValueError, match="not a ds_aslora compact"):
        load_compact(tiny_model(), str(tmp_path / "peft"))
    export_compact(adapted(CASES[0]), str(tmp_path / "compact"))
    with pytest.raises(ValueError, match="differ"):
        load_compact(inject_adapters(tiny_model(), AdapterConfig(r=2, target_modules=["q_proj", "v_proj"])),
                     str(tmp_path / "compact"))
    with pytest.raises(ValueError, match="does not fit"):
        load_compact(tiny_model(num_hidden_layers=2), str(tmp_path / "compact"))


def engine_export_worker(rank, stage, out_dir):
    """bf16 training on ``stage``, then a collective export; returns this rank's fp32 masters
    and how many files it wrote."""
    import deepspeed.comm as dist
    from test_zero_parity import ds_config

    import ds_aslora.export.adapter as export
    from ds_aslora.merging.zero_state import gather_fp32
    from ds_aslora.runtime.engine import initialize
    from ds_aslora.runtime.step import micro_step

    config = {**ds_config(stage, 1, dist.get_world_size()), "bf16": {"enabled": True}}
    model = inject_adapters(tiny_model(), AdapterConfig(method="aslora", r=4, target_modules=["q_proj", "v_proj"]))
    engine, bank = initialize(model, config)
    for step in range(3):
        ids = tokens(batch=2, seed=step + 10 * rank)
        micro_step(engine, {"input_ids": ids, "labels": ids}, bank)
    writes, save = [], export.save_file
    export.save_file = lambda tensors, path, **kw: writes.append(path) or save(tensors, path, **kw)
    export.export_engine(engine, peft_dir=f"{out_dir}/peft", compact_dir=f"{out_dir}/compact")
    masters = {name: gather_fp32(p) for name, p in engine.module.named_parameters() if p.requires_grad}
    return masters, len(writes)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_engine_export_writes_the_fp32_masters_from_rank_0_only(tmp_path, stage):
    from multirank import run_ranks

    (masters, writes0), (_, writes1) = run_ranks(engine_export_worker, 2, stage, str(tmp_path))
    assert (writes0, writes1) == (2, 0)
    compact = load_file(str(tmp_path / "compact" / "adapter_model.safetensors"))
    peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    rounded = 0
    for name, master in masters.items():
        assert master.dtype == torch.float32 and master.numel() > 0
        torch.testing.assert_close(compact[name], master, rtol=0, atol=0)
        torch.testing.assert_close(peft[f"base_model.model.{name}.weight"], master, rtol=0, atol=0)
        rounded += int((master.bfloat16().float() != master).sum())
    assert rounded > 0  # the masters carry bits a bf16 working copy would have lost

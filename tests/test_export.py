"""Exports: peft directories load in peft with identical logits; compact exports round-trip."""
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import randomize_adapters, tiny_model, tokens
from ds_aslora import (AdapterConfig, LocalMerger, count_trainable, export_compact, export_peft, inject_adapters,
                       load_compact)

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

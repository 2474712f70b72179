import pytest

from ds_aslora import AdapterConfig


def test_defaults_fill_sharelora_share_and_scope():
    cfg = AdapterConfig(method="sharelora")
    assert (cfg.share, cfg.scope) == ("A", "module")
    assert AdapterConfig(r=8, alpha=16).scaling == 2.0


def test_single_target_string_becomes_list():
    assert AdapterConfig(target_modules="q_proj").target_modules == ["q_proj"]
    assert AdapterConfig(target_modules="all-linear").target_modules == "all-linear"


@pytest.mark.parametrize("kwargs, field", [
    ({"method": "dora"}, "method"),
    ({"r": 0}, "r"),
    ({"r": 2.5}, "r"),
    ({"alpha": -1}, "alpha"),
    ({"dropout": 1.0}, "dropout"),
    ({"target_modules": []}, "target_modules"),
    ({"method": "sharelora", "share": "C"}, "share"),
    ({"method": "sharelora", "scope": "all"}, "scope"),
    ({"method": "lora", "share": "A"}, "share"),
    ({"method": "aslora", "scope": "qkv"}, "scope"),
    ({"a_scope": "layer"}, "a_scope"),
    ({"merge_interval": 0}, "merge_interval"),
    ({"merge_candidates": "near"}, "merge_candidates"),
    ({"merge_distance": "cosine"}, "merge_distance"),
    ({"merge_lam": 1.5}, "merge_lam"),
    ({"target_groups": 0}, "target_groups"),
    ({"merge_count": 2, "target_groups": 3}, "merge_count"),
])
def test_impossible_values_are_rejected_with_the_field_name(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdapterConfig(**kwargs)


def test_from_dict_rejects_unknown_keys_and_round_trips():
    with pytest.raises(ValueError, match="lora_alpha"):
        AdapterConfig.from_dict({"method": "lora", "lora_alpha": 16})
    cfg = AdapterConfig(method="aslora", r=4, merge_count=3, merge_distance="effective")
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg

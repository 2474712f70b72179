"""Exact trainable-parameter accounting, and a CLI that needs no weights.

    python -m ds_aslora.adapters.count --model-config path/to/config.json --method sharelora \
        --share A --r 64 --targets all-linear

builds the model on the meta device (no memory, no download), injects LoRA and the chosen
method, and prints both counts; for ASLoRA also the count after k merges per module type.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch
from torch import nn

from .config import AdapterConfig
from .inject import adapter_layers, find_bank, inject_adapters, module_type


def numel(param: torch.Tensor) -> int:
    # ZeRO-3 partitioned parameters are empty locally; ds_numel is the full size.
    return getattr(param, "ds_numel", param.numel())


def count_trainable(model: nn.Module) -> int:
    """Unique trainable parameters: a shared tensor counts once, and an ASLoRA layer tied to
    a representative does not count its own (retired) B."""
    retired = {id(layer.lora_B) for _, layer in adapter_layers(model) if layer.is_tied}
    params = {id(p): p for p in model.parameters() if p.requires_grad}
    bank = find_bank(model)
    if bank is not None:  # under DeepSpeed the bank may be held outside the module tree
        params.update({id(p): p for p in bank.parameters() if p.requires_grad})
    return sum(numel(p) for pid, p in params.items() if pid not in retired)


def count_plain_lora(model: nn.Module) -> int:
    """What peft's LoRA of the same rank on the same targets would train: the yardstick of sharing."""
    return sum(layer.r * (layer.in_features + layer.out_features) for _, layer in adapter_layers(model))


def count_after_merges(model: nn.Module, merges: int) -> int:
    """ASLoRA's count once every module type has had ``merges`` merges (methods.md §1.4):
    each merge retires one B group of r * d_out parameters; one group always remains."""
    per_type: dict[str, list[int]] = {}
    for name, layer in adapter_layers(model):
        if layer.b_key is None and not layer.is_tied:
            per_type.setdefault(module_type(name), []).append(layer.out_features * layer.r)
    removed = sum(sizes[0] * min(merges, len(sizes) - 1) for sizes in per_type.values())
    return count_trainable(model) - removed


def build_on_meta(model_config: str, cfg: AdapterConfig) -> nn.Module:
    """A causal LM from a config.json (file or folder) on the meta device, adapters injected. Built
    through its class, not ``from_config``: inside a ZeRO-3 job (a live ``HfDeepSpeedConfig``) the
    latter wraps construction in ``zero.Init``, which cannot partition meta tensors."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    config = AutoConfig.from_pretrained(model_config)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{model_config!r}: model_type {config.model_type!r} has no causal LM class in transformers")
    with torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    return inject_adapters(model, cfg)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ds_aslora.adapters.count", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", required=True, help="config.json of a HF causal LM (file or folder)")
    parser.add_argument("--method", default="lora", choices=["lora", "sharelora", "aslora"])
    parser.add_argument("--share", choices=["A", "B", "AB"])
    parser.add_argument("--scope", choices=["module", "qkv"])
    parser.add_argument("--a-scope", default="module", choices=["module", "in_dim"])
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["all-linear"],
                        help="module names (e.g. q_proj v_proj) or all-linear")
    parser.add_argument("--merges", type=int, nargs="*", default=[],
                        help="aslora: also print the count after each of these merge counts")
    args = parser.parse_args(argv)
    targets = "all-linear" if args.targets == ["all-linear"] else args.targets
    try:
        lora_cfg = AdapterConfig(method="lora", r=args.r, target_modules=targets)
        cfg = AdapterConfig(method=args.method, r=args.r, target_modules=targets, share=args.share,
                            scope=args.scope, a_scope=args.a_scope)
        lora = count_trainable(build_on_meta(args.model_config, lora_cfg))
        model = build_on_meta(args.model_config, cfg)
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    label = {"sharelora": f"sharelora share={cfg.share} scope={cfg.scope}",
             "aslora": f"aslora a_scope={cfg.a_scope}"}.get(cfg.method, "lora")
    n_layers = len(list(adapter_layers(model)))
    print(f"{type(model).__name__}: {n_layers} adapted modules, r={args.r}, targets={targets}")
    rows = [("lora", lora), (label, count_trainable(model))]
    if cfg.method == "aslora":
        rows += [(f"{label} after {k} merges/type", count_after_merges(model, k)) for k in args.merges]
    for name, value in rows:
        print(f"{name:<44} {value:>15,d}  {100.0 * value / lora:6.2f}% of LoRA")


if __name__ == "__main__":
    main()

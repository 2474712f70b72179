"""Find target Linear modules in a Hugging Face causal LM and wrap them in AdapterLinear.

The sharing plan is decided here, per target, as a pair of bank keys (A, B): None means
a per-layer parameter. Layer order is the order of ``named_modules`` (layer 0 first).
"""
from __future__ import annotations

import re
from typing import Iterator, Optional

from torch import nn

from .bank import SharedBank
from .config import QKV, AdapterConfig
from .layers import AdapterLinear
from .siblings import SIBLING_TYPES, SiblingProjections

BANK_NAME = "shared_bank"
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def module_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj``: the unit of cross-layer sharing."""
    return name.rsplit(".", 1)[-1]


def layer_index(name: str) -> Optional[int]:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def sharing_keys(cfg: AdapterConfig, name: str, linear: nn.Linear) -> tuple[Optional[str], Optional[str]]:
    """Bank keys of (A, B) for one target; None = the layer owns that factor."""
    mtype = module_type(name)
    if cfg.method == "lora":
        return None, None
    if cfg.method == "aslora":
        group = f"in{linear.in_features}" if cfg.a_scope == "in_dim" else mtype
        return f"A_{group}", None
    group = "qkv" if cfg.scope == "qkv" and mtype in QKV else mtype
    return (f"A_{group}" if "A" in cfg.share else None,
            f"B_{group}" if "B" in cfg.share else None)


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def find_targets(model: nn.Module, cfg: AdapterConfig) -> list[tuple[str, nn.Linear]]:
    """Target modules in model order; every listed name must match at least one module."""
    head = _output_head(model)
    found: list[tuple[str, nn.Module]] = []
    unmatched = set() if cfg.target_modules == "all-linear" else set(cfg.target_modules)
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear) or not name:
            continue
        if cfg.target_modules == "all-linear":
            hit = isinstance(module, nn.Linear) and module is not head and module_type(name) != "lm_head"
        else:
            matched = {t for t in cfg.target_modules if name == t or name.endswith("." + t)}
            unmatched -= matched
            hit = bool(matched)
        if hit:
            found.append((name, module))
    linear_types = sorted({module_type(n) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n})
    if unmatched or not found:
        missing = sorted(unmatched) or cfg.target_modules
        raise ValueError(f"target_modules {missing} match no module of {type(model).__name__}; "
                         f"its nn.Linear modules are {linear_types}")
    for name, module in found:
        if type(module) is not nn.Linear:
            raise ValueError(f"target {name} is a {type(module).__name__}; only torch.nn.Linear "
                             f"can be adapted (nn.Linear modules here: {linear_types})")
    return found


def _decoder(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_decoder", None)
    decoder = getter() if callable(getter) else None
    return decoder if isinstance(decoder, nn.Module) else model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Freeze ``model`` and wrap its targets in place; returns the model.

    The SharedBank is registered as ``model.shared_bank`` so that, outside DeepSpeed, every
    trainable tensor appears exactly once in ``model.parameters()``.
    """
    if find_bank(model) is not None:
        raise ValueError("model already has adapters (a shared_bank); inject once")
    targets = find_targets(model, cfg)
    model.requires_grad_(False)
    bank = SharedBank(cfg)
    for name, linear in targets:
        a_key, b_key = sharing_keys(cfg, name, linear)
        layer = AdapterLinear(linear, r=cfg.r, scaling=cfg.scaling, dropout=cfg.dropout,
                              bank=bank, a_key=a_key, b_key=b_key, name=name)
        _set_submodule(model, name, layer)
    model.add_module(BANK_NAME, bank)
    # A forward casts each bank tensor once (bank.ForwardCasts): the model's and, for a trainer that
    # calls the decoder itself (a chunked loss), the decoder's; always_call closes it on an Exception.
    for module in {id(m): m for m in (model, _decoder(model))}.values():
        module.register_forward_pre_hook(bank.casts.start)
        module.register_forward_hook(bank.casts.end, always_call=True)
    link_siblings(model)
    return model


def link_siblings(model: nn.Module, enabled: bool = True) -> None:
    """Let the adapter layers of one parent module that read one input (``SIBLING_TYPES``, same
    input size) compute their low-rank projections together (``siblings.py``); ``enabled=False``
    makes each compute its own. The numbers are the same either way, to float rounding."""
    groups: dict[tuple, list[AdapterLinear]] = {}
    for name, layer in adapter_layers(model):
        kind = next((i for i, types in enumerate(SIBLING_TYPES) if module_type(name) in types), None)
        key = (name.rpartition(".")[0], layer.in_features, kind) if kind is not None else (name,)
        groups.setdefault(key, []).append(layer)
    for members in groups.values():
        siblings = SiblingProjections(members) if enabled and len(members) > 1 else None
        for layer in members:
            layer.siblings = siblings


LIFTED_BANK = "_lifted_shared_bank"


def find_bank(model: nn.Module) -> Optional[SharedBank]:
    """The model's SharedBank, registered or lifted out of the module tree for DeepSpeed."""
    bank = model._modules.get(BANK_NAME) or model.__dict__.get(LIFTED_BANK)
    return bank if isinstance(bank, SharedBank) else None


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """(path, layer) of every adapter layer, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def adapter_config(model: nn.Module) -> AdapterConfig:
    bank = find_bank(model)
    if bank is None:
        raise ValueError(f"{type(model).__name__} has no adapters; call inject_adapters first")
    return bank.config

"""The DeepSpeed shape: per-layer adapters inside the engine, shared tensors replicated.

Per-layer A/B are ordinary engine parameters, so ZeRO partitions their optimizer state
(stages 1-2), gradients (2-3) and values (3). The SharedBank is lifted out of the module
given to ``deepspeed.initialize`` (ZeRO converts every registered parameter, so "not
registered" is the only way to stay replicated, deepspeed-notes §1) and driven beside the
engine by a ``ReplicatedBank``.

One precision and residency policy on every stage:
  - per-layer adapters train like DeepSpeed's own parameters: a working copy in the
    engine's dtype (bf16/fp16) and an fp32 master with the optimizer state. DeepSpeed casts
    a model's parameters itself, except for a model built under ``zero.Init`` (ZeRO-3), whose
    late-added adapters would stay fp32: we cast them here, so stages 2 and 3 train alike;
  - the replicated bank stays fp32 (it is its own master) and is cast per forward;
  - under ZeRO-3 only what a tie must read stays resident: ASLoRA's per-layer B (a merged
    layer reads its representative's B outside its own module). Plain LoRA and ShareLoRA
    tensors are partitioned like any parameter, by DeepSpeed's own threshold.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import deepspeed
import torch
from deepspeed.utils import log_dist
from torch import nn

from ..adapters.bank import SharedBank
from ..adapters.inject import BANK_NAME, LIFTED_BANK, adapter_layers, find_bank, link_siblings
from .bank_optim import bank_optimizer
from .replicated_bank import ReplicatedBank
from .zero3_gather import coalesce_persistent_gather, keep_persistent_resident


def lift_bank(model: nn.Module) -> Optional[SharedBank]:
    """Unregister the SharedBank (layers keep their reference) so ZeRO never sees it."""
    bank = find_bank(model)
    if bank is not None and BANK_NAME in model._modules:
        del model._modules[BANK_NAME]
        model.__dict__[LIFTED_BANK] = bank
    return bank


DS_DEFAULT_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default


def working_dtype(ds_config: dict) -> Optional[torch.dtype]:
    """The dtype DeepSpeed trains parameters in (None: fp32, no cast)."""
    if ds_config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    bf16 = ds_config.get("bf16", ds_config.get("bfloat16", {}))
    return torch.bfloat16 if bf16.get("enabled") is True else None


def cast_adapters(model: nn.Module, dtype: Optional[torch.dtype]) -> None:
    """Per-layer adapter tensors to the working dtype (fp32 master kept by the optimizer)."""
    if dtype is None:
        return
    for _, layer in adapter_layers(model):
        for p in (layer.lora_A, layer.lora_B):
            if p is not None and p.dtype != dtype:
                p.data = p.data.to(dtype)


def tied_bs(model: nn.Module) -> list[nn.Parameter]:
    """Per-layer B tensors that an ASLoRA tie can make another layer read."""
    bank = find_bank(model)
    if bank is None or bank.config.method != "aslora":
        return []
    return [layer.lora_B for _, layer in adapter_layers(model) if layer.lora_B is not None]


def zero3_residency(model: nn.Module, ds_config: dict) -> dict:
    """ZeRO-3: raise ``stage3_param_persistence_threshold`` so every B a tie can read is
    persistent (deepspeed-notes E6). Frozen base tensors no larger than a B become
    persistent with it (norms, at 7B-70B). Nothing changes for LoRA and ShareLoRA."""
    zero = dict(ds_config.get("zero_optimization", {}))
    bs = tied_bs(model)
    if zero.get("stage") != 3 or not bs:
        return ds_config
    largest = max(getattr(b, "ds_numel", b.numel()) for b in bs)
    user = int(zero.get("stage3_param_persistence_threshold", DS_DEFAULT_PERSISTENCE_THRESHOLD))
    if user < largest:
        log_dist(f"ZeRO-3: stage3_param_persistence_threshold raised from {user:,} to {largest:,} so every ASLoRA "
                 f"B stays resident (merged layers read their representative's B)", ranks=[0])
    zero["stage3_param_persistence_threshold"] = max(largest, user)
    return {**ds_config, "zero_optimization": zero}


def check_tied_bs_resident(model: nn.Module) -> None:
    """After ``deepspeed.initialize``: a tie reading a partitioned B would see an empty
    tensor; refuse (e.g. ``stage3_model_persistence_threshold`` capped the persistent set)."""
    missing = [b for b in tied_bs(model) if hasattr(b, "ds_id") and not getattr(b, "ds_persist", False)]
    if missing:
        raise ValueError(f"ZeRO-3 left {len(missing)} ASLoRA B tensors partitioned "
                         f"(e.g. {tuple(missing[0].ds_shape)}); "
                         f"merged layers must read them whole. Raise zero_optimization."
                         f"stage3_model_persistence_threshold (or remove it)")


SHARED_MODES = ("replicated", "engine")


def refuse_reentrant_checkpointing(model: nn.Module) -> None:
    """A shared tensor read inside several reentrant checkpoint segments gets its gradient
    reduced once per segment: ZeRO-2 asserts, ZeRO-3 silently overwrites (deepspeed-notes E2,
    DS#988). Non-reentrant checkpointing (transformers' default) is exact on every stage."""
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and func is not None:
            if getattr(func, "keywords", {}).get("use_reentrant", True):
                raise ValueError("reentrant activation checkpointing cannot train shared adapter tensors "
                                 "correctly under ZeRO; enable it with use_reentrant=False "
                                 "(model.activation_checkpointing_enable() does by default)")


def refuse_unmanaged_accumulation(ds_config: dict) -> None:
    """With ``managed_gradient_accumulation: false`` the engine's accumulation boundary exists
    only inside ``engine.step()``, so the bank's all-reduce (which must run between backward
    and step) would never see it: the shared tensors would freeze."""
    if ds_config.get("managed_gradient_accumulation", True) is False:
        raise ValueError("managed_gradient_accumulation=false is not supported: the shared tensors are reduced "
                         "at the engine's accumulation boundary, before engine.step(); remove the key")


def initialize(model: nn.Module, ds_config: dict, shared_mode: str = "replicated",
               lr_schedule: Optional[Callable[[int], float]] = None) -> tuple[Any, Optional[ReplicatedBank]]:
    """``deepspeed.initialize`` over the per-layer adapters and, per ``shared_mode``, the
    bank replicated beside the engine (``replicated``, the product shape) or registered
    inside it like any parameter (``engine``: exact joint clipping; the reference in tests).
    ``lr_schedule(k)``: the learning rate of optimizer step k (1-based), driven by a torch
    LambdaLR that the engine steps and checkpoints (instead of a DeepSpeed ``scheduler``;
    the bank reads the engine's lr). Returns ``(engine, replicated_bank_or_None)``."""
    if shared_mode not in SHARED_MODES:
        raise ValueError(f"shared_mode must be one of {list(SHARED_MODES)}, got {shared_mode!r}")
    refuse_unmanaged_accumulation(ds_config)
    bank = find_bank(model)
    has_shared = bank is not None and any(True for _ in bank.parameters())
    if has_shared:
        refuse_reentrant_checkpointing(model)
    replicated = shared_mode == "replicated" and has_shared
    if replicated:
        lift_bank(model)
        optimizer = bank_optimizer([p for p in bank.parameters() if p.requires_grad], ds_config.get("optimizer"))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no per-layer adapter parameters to hand to DeepSpeed (sharelora share=AB "
                         "keeps every trainable tensor in the shared bank): use shared_mode='engine'")
    cast_adapters(model, working_dtype(ds_config))
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        # ZeRO-3's module hooks hand each module a fresh detached copy of its input, so siblings never
        # see one tensor: each would lead and project for all (adapters/siblings.py). Per layer, as before.
        link_siblings(model, enabled=False)
    ds_config = zero3_residency(model, ds_config)
    scheduler = None
    if lr_schedule is not None:
        if "scheduler" in ds_config:
            raise ValueError("pass lr_schedule or a DeepSpeed 'scheduler' section, not both")
        base = float(ds_config["optimizer"]["params"]["lr"])

        def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_schedule(i + 1) / base)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config,
                                      lr_scheduler=scheduler)
    check_tied_bs_resident(engine.module)
    coalesce_persistent_gather(engine.optimizer)  # ZeRO-3 only: one post-step all-gather per dtype
    keep_persistent_resident(engine.optimizer)  # ZeRO-3 only: whole after a skipped (fp16 overflow) step too
    if not replicated:
        return engine, None
    bank.to(engine.device)
    max_norm = float(ds_config.get("gradient_clipping", 0.0))
    replicated_bank = ReplicatedBank(bank, engine, optimizer, max_norm=max_norm)
    numel = sum(p.numel() for p in replicated_bank.params)
    clip = (f"clipped by its own grad norm at {max_norm} (the engine clips the per-layer "
            f"tensors separately)" if max_norm > 0 else "not clipped (gradient_clipping is 0)")
    log_dist(f"shared bank: {len(replicated_bank.params)} tensors, {numel:,} parameters, fp32, replicated on every "
             f"rank (broadcast from rank 0), one all-reduce per optimizer step, {type(optimizer).__name__}; {clip}",
             ranks=[0])
    return engine, replicated_bank

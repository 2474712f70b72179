"""The DeepSpeed shape: per-layer adapters inside the engine, shared tensors replicated.

Per-layer A/B are ordinary engine parameters, so ZeRO partitions their optimizer state
(stages 1-2), gradients (2-3) and values (3). The SharedBank is lifted out of the module
given to ``deepspeed.initialize`` (ZeRO converts every registered parameter, so "not
registered" is the only way to stay replicated, deepspeed-notes §1). Its gradients are
flattened and all-reduced once per optimizer step, at the accumulation boundary, and a
private AdamW applies them with the engine's learning rate, only when the engine applied
its own step. Gradient clipping: the engine clips the per-layer adapters by their own norm;
the bank is clipped by *its* norm with the same threshold (``grad_norm`` reports it).
"""
from __future__ import annotations

from typing import Any, Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import log_dist
from torch import nn

from .bank import SharedBank
from .inject import BANK_NAME, LIFTED_BANK, find_bank


def lift_bank(model: nn.Module) -> Optional[SharedBank]:
    """Unregister the SharedBank (layers keep their reference) so ZeRO never sees it."""
    bank = find_bank(model)
    if bank is not None and BANK_NAME in model._modules:
        del model._modules[BANK_NAME]
        model.__dict__[LIFTED_BANK] = bank
    return bank


class ReplicatedBank:
    """Drives the lifted bank beside a DeepSpeed engine. Per micro-step, in this order:
    ``engine.backward(loss); bank.reduce(); engine.step(); bank.step()``."""

    def __init__(self, bank: SharedBank, engine: Any, *, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, max_norm: float = 0.0):
        self.bank, self.engine, self.max_norm = bank, engine, max_norm
        self.params = [p for p in bank.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0, betas=betas, eps=eps, weight_decay=weight_decay)
        self.grad_norm: Optional[float] = None
        self._boundary_lr: Optional[float] = None

    def reduce(self) -> None:
        """After backward: at the accumulation boundary, one all-reduce of every bank grad."""
        if not self.engine.is_gradient_accumulation_boundary():
            return
        # The lr this optimizer step uses; engine.step() advances the scheduler after it.
        self._boundary_lr = self.engine.get_lr()[0]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
            flat.div_(dist.get_world_size())
        offset = 0
        for p in self.params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def step(self) -> None:
        """After ``engine.step()``: update the bank iff the engine applied this step."""
        if self._boundary_lr is None:
            return
        lr, self._boundary_lr = self._boundary_lr, None
        if self.engine.was_step_applied():
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.max_norm > 0:
                self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_norm))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """Bank values and AdamW state (identical on every rank: save rank 0's)."""
        return {"tensors": {k: self.bank.get(k).detach().clone() for k in self.bank.keys()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state["tensors"]) != set(self.bank.keys()):
            raise ValueError(f"checkpoint's shared tensors {sorted(state['tensors'])} do not match this "
                             f"model's {sorted(self.bank.keys())}: different method, targets or scope")
        with torch.no_grad():
            for key, value in state["tensors"].items():
                self.bank.get(key).copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])


def zero3_persistence(model: nn.Module, ds_config: dict) -> dict:
    """Keep every per-layer adapter tensor persistent under ZeRO-3, so re-ties after merges
    never break the parameter-fetch trace (deepspeed-notes E6)."""
    zero = dict(ds_config.get("zero_optimization", {}))
    if zero.get("stage") == 3:
        largest = max((getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad), default=0)
        zero["stage3_param_persistence_threshold"] = max(largest, int(zero.get("stage3_param_persistence_threshold", 0)))
        return {**ds_config, "zero_optimization": zero}
    return ds_config


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


def initialize(model: nn.Module, ds_config: dict,
               shared_mode: str = "replicated") -> tuple[Any, Optional[ReplicatedBank]]:
    """``deepspeed.initialize`` over the per-layer adapters and, per ``shared_mode``, the
    bank replicated beside the engine (``replicated``, the product shape) or registered
    inside it like any parameter (``engine``: exact joint clipping; the reference in tests).
    Returns ``(engine, replicated_bank_or_None)``."""
    if shared_mode not in SHARED_MODES:
        raise ValueError(f"shared_mode must be one of {list(SHARED_MODES)}, got {shared_mode!r}")
    bank = find_bank(model)
    has_shared = bank is not None and any(True for _ in bank.parameters())
    if has_shared:
        refuse_reentrant_checkpointing(model)
    if shared_mode == "replicated":
        lift_bank(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no per-layer adapter parameters to hand to DeepSpeed (sharelora share=AB "
                         "keeps every trainable tensor in the shared bank): use shared_mode='engine'")
    ds_config = zero3_persistence(model, ds_config)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    if shared_mode == "engine" or not has_shared:
        return engine, None
    bank.to(engine.device)
    opt = ds_config.get("optimizer", {}).get("params", {})
    replicated = ReplicatedBank(bank, engine, betas=tuple(opt.get("betas", (0.9, 0.999))),
                                eps=opt.get("eps", 1e-8), weight_decay=opt.get("weight_decay", 0.0),
                                max_norm=float(ds_config.get("gradient_clipping", 0.0)))
    numel = sum(p.numel() for p in replicated.params)
    clip = (f"clipped by its own grad norm at {replicated.max_norm} (the engine clips the per-layer "
            f"tensors separately)" if replicated.max_norm > 0 else "not clipped (gradient_clipping is 0)")
    log_dist(f"shared bank: {len(replicated.params)} tensors, {numel:,} parameters, replicated on every rank, "
             f"one all-reduce per optimizer step; {clip}", ranks=[0])
    return engine, replicated

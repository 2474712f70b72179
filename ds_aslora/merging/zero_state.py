"""Where a per-layer B's fp32 value and Adam moments live under each ZeRO stage.

Two operations, the only ones a merge coordinator needs:
  - ``local(params, where)``: this rank's flat slice of each value (``where[i]`` for
    ``params[i]``), for running means (no communication on any stage, no copy where the stage
    allows, one call per step for every module type);
  - ``merge(upper, lower, lam)``: the representative's fp32 value and both Adam moments
    become the lam blend, the retired tensor's moments become zero, and the working copy
    the forward reads is refreshed on every rank.

Stage 0 (fp32) keeps everything in a torch optimizer on every rank. Stages 1-2 partition
fp32 master and moments into flat fragments that cut parameters anywhere, so a merge
gathers full tensors (``deepspeed.utils.safe_get_full_*``, one all-reduce each). Stage 3
partitions each parameter on its own, so same-shape B slices line up and the blend is done
on local slices with no communication; only the working-copy refresh gathers. The
``safe_*`` functions are collectives and valid only after the first optimizer step and at
an accumulation boundary (deepspeed-notes E7/E8): the coordinator calls ``merge`` there.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .merger import ADAM_MOMENTS, blend_torch_state
from .policy import blend
from .sharded_distance import FlatSlice


class WorkingCopySlices:
    """Stages 0-2: every rank holds the whole working copy, so a running-mean slice is read
    from it (equal to the fp32 master in fp32 training; in bf16 it is what the forward uses)."""

    @staticmethod
    def local(params: list[torch.Tensor], where: list[FlatSlice]) -> list[torch.Tensor]:
        return [w.take(p.detach()).float() for p, w in zip(params, where, strict=True)]


class TorchState(WorkingCopySlices):
    """ZeRO-0 in fp32: ``engine.optimizer`` is the torch optimizer; every rank holds all."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def merge(self, upper: torch.Tensor, lower: torch.Tensor, lam: float) -> None:
        blend_torch_state(upper, lower, self.optimizer, lam)


class FragmentState(WorkingCopySlices):
    """ZeRO-1/2 (and any optimizer wrapper with ``_hp_mapping``): fp32 fragments."""

    @torch.no_grad()
    def merge(self, upper: torch.Tensor, lower: torch.Tensor, lam: float) -> None:
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        value = blend(safe_get_full_fp32_param(upper), safe_get_full_fp32_param(lower), lam)
        safe_set_full_fp32_param(upper, value)  # writes only this rank's fragment
        upper.data.copy_(value.to(upper.dtype))
        for key in ADAM_MOMENTS:
            moment = blend(safe_get_full_optimizer_state(upper, key), safe_get_full_optimizer_state(lower, key), lam)
            safe_set_full_optimizer_state(upper, moment, key)
            safe_set_full_optimizer_state(lower, torch.zeros_like(moment), key)


class Zero3State:
    """ZeRO-3: each B is partitioned on its own into ``ceil(numel / world)`` slices."""

    @staticmethod
    def local(params: list[torch.Tensor], where: list[FlatSlice]) -> list[torch.Tensor]:
        """Views of the fp32 partitions, read where the optimizer keeps them (the accelerator,
        or host memory under optimizer offload): ``safe_get_local_fp32_param`` would copy each
        to the device and synchronise a stream per B (560 times a step at 80 layers x 7 types).
        Falls back to it for optimizer state swapped to NVMe. The coordinator asks for every
        module type's B in one call, so the stream is synchronised once per step."""
        from deepspeed.accelerator import get_accelerator
        from deepspeed.utils import safe_get_local_fp32_param

        for p, w in zip(params, where, strict=True):
            if p.ds_tensor.numel() != w.part:
                raise RuntimeError(f"ZeRO-3 slice of {tuple(p.ds_shape)} has {p.ds_tensor.numel()} elements, "
                                   f"expected {w.part}: the partition group must span every rank")
        optimizer = params[0]._z3_optimizer if params else None
        if optimizer is None or any(optimizer._swappable_optimizer_subgroup(g)
                                    for g in range(len(optimizer.fp32_partitioned_groups_flat))):
            return [safe_get_local_fp32_param(p)[:w.stop - w.start] for p, w in zip(params, where, strict=True)]
        if not get_accelerator().resolves_data_dependency():
            optimizer.reduce_and_partition_stream.synchronize()  # once, not per B
        out = []
        for p, w in zip(params, where, strict=True):
            group, offset, numel = optimizer.grad_position[optimizer.get_param_id(p)]
            flat = optimizer.fp32_partitioned_groups_flat[group]
            out.append(flat.narrow(0, offset, numel)[:w.stop - w.start])
        return out

    @torch.no_grad()
    def merge(self, upper: torch.Tensor, lower: torch.Tensor, lam: float) -> None:
        import deepspeed
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_local_fp32_param,
            safe_get_local_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        safe_set_local_fp32_param(upper, blend(safe_get_local_fp32_param(upper), safe_get_local_fp32_param(lower), lam))
        for key in ADAM_MOMENTS:
            lo = safe_get_local_optimizer_state(lower, key)
            safe_set_local_optimizer_state(upper, blend(safe_get_local_optimizer_state(upper, key), lo, lam), key)
            safe_set_local_optimizer_state(lower, torch.zeros_like(lo), key)
        # The working copy and its partitions from the new fp32 value: gather it, rank 0
        # writes, GatheredParameters broadcasts and re-partitions (freeing the full copy),
        # then the B is gathered again: it is persistent, and the forward of a tied layer
        # reads it without DeepSpeed fetching it.
        value = safe_get_full_fp32_param(upper)
        with deepspeed.zero.GatheredParameters([upper], modifier_rank=0):
            if dist.get_rank() == 0:
                upper.data.copy_(value.to(upper.dtype))
        upper.all_gather()


def gather_fp32(param: torch.Tensor) -> torch.Tensor:
    """The whole fp32 master of an engine parameter, on every rank. A collective under ZeRO
    1-3 (every rank calls it, same order); a plain tensor (stage 0, the replicated bank) is
    its own master."""
    from deepspeed.utils import safe_get_full_fp32_param

    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        return safe_get_full_fp32_param(param).reshape(tuple(getattr(param, "ds_shape", param.shape)))
    return param.detach().float()


def state_access(engine: Any) -> WorkingCopySlices | Zero3State:
    """The accessor for ``engine``'s ZeRO stage and optimizer."""
    stage = engine.zero_optimization_stage()
    if stage == 3:
        return Zero3State()
    params = [p for p in engine.module.parameters() if p.requires_grad]
    if params and hasattr(params[0], "_hp_mapping"):
        return FragmentState()
    if isinstance(engine.optimizer, torch.optim.Optimizer):
        return TorchState(engine.optimizer)
    raise ValueError(f"ASLoRA merges cannot rewrite the optimizer state of {type(engine.optimizer).__name__} "
                     f"at ZeRO stage {stage}: DeepSpeed's half-precision stage-0 optimizers expose no "
                     f"per-parameter state. Use ZeRO stage 1-3 (any precision) or stage 0 in fp32")

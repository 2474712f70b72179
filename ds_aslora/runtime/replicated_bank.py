"""ReplicatedBank: the shared adapter tensors, replicated on every rank beside a DeepSpeed engine.

The bank is kept out of the engine (ZeRO would partition it), so everything the engine does
for its own parameters is done here, the same way:
  - start equal on every rank: the values are broadcast from rank 0 (as DeepSpeed broadcasts
    its parameters), and so is the optimizer state after a checkpoint load;
  - gradients: ONE flat all-reduce per optimizer step at the accumulation boundary, divided
    by the world size and, under fp16, by the engine's loss scale (``engine.backward``
    multiplied the loss by it);
  - update: the optimizer the user configured (``bank_optim``), with the engine's lr, only
    when the engine applied its step (an fp16 overflow skips both);
  - clipping: by the bank's own gradient norm with the engine's threshold.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
from deepspeed.utils import logger

from ..adapters.bank import SharedBank


def loss_scale(engine: Any) -> float:
    """The factor ``engine.backward`` multiplied the loss by (1 unless fp16 loss scaling)."""
    if not engine.fp16_enabled():
        return 1.0
    optimizer = engine.optimizer
    config = getattr(optimizer, "loss_scale_config", None)
    scale = config.cur_scale if config is not None else getattr(optimizer, "cur_scale", None)
    if scale is None:
        raise RuntimeError(f"fp16 is enabled but {type(optimizer).__name__} exposes no loss scale")
    return float(scale)


def broadcast_from_rank0(tensors: list[torch.Tensor], device: torch.device) -> None:
    """Overwrite ``tensors`` in place with rank 0's values: one flat broadcast per dtype,
    on ``device`` (NCCL needs accelerator tensors)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype in sorted(by_dtype, key=str):
        group = by_dtype[dtype]
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        dist.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


class ReplicatedBank:
    """Drives the lifted bank beside a DeepSpeed engine. Per micro-step, in this order:
    ``engine.backward(loss); bank.reduce(); engine.step(); bank.step()`` (``step.micro_step``)."""

    def __init__(self, bank: SharedBank, engine: Any, optimizer: torch.optim.Optimizer, max_norm: float = 0.0):
        self.bank, self.engine, self.optimizer, self.max_norm = bank, engine, optimizer, max_norm
        self.params = [p for p in bank.parameters() if p.requires_grad]
        self.grad_norm: Optional[float] = None
        self.nonfinite_skips = 0
        self._boundary_lr: Optional[float] = None
        self._steps_seen = engine.global_steps
        self.broadcast()

    def broadcast(self) -> None:
        """Rank 0's values and optimizer state on every rank (at start and after a load)."""
        state = [v for s in self.optimizer.state.values() for _, v in sorted(s.items())
                 if isinstance(v, torch.Tensor)]
        broadcast_from_rank0(self.params + state, torch.device(self.engine.device))

    def reduce(self) -> None:
        """After backward: at the accumulation boundary, one all-reduce of every bank grad."""
        if not self.engine.is_gradient_accumulation_boundary():
            return
        # The lr this optimizer step uses; engine.step() advances the scheduler after it.
        self._boundary_lr = self.engine.get_lr()[0]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(flat)
        flat.div_(world * loss_scale(self.engine))
        offset = 0
        for p in self.params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def step(self) -> None:
        """After ``engine.step()``: update the bank iff the engine applied this step."""
        boundary = self.engine.global_steps != self._steps_seen
        self._steps_seen = self.engine.global_steps
        if boundary and self._boundary_lr is None:
            raise RuntimeError("the engine finished an optimizer step but bank.reduce() did not run at its "
                               "accumulation boundary: call engine.backward(loss); bank.reduce(); engine.step(); "
                               "bank.step() in this order (ds_aslora.runtime.step.micro_step does)")
        if not boundary:
            return
        lr, self._boundary_lr = self._boundary_lr, None
        if self.engine.was_step_applied():
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_norm if self.max_norm > 0 else math.inf))
            self.grad_norm = norm
            if math.isfinite(norm):
                self.optimizer.step()
            else:  # identical on every rank: the gradients were all-reduced
                self.nonfinite_skips += 1
                logger.warning(f"shared bank: non-finite gradient norm at step {self.engine.global_steps}; "
                               f"bank update skipped ({self.nonfinite_skips} so far)")
                # The bank's gradient sums every layer's, so it can overflow fp16 where the engine's did not;
                # the engine's scaler never sees it: lower the scale as an overflow of the engine would.
                scaler = getattr(self.engine.optimizer, "loss_scaler", None)
                if self.engine.fp16_enabled() and getattr(scaler, "dynamic", False):
                    scaler.update_scale(True)
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """Bank values and optimizer state (identical on every rank: save rank 0's)."""
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
        self._steps_seen = self.engine.global_steps
        self.broadcast()

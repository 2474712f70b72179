"""AdapterLinear: a frozen ``nn.Linear`` plus a low-rank update whose factors may be shared.

    y = W x + (alpha / r) * B (A dropout(x))          A: (r, d_in), B: (d_out, r)

A and B each come from one of three places: the layer's own parameter (``lora_A`` /
``lora_B``, ZeRO-partitioned under DeepSpeed), the model's ``SharedBank`` (by key), or,
for ASLoRA's merged B groups, the ``lora_B`` of a representative layer reached through a
*non-registered* tie. Ties never add or remove registered parameters, so optimizer and
ZeRO layouts stay fixed across merges (deepspeed-notes E5/E6).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .bank import SharedBank, init_lora_A


def _adapter_dtype(base: nn.Linear) -> torch.dtype:
    # Low-precision bases still get fp32 adapters (peft's autocast_adapter_dtype).
    dtype = base.weight.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class _ZeroUse(torch.autograd.Function):
    """``out`` unchanged, with ``unused`` as an input whose gradient is an exact zero. No arithmetic
    on the gradient: ``(x * 0)`` would reduce it to a scalar first, and a half-precision sum can
    overflow to inf (inf * 0 is NaN: a false fp16 overflow at every step)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
        ctx.unused = (unused.shape, unused.dtype, unused.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype, device = ctx.unused
        return grad, torch.zeros(shape, dtype=dtype, device=device)


class AdapterLinear(nn.Module):
    """Wraps ``base_layer``; dimensions come from ``in_features``/``out_features`` so it
    also works on meta-device and ZeRO-3-partitioned bases (whose weight is empty).

    Args:
        base_layer: the frozen Linear being adapted.
        r, scaling, dropout: rank, alpha / r, adapter-input dropout probability.
        bank: the model's SharedBank.
        a_key, b_key: bank keys of a shared A / B, or None for a per-layer parameter.
    """

    def __init__(self, base_layer: nn.Linear, *, r: int, scaling: float, dropout: float,
                 bank: SharedBank, a_key: Optional[str], b_key: Optional[str], name: str):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r, self.scaling, self.a_key, self.b_key = r, scaling, a_key, b_key
        # Functional dropout, not an nn.Dropout/nn.Identity child (peft's shape): ZeRO-3 hooks
        # every module (fetch, release, trace, backward functions), so a parameterless child
        # costs four hook calls per layer per step; F.dropout is what nn.Dropout calls.
        self.dropout = dropout
        # Plain lists keep these references out of the module tree (no double registration).
        self._bank = [bank]
        self._tie: list[AdapterLinear] = []
        device, dtype = base_layer.weight.device, _adapter_dtype(base_layer)
        a_shape, b_shape = (r, self.in_features), (self.out_features, r)
        for key, shape, zeros in ((a_key, a_shape, False), (b_key, b_shape, True)):
            if key is not None:
                bank.add(key, shape, zeros=zeros, device=device, dtype=dtype, user=name)
        self.lora_A = None if a_key else nn.Parameter(init_lora_A(torch.empty(a_shape, device=device, dtype=dtype)))
        self.lora_B = None if b_key else nn.Parameter(torch.zeros(b_shape, device=device, dtype=dtype))

    @property
    def weight_A(self) -> torch.Tensor:
        return self.lora_A if self.a_key is None else self._bank[0].get(self.a_key)

    @property
    def weight_B(self) -> torch.Tensor:
        """The B this layer uses now: shared, tied to a representative, or its own."""
        if self.b_key is not None:
            return self._bank[0].get(self.b_key)
        return self._tie[0].lora_B if self._tie else self.lora_B

    @property
    def is_tied(self) -> bool:
        return bool(self._tie)

    @property
    def tied_to(self) -> Optional["AdapterLinear"]:
        return self._tie[0] if self._tie else None

    def tie_to(self, representative: Optional["AdapterLinear"]) -> None:
        """Use ``representative``'s B from now on (None unties). Own B stays registered."""
        if representative is not None:
            if self.b_key is not None or representative.b_key is not None:
                raise ValueError("only layers with their own lora_B can be tied")
            if representative.is_tied:
                raise ValueError("a tie must point at an untied representative")
        self._tie[:] = [] if representative is None or representative is self else [representative]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        A, B = self.weight_A, self.weight_B
        # Compute in the dtype of this layer's own (engine-cast) factor; a replicated shared
        # factor kept in fp32 outside DeepSpeed is cast to it.
        own = self.lora_A if self.lora_A is not None else self.lora_B
        dtype = own.dtype if own is not None else x.dtype
        x = x.to(dtype)
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        delta = F.linear(F.linear(x, A.to(dtype)), B.to(dtype))  # (..., r) -> (..., d_out)
        if self._tie:
            # A retired B keeps a zero-weight use: every ZeRO stage then gives it an exact zero
            # gradient (ZeRO-3 would re-apply the last gradient partition of a parameter that
            # stops being used, every step), and ZeRO-3's fetch trace does not change at a merge.
            delta = _ZeroUse.apply(delta, self.lora_B)
        return (result + delta * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, dropout={self.dropout}, "
                f"A={self.a_key or 'own'}, B={self.b_key or 'own'}")

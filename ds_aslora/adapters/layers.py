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
from .siblings import SiblingProjections


def _adapter_dtype(base: nn.Linear) -> torch.dtype:
    # Low-precision bases still get fp32 adapters (peft's autocast_adapter_dtype).
    dtype = base.weight.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _peek(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    # dict.get skips ZeRO-3's ZeROOrderedDict.__getitem__, which in a forward gathers a parameter that
    # is not available and registers it as an external parameter of the running module.
    return dict.get(module._parameters, name)


class _LowRankUpdate(torch.autograd.Function):
    """``result + scaling * projected @ B^T`` as one ``addmm`` and one autograd node (not a
    matmul, a scale and an add, each a pass over the output and a node in the backward).

    ``retired``: a tied layer's own B, given an exact zero gradient. A retired B keeps this
    zero-weight use, so every ZeRO stage gives it a zero gradient (ZeRO-3 would re-apply the last
    gradient partition of a parameter that stops being used, every step) and ZeRO-3's fetch trace
    does not change at a merge. No arithmetic makes that zero: ``(x * 0)`` would reduce a
    half-precision gradient that can overflow to inf, and inf * 0 is NaN."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, projected: torch.Tensor, B: torch.Tensor, scaling: float,
                retired: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(projected, B)
        ctx.scaling = scaling
        ctx.retired = None if retired is None else (retired.shape, retired.dtype, retired.device)
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), projected.reshape(-1, projected.shape[-1]), B.t(),
                           alpha=scaling)
        return flat.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        projected, B = ctx.saved_tensors
        # In the gradient's dtype (autocast may have run the addmm lower than B and the projection),
        # each result back in its input's; the scale on the small operand first, as the unfused
        # graph did, so an fp16 gradient overflows no sooner than it did there.
        flat = grad.reshape(-1, grad.shape[-1])
        grad_projected = grad_B = grad_retired = None
        if ctx.needs_input_grad[1]:
            grad_projected = torch.mm(flat, B.to(grad.dtype) * ctx.scaling).view(projected.shape).to(projected.dtype)
        if ctx.needs_input_grad[2]:
            small = projected.reshape(-1, projected.shape[-1]).to(grad.dtype) * ctx.scaling
            grad_B = torch.mm(flat.t(), small).to(B.dtype)
        if ctx.retired is not None:
            shape, dtype, device = ctx.retired
            grad_retired = torch.zeros(shape, dtype=dtype, device=device)
        return grad, grad_projected, grad_B, None, grad_retired


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
        # Set by link_siblings: the layers of the same parent that may read this layer's input.
        self.siblings: Optional[SiblingProjections] = None
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

    def cast_A(self, dtype: torch.dtype, A: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``A`` (by default ``weight_A``; a sibling passes what it peeked) in ``dtype``: a bank A
        is cast once per forward of the model (``bank.ForwardCasts``)."""
        A = self.weight_A if A is None else A
        return self._bank[0].casts.cast(A, self.a_key, dtype) if self.a_key else A.to(dtype)

    def cast_B(self, dtype: torch.dtype) -> torch.Tensor:
        """``weight_B`` in ``dtype``: a bank B once per forward of the model."""
        B = self.weight_B
        return self._bank[0].casts.cast(B, self.b_key, dtype) if self.b_key else B.to(dtype)

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

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype of this layer's own (engine-cast) factor: a replicated shared factor kept in
        fp32 outside DeepSpeed is cast to it, and so is the input."""
        own = _peek(self, "lora_A")
        own = own if own is not None else _peek(self, "lora_B")
        return own.dtype if own is not None else x.dtype

    def peek_A(self) -> Optional[torch.Tensor]:
        """The A this layer uses, read without ZeRO-3's fetch-on-access: a sibling looks at it
        during another layer's forward (see ``_peek``)."""
        return _peek(self._bank[0], self.a_key) if self.a_key else _peek(self, "lora_A")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        dtype = self.compute_dtype(x)
        if self.dropout > 0 and self.training:
            projected = F.linear(F.dropout(x.to(dtype), self.dropout), self.cast_A(dtype))
        elif self.siblings is not None:
            projected = self.siblings.projection(self, x, dtype)
        else:
            projected = F.linear(x.to(dtype), self.cast_A(dtype))
        retired = self.lora_B if self._tie else None
        out = _LowRankUpdate.apply(result.to(dtype), projected, self.cast_B(dtype), self.scaling, retired)
        return out.to(result.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, dropout={self.dropout}, "
                f"A={self.a_key or 'own'}, B={self.b_key or 'own'}")

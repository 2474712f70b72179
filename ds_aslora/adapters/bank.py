"""SharedBank: the single owner of every adapter tensor that several layers use.

Layers never register a shared tensor themselves; they look it up here by key on every
forward. So a shared tensor is one parameter (counted, optimised and saved once), and the
DeepSpeed layer can lift the whole bank out of the engine-managed module and replicate it.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from .config import AdapterConfig


def init_lora_A(tensor: torch.Tensor) -> torch.Tensor:
    """LoRA's A init, as peft and microsoft/LoRA: kaiming-uniform with a = sqrt(5)."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class _BankCopy(torch.autograd.Function):
    """``source`` read from ``copy``, its working-dtype copy made once per forward. The gradient goes
    back per use, cast to ``source``'s dtype as a cast at each use would: an fp32 bank tensor's
    gradient still sums over the layers in fp32 (one shared cast node would sum them in 16 bit)."""

    @staticmethod
    def forward(ctx: Any, source: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        ctx.dtype = source.dtype
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.dtype), None


class ForwardCasts:
    """Working-dtype copies of bank tensors, kept while one forward of the model runs.

    A replicated bank stays fp32 while the layers run in 16 bit, and every layer reads it: cast at
    each use, a forward runs one cast per layer and autograd saves every copy. Open from the model's
    forward pre-hook to its forward hook, the first use casts and the others read that copy (the
    same numbers and the same gradients, bit for bit). Closed (a layer called alone, an activation
    checkpointing recompute in the backward), each use casts as before. A forward cut by a
    ``BaseException`` other than ``Exception`` (Ctrl-C) leaves it open; the next forward clears it."""

    def __init__(self) -> None:
        self.open = False
        self._copies: dict[tuple, tuple[tuple, torch.Tensor]] = {}  # slot -> (the source's stamp, copy)

    def start(self, *_: Any) -> None:
        self._copies.clear()
        self.open = True

    def end(self, *_: Any) -> None:
        self._copies.clear()
        self.open = False

    def cast(self, tensor: torch.Tensor, key: str, dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` (the bank's ``key``) in ``dtype``."""
        if (torch.compiler.is_compiling()  # first: the compiler fuses casts itself, and must not guard on `open`
                or tensor.dtype == dtype or not self.open
                or hasattr(tensor, "ds_id")  # ZeRO-3 manages it
                or tensor.is_inference()):  # no version counter (adapters made under inference_mode)
            return tensor.to(dtype)
        slot, stamp = (key, dtype, torch.is_inference_mode_enabled()), (tensor._version, tensor.data_ptr())
        held = self._copies.get(slot)
        if held is None or held[0] != stamp:
            with torch.no_grad():
                held = self._copies[slot] = (stamp, tensor.to(dtype))
        copy = held[1]
        return _BankCopy.apply(tensor, copy) if tensor.requires_grad and torch.is_grad_enabled() else copy

    def __getstate__(self) -> dict:
        return {"open": False, "_copies": {}}  # copies (deepcopy, pickle) start closed and empty


class SharedBank(nn.Module):
    """Parameters keyed by sharing group, e.g. ``A_q_proj`` (ShareA, ASLoRA), ``A_qkv``
    (ShareLoRA's self-attention scope), ``A_in4096`` (ASLoRA's per-input-dim A) or
    ``B_v_proj`` (ShareB). Holds the adapter config so a model carries its own recipe."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.casts = ForwardCasts()  # opened and closed by hooks on the adapted model (inject_adapters)

    def add(self, key: str, shape: tuple[int, int], *, zeros: bool, device: torch.device,
            dtype: torch.dtype, user: str) -> None:
        """Create ``key`` on first use; later users must agree on its shape."""
        existing: Optional[nn.Parameter] = self._parameters.get(key)
        if existing is not None:
            have = tuple(getattr(existing, "ds_shape", existing.shape))
            if have != tuple(shape):
                raise ValueError(
                    f"cannot share {key}: module {user} needs shape {tuple(shape)} but the "
                    f"shared tensor has {have} (e.g. share=B with scope=qkv on a model whose "
                    f"k/v projections are narrower than q under grouped-query attention)")
            return
        tensor = torch.empty(shape, device=device, dtype=dtype)
        nn.init.zeros_(tensor) if zeros else init_lora_A(tensor)
        self.register_parameter(key, nn.Parameter(tensor))

    def get(self, key: str) -> torch.Tensor:
        # Attribute access (not a cached reference) so ZeRO-3 can gather on use.
        return getattr(self, key)

    def keys(self) -> list[str]:
        return list(self._parameters)

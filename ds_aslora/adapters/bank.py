"""SharedBank: the single owner of every adapter tensor that several layers use.

Layers never register a shared tensor themselves; they look it up here by key on every
forward. So a shared tensor is one parameter (counted, optimised and saved once), and the
DeepSpeed layer can lift the whole bank out of the engine-managed module and replicate it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .config import AdapterConfig


def init_lora_A(tensor: torch.Tensor) -> torch.Tensor:
    """LoRA's A init, as peft and microsoft/LoRA: kaiming-uniform with a = sqrt(5)."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class SharedBank(nn.Module):
    """Parameters keyed by sharing group, e.g. ``A_q_proj`` (ShareA, ASLoRA), ``A_qkv``
    (ShareLoRA's self-attention scope), ``A_in4096`` (ASLoRA's per-input-dim A) or
    ``B_v_proj`` (ShareB). Holds the adapter config so a model carries its own recipe."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config

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

"""What an adapted model holds, tensor by tensor, and what ZeRO-3 keeps resident of it.

Read from a model on the meta device: sizes are exact, no weights are needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..adapters.count import numel
from ..adapters.inject import BANK_NAME, adapter_config

DEEPSPEED_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold when unset


# ----------------------------------------------------------------------------------------------
# What the model holds


@dataclass(frozen=True)
class TensorInfo:
    name: str
    numel: int
    kind: str  # "frozen" | "lora_A" | "lora_B" | "bank"


@dataclass(frozen=True)
class Inventory:
    """Every parameter of an adapted model, sorted by who owns it at training time."""

    method: str
    frozen: tuple[TensorInfo, ...]
    adapters: tuple[TensorInfo, ...]  # per-layer lora_A / lora_B: DeepSpeed engine parameters
    bank: tuple[TensorInfo, ...]      # SharedBank tensors
    largest_module_params: int        # DeepSpeed's "largest layer": most params held by one module itself

    @property
    def frozen_numel(self) -> int:
        return sum(t.numel for t in self.frozen)

    @property
    def adapter_numel(self) -> int:
        return sum(t.numel for t in self.adapters)

    @property
    def bank_numel(self) -> int:
        return sum(t.numel for t in self.bank)

    @property
    def largest_b(self) -> int:
        return max((t.numel for t in self.adapters if t.kind == "lora_B"), default=0)


def inventory(model: nn.Module) -> Inventory:
    """Classify every parameter of a freshly adapted model (meta device is fine)."""
    cfg = adapter_config(model)
    frozen, adapters, bank = [], [], []
    for name, p in model.named_parameters():
        n = numel(p)
        if name.startswith(BANK_NAME + "."):
            bank.append(TensorInfo(name, n, "bank"))
        elif p.requires_grad:
            kind = name.rsplit(".", 1)[-1]
            if kind not in ("lora_A", "lora_B"):
                raise ValueError(f"unexpected trainable parameter {name}: inject_adapters freezes the base model")
            adapters.append(TensorInfo(name, n, kind))
        else:
            frozen.append(TensorInfo(name, n, "frozen"))
    largest = max((sum(numel(p) for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return Inventory(cfg.method, tuple(frozen), tuple(adapters), tuple(bank), largest)


# ----------------------------------------------------------------------------------------------
# ZeRO-3 persistence


def effective_persistence_threshold(inv: Inventory, threshold: Optional[int] = None) -> int:
    """The stage3_param_persistence_threshold the engine runs with: the user's (DeepSpeed's 1e5
    when unset), raised for ASLoRA to the largest per-layer B so that every B stays whole."""
    user = DEEPSPEED_PERSISTENCE_THRESHOLD if threshold is None else int(threshold)
    return max(user, inv.largest_b) if inv.method == "aslora" else user


def is_persistent(t: TensorInfo, method: str, threshold: int) -> bool:
    return (method == "aslora" and t.kind == "lora_B") or t.numel <= threshold


def zero3_resident_adapter_numel(model: nn.Module, threshold: Optional[int] = None, *,
                                 every_adapter: bool = False) -> int:
    """Per-layer adapter elements ZeRO-3 keeps whole on every GPU (persistent).

    ``every_adapter=True`` gives the previous behaviour, where the engine raised the threshold
    to the largest adapter tensor and every one of them stayed whole."""
    inv = inventory(model)
    if every_adapter:
        return inv.adapter_numel
    limit = effective_persistence_threshold(inv, threshold)
    return sum(t.numel for t in inv.adapters if is_persistent(t, inv.method, limit))


def zero3_resident_adapter_bytes(model: nn.Module, dtype_bytes: int, threshold: Optional[int] = None, *,
                                 every_adapter: bool = False) -> int:
    """Bytes of persistent adapter working copies on every GPU under ZeRO-3: the same on every
    rank whatever the world size, which is why it decides what fits at 70B."""
    return dtype_bytes * zero3_resident_adapter_numel(model, threshold, every_adapter=every_adapter)


def engine_numel(inv: Inventory, shared_mode: str) -> int:
    """Trainable elements DeepSpeed holds (and reduces): the per-layer adapters, plus the shared bank
    when it is registered in the engine."""
    return inv.adapter_numel + (inv.bank_numel if shared_mode == "engine" else 0)


def bucket_size(hidden_size: int, engine_numel: Optional[int]) -> int:
    """``reduce_bucket_size`` / ``allgather_bucket_size`` for ``"auto"``: the HF integration's
    hidden_size^2, but never more than the trainable elements DeepSpeed holds. Each bucket is a
    buffer (two with overlap_comm): a fixed 5e8 is 2 GB of bf16 per GPU for tens of MB of adapters.
    Rounded up to a multiple of 8."""
    square = hidden_size * hidden_size
    size = min(square, engine_numel) if engine_numel is not None else square
    return max(8, -(-size // 8) * 8)  # DeepSpeed asserts an even allgather bucket; 8 keeps buffers aligned

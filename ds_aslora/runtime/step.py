"""One micro-step of a DeepSpeed adapter job, in the order that keeps every piece exact."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..merging.coordinator import MergeCoordinator
from ..merging.policy import Merge
from .replicated_bank import ReplicatedBank


def micro_step(engine: Any, batch: dict, bank: Optional[ReplicatedBank] = None,
               merger: Optional[MergeCoordinator] = None) -> tuple[torch.Tensor, list[Merge]]:
    """Forward and backward; at the accumulation boundary the bank's one all-reduce before
    the engine steps, the bank's own step after it (only if the engine applied its step),
    then merges (once per applied step). Returns the detached loss and the merges applied."""
    loss = engine(**batch).loss
    engine.backward(loss)
    if bank is not None:
        bank.reduce()
    engine.step()
    if bank is not None:
        bank.step()
    plan = merger.after_step() if merger is not None else []
    return loss.detach(), plan

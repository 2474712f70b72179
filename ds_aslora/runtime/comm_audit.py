"""Count the collectives (and bytes) a training step issues, by who issued them.

A thin wrapper over ``torch.distributed``: every collective DeepSpeed or we call goes
through these functions on CPU/gloo and GPU/NCCL alike. DeepSpeed reaches them three ways
(``torch.distributed.X``, ``distributed_c10d.X``, and the all-gather / reduce-scatter
functions its comm backend stored at init), so all three are wrapped. Each call is
recorded with its op, its payload bytes and its source (``ds_aslora`` when our code issued it, else
``deepspeed``/``torch``), so tests can assert "the shared bank costs one all-reduce per
step" and benchmarks can print bytes per step.
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all_single", "all_gather_object",
               "broadcast_object_list", "barrier")


def _payload(args, kwargs) -> int:
    """Bytes of the first tensor argument, else of the first tensor inside a list argument."""
    values = (*args, *kwargs.values())
    lists = (t for a in values if isinstance(a, (list, tuple)) for t in a)
    tensor = next((t for t in (*values, *lists) if isinstance(t, torch.Tensor)), None)
    return tensor.numel() * tensor.element_size() if tensor is not None else 0


def _source() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("ds_aslora") and not module.endswith("comm_audit"):
            return "ds_aslora"
        if module.startswith("deepspeed"):
            return "deepspeed"
        frame = frame.f_back
    return "torch"


@dataclass
class CommRecord:
    calls: list[tuple[str, str, int]] = field(default_factory=list)  # (source, op, bytes)

    def count(self, source: str | None = None, op: str | None = None) -> int:
        return sum(1 for s, o, _ in self.calls if source in (None, s) and op in (None, o))

    def bytes(self, source: str | None = None) -> int:
        return sum(b for s, _, b in self.calls if source in (None, s))

    def summary(self) -> dict[str, int]:
        return dict(Counter(f"{s}.{o}" for s, o, _ in self.calls))


@contextlib.contextmanager
def audit_collectives() -> Iterator[CommRecord]:
    """Within the block, record every torch.distributed collective this process issues."""
    from torch.distributed import distributed_c10d

    record = CommRecord()
    # (owner, attribute, op name) of every entry point to wrap
    targets = [(module, name, name) for module in (dist, distributed_c10d) for name in COLLECTIVES
               if hasattr(module, name)]
    backend = _deepspeed_backend()
    if backend is not None:
        targets += [(backend, "all_gather_function", "all_gather_into_tensor"),
                    (backend, "reduce_scatter_function", "reduce_scatter_tensor")]
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]

    def wrap(name, fn):
        def counted(*args, **kwargs):
            record.calls.append((_source(), name, _payload(args, kwargs)))
            return fn(*args, **kwargs)
        return counted

    for (owner, attr, op), (_, _, fn) in zip(targets, originals, strict=True):
        if fn is not None:
            setattr(owner, attr, wrap(op, fn))
    try:
        yield record
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)


def _deepspeed_backend():
    try:
        from deepspeed.comm import comm
    except ImportError:
        return None
    return getattr(comm, "cdb", None)

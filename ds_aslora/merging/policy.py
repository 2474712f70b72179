"""ASLoRA's adaptive B merging as pure, single-process decisions (no tensors of the model).

Per module type, layers 0..L-1 start in their own B group. A group is a set of layer
positions represented by its top layer (the "upper" one). At an event the policy takes
the squared-distance matrix between the groups' running means, computed by whoever holds
the data (one process here, a collective across ranks later), and returns which groups
merge. The arithmetic every applier must share (running means, distances, lam blend) lives
here too, so single-process and multi-rank appliers cannot drift apart.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..adapters.config import AdapterConfig
from .schedule import MergeSchedule, ParamCounts, build_schedule, contiguous_blocks, final_groups


@dataclass(frozen=True)
class Merge:
    """Group ``lower`` (layer positions) folds into group ``upper``; ``upper[-1]`` stays the
    representative. ``distance`` is the Frobenius distance that chose the pair."""

    module_type: str
    upper: tuple[int, ...]
    lower: tuple[int, ...]
    distance: float
    step: int

    @property
    def representative(self) -> int:
        return self.upper[-1]

    @property
    def retired(self) -> int:
        return self.lower[-1]


def update_running_means(means: list[torch.Tensor], values: list[torch.Tensor], count: int) -> None:
    """In place, all at once (one foreach kernel, not one launch per B): each mean becomes the
    cumulative mean of ``count`` observations, the last being the matching value."""
    if means:
        torch._foreach_lerp_(means, [v.to(m.dtype) for m, v in zip(means, values, strict=True)], 1.0 / count)


def blend(upper: torch.Tensor, lower: torch.Tensor, lam: float) -> torch.Tensor:
    """The merged value: ``lam * upper + (1 - lam) * lower`` (values, running means and
    both Adam moments all use it)."""
    return upper * lam + lower * (1.0 - lam)


def squared_distances(means: list[torch.Tensor], gram: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``D[i, j] = ||m_i - m_j||_F^2`` (raw) or ``||(m_i - m_j) A||_F^2`` with ``gram = A A^T``
    (effective). Means may be matching row blocks of the full matrices: the result is then
    a partial sum, to be summed across the blocks."""
    n = len(means)
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            diff = means[i].double() - means[j].double()
            value = (diff @ gram.double() * diff).sum() if gram is not None else diff.pow(2).sum()
            out[i, j] = out[j, i] = value
    return out


class MergePolicy:
    """Schedule, candidates, choice and tie map of ASLoRA merges for each module type.

    Args:
        cfg: the adapter config (merge_* knobs).
        num_layers: module type -> number of layers that own a B of that type.
        total_steps: the run's optimizer steps (None: unknown; the schedule must then be given in
            steps with a merge_interval).
        counts: the model's parameter counts (``schedule.param_counts``), for ``target_ratio``.
    """

    def __init__(self, cfg: AdapterConfig, num_layers: dict[str, int], total_steps: Optional[int] = None,
                 counts: Optional[ParamCounts] = None):
        self.cfg = cfg
        self.num_layers = dict(num_layers)
        self.total_steps, self.counts = total_steps, counts
        self.groups: dict[str, list[tuple[int, ...]]] = {
            mtype: [(i,) for i in range(n)] for mtype, n in num_layers.items()}
        if cfg.merge_grouping == "static":  # the target's groups from the start: blocks, not merges
            final = final_groups(cfg, self.num_layers, counts)
            self.groups = {mtype: contiguous_blocks(n, final[mtype]) for mtype, n in num_layers.items()}
        self.history: list[Merge] = []
        self._schedule: Optional[MergeSchedule] = None
        if total_steps is not None:  # fixed now: one that cannot reach its target fails before any step
            self._schedule = build_schedule(cfg, self.num_layers, total_steps, counts)

    # -- schedule ---------------------------------------------------------------------
    @property
    def schedule(self) -> MergeSchedule:
        """Built on first use (``ScheduleError`` if it cannot be), then fixed: a checkpoint keeps it."""
        if self._schedule is None:
            self._schedule = build_schedule(self.cfg, self.num_layers, self.total_steps, self.counts)
        return self._schedule

    def merges_left(self, mtype: str) -> int:
        """Merges of this module type before the target (which needs no run length)."""
        final = (self._schedule.final_groups if self._schedule is not None
                 else final_groups(self.cfg, self.num_layers, self.counts))
        return max(0, len(self.groups[mtype]) - final[mtype])

    def due(self, step: int) -> int:
        """Merges per module type due at ``step`` (1-based count of applied optimizer steps)."""
        if not any(self.merges_left(m) > 0 for m in self.groups):
            return 0
        return self.schedule.merges_at(step)

    def is_event(self, step: int) -> bool:
        return self.due(step) > 0

    # -- decisions --------------------------------------------------------------------
    def representatives(self, mtype: str) -> list[int]:
        """Layer position of each live group's representative, in group order."""
        return [group[-1] for group in self.groups[mtype]]

    def candidate_pairs(self, mtype: str) -> list[tuple[int, int]]:
        """(lower, upper) group indices: neighbours only, or every pair."""
        n = len(self.groups[mtype])
        if self.cfg.merge_candidates == "adjacent":
            return [(i, i + 1) for i in range(n - 1)]
        return [(i, j) for i in range(n) for j in range(i + 1, n)]

    def plan(self, step: int, sq_distances: dict[str, torch.Tensor], due: Optional[int] = None) -> list[Merge]:
        """Merges for this event (``due`` per module type; default: the schedule's at ``step``): per
        module type, the closest candidate pairs in order (ties -> lower layers first), each group
        used at most once per event."""
        due = self.due(step) if due is None else due
        plan: list[Merge] = []
        for mtype in sorted(self.groups):
            budget = min(due, self.merges_left(mtype))
            if budget == 0:
                continue
            dist = sq_distances[mtype]
            groups, pairs = self.groups[mtype], self.candidate_pairs(mtype)
            if dist.shape != (len(groups), len(groups)) or not all(torch.isfinite(dist[p]) for p in pairs):
                raise ValueError(f"{mtype}: need a {len(groups)}x{len(groups)} distance matrix, finite "
                                 f"at every candidate pair, got shape {tuple(dist.shape)}")
            order = sorted(pairs, key=lambda p: (float(dist[p]), groups[p[0]][-1], groups[p[1]][-1]))
            used: set[int] = set()
            for lo, up in order:
                if len(used) == 2 * budget:
                    break
                if lo in used or up in used:
                    continue
                used.update((lo, up))
                plan.append(Merge(mtype, groups[up], groups[lo], float(dist[lo, up]) ** 0.5, step))
        return plan

    def apply(self, plan: list[Merge]) -> None:
        for merge in plan:
            groups = self.groups[merge.module_type]
            groups.remove(merge.upper)
            groups.remove(merge.lower)
            # Groups are ordered by representative, so the upper one holds the merged maximum.
            groups.append(tuple(sorted(merge.upper + merge.lower)))
            groups.sort(key=lambda g: g[-1])
            self.history.append(merge)

    # -- bookkeeping ------------------------------------------------------------------
    def tie_map(self, mtype: str) -> list[int]:
        """Layer position -> position of the representative whose B it uses."""
        out = list(range(self.num_layers[mtype]))
        for group in self.groups[mtype]:
            for pos in group:
                out[pos] = group[-1]
        return out

    def live_groups(self) -> dict[str, int]:
        return {mtype: len(groups) for mtype, groups in self.groups.items()}

    def state_dict(self) -> dict:
        return {"groups": {m: [list(g) for g in gs] for m, gs in self.groups.items()},
                "history": [asdict(m) for m in self.history],
                "schedule": self._schedule.state_dict() if self._schedule is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if set(state["groups"]) != set(self.groups):
            raise ValueError(f"merge state is for module types {sorted(state['groups'])}, "
                             f"this model has {sorted(self.groups)}")
        self.groups = {m: [tuple(g) for g in gs] for m, gs in state["groups"].items()}
        self.history = [Merge(**{**m, "upper": tuple(m["upper"]), "lower": tuple(m["lower"])})
                        for m in state["history"]]
        if state.get("schedule") is not None:  # a resumed run keeps the schedule it started with
            self._schedule = MergeSchedule.from_state_dict(state["schedule"])

"""ASLoRA's merge schedule, fixed once per run from its goal: which steps merge, and how many.

The user says where merging should end (``target_groups``, ``target_ratio``, ``merge_count``, or
one B group per module type by default) and the window to merge in (``merge_start``,
``merge_end``: an integer step, or a float fraction of the run). The schedule spreads the merges the
target needs evenly over the window: one event per merge when the window has the steps, several
merges per event otherwise. An explicit ``merge_interval`` and/or ``merges_per_event`` keep their
meaning; when they cannot reach the target by the window's end, ``ScheduleError`` says so in one
line, with a value that would. Without the run's length (a bare ``LocalMerger``), only steps can
be given and events continue every ``merge_interval`` steps until the target is reached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

from torch import nn

from ..adapters.config import AdapterConfig
from ..adapters.count import count_plain_lora, count_trainable
from ..adapters.inject import adapter_config, adapter_layers, module_type

Step = Union[int, float]


class ScheduleError(ValueError):
    """The schedule asked for cannot be built or cannot reach its target; one line for the user."""


@dataclass(frozen=True)
class ParamCounts:
    """What ``target_ratio`` needs: trainable parameters that merging never removes (the shared
    A's), one B's size per module type, and plain LoRA's count on the same targets."""

    fixed: int
    b_numel: dict[str, int]
    lora: int

    def live(self, groups: dict[str, int]) -> int:
        return self.fixed + sum(self.b_numel[m] * n for m, n in groups.items())


@dataclass(frozen=True)
class MergeSchedule:
    """Event steps and the merges per module type at each; ``final_groups`` per module type."""

    events: tuple[tuple[int, int], ...]  # (step, merges per module type), steps increasing
    final_groups: dict[str, int]
    # No run length: (merge_start, merge_interval, merges_per_event), events until the target
    every: Optional[tuple[int, int, int]] = None
    static: bool = False  # the final groups are fixed blocks from the first step (merge_grouping=static)

    @property
    def bounded(self) -> bool:
        return self.every is None

    def merges_at(self, step: int) -> int:
        if self.every is not None:
            start, interval, per_event = self.every
            return per_event if step > start and (step - start) % interval == 0 else 0
        return dict(self.events).get(step, 0)

    def describe(self, num_layers: dict[str, int], counts: Optional[ParamCounts] = None) -> str:
        """One line for the start of a run (and TensorBoard)."""
        if not self.bounded:
            return f"ASLoRA schedule: unbounded (no run length), down to {_groups(self.final_groups)} B groups"
        total = sum(n - self.final_groups[m] for m, n in num_layers.items())
        if self.static:
            text = (f"ASLoRA static grouping: {_groups(self.final_groups)} blocks of contiguous layers per module "
                    "type share a B from the first step (no merges)")
        elif not self.events:
            text = "ASLoRA schedule: no merges"
        else:
            steps = [s for s, _ in self.events]
            per = sorted({k for _, k in self.events})
            each = f"{per[0]}-{per[-1]} merges" if len(per) > 1 else f"{per[0]} merge{'s' if per[0] > 1 else ''}"
            text = (f"ASLoRA schedule: {len(steps)} merge events from step {steps[0]} to {steps[-1]} ({each} per "
                    f"module type at each, {total} in all), ending at {_groups(self.final_groups)} B groups per "
                    "module type")
        if counts is not None:
            live = counts.live(self.final_groups)
            text += f", {live:,} trainable = {live / counts.lora:.1%} of LoRA's"
        return text

    def state_dict(self) -> dict:
        return {"events": [list(e) for e in self.events], "final_groups": dict(self.final_groups),
                "every": list(self.every) if self.every is not None else None, "static": self.static}

    @classmethod
    def from_state_dict(cls, state: dict) -> "MergeSchedule":
        every = state["every"]
        return cls(tuple((int(s), int(k)) for s, k in state["events"]), dict(state["final_groups"]),
                   tuple(int(v) for v in every) if every is not None else None, bool(state.get("static", False)))


def contiguous_blocks(layers: int, groups: int) -> list[tuple[int, ...]]:
    """``layers`` positions cut into ``groups`` contiguous blocks whose sizes differ by at most one
    (the larger ones first)."""
    size, extra = divmod(layers, groups)
    out, start = [], 0
    for k in range(groups):
        stop = start + size + (k < extra)
        out.append(tuple(range(start, stop)))
        start = stop
    return out


def owners_by_type(model: nn.Module) -> dict[str, int]:
    """Module type -> layers that own a B of that type (the groups merging starts from)."""
    owners: dict[str, int] = {}
    for name, layer in adapter_layers(model):
        if layer.b_key is None:
            owners[module_type(name)] = owners.get(module_type(name), 0) + 1
    return owners


def model_schedule(model: nn.Module, total_steps: Optional[int]) -> MergeSchedule:
    """The schedule an ASLoRA model (meta device is fine) gets in a run of ``total_steps``."""
    return build_schedule(adapter_config(model), owners_by_type(model), total_steps, param_counts(model))


def param_counts(model: nn.Module) -> ParamCounts:
    """The counts ``target_ratio`` needs, from an ASLoRA model (meta device is fine)."""
    b_numel: dict[str, int] = {}
    owners = owners_by_type(model)
    for name, layer in adapter_layers(model):
        if layer.b_key is None:
            b_numel[module_type(name)] = layer.r * layer.out_features
    fixed = count_trainable(model) - sum(b_numel[m] * n for m, n in owners.items())
    return ParamCounts(fixed=fixed, b_numel=b_numel, lora=count_plain_lora(model))


def _groups(final: dict[str, int]) -> str:
    values = sorted(set(final.values()))
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def resolve_step(value: Step, total: Optional[int]) -> Optional[int]:
    """An integer is a step; a float is a fraction of the run's ``total`` steps (rounded half up),
    None when there is no run length to apply it to."""
    if isinstance(value, float):
        return None if total is None else math.floor(value * total + 0.5)
    return value


def final_groups(cfg: AdapterConfig, num_layers: dict[str, int],
                 counts: Optional[ParamCounts] = None) -> dict[str, int]:
    """B groups per module type at the end of merging."""
    if cfg.merge_count is not None:
        return {m: max(1, n - cfg.merge_count) for m, n in num_layers.items()}
    if cfg.target_groups is not None:
        return {m: min(n, cfg.target_groups) for m, n in num_layers.items()}
    if cfg.target_ratio is not None:
        if counts is None:
            raise ScheduleError("target_ratio needs the model's parameter counts")
        for g in range(max(num_layers.values()), 0, -1):
            groups = {m: min(n, g) for m, n in num_layers.items()}
            if counts.live(groups) <= cfg.target_ratio * counts.lora:
                return groups
        floor = counts.live({m: 1 for m in num_layers}) / counts.lora
        raise ScheduleError(f"target_ratio={cfg.target_ratio} is below what ASLoRA can reach on this model: "
                            f"{floor:.2%} of LoRA's parameters at one B group per module type")
    return {m: 1 for m in num_layers}


def deliverable(live: int, candidates: str) -> int:
    """Merges one event can always make among ``live`` groups. Its pairs are disjoint and taken
    closest first, so they form a maximal matching: with any two groups as candidates it leaves at
    most one group out; with neighbours only, each taken pair blocks at most two others."""
    if live < 2:
        return 0
    return live // 2 if candidates == "all" else -(-(live - 1) // 3)


def _delivered(sizes: list[int], num_layers: dict[str, int], final: dict[str, int], candidates: str) -> bool:
    """Can every module type make events of these sizes, in order, until its target?"""
    for mtype, live in num_layers.items():
        left = live - final[mtype]
        for size in sizes:
            take = min(size, left)
            if take > deliverable(live, candidates):
                return False
            live, left = live - take, left - take
    return True


def _most(live: int, events: int, candidates: str) -> int:
    """The most merges ``events`` events can always make from ``live`` groups (each takes all it can)."""
    total = 0
    for _ in range(events):
        take = deliverable(live, candidates)
        total, live = total + take, live - take
    return total


def _shares(merges: int, n: int, groups: int, candidates: str) -> Optional[list[int]]:
    """``merges`` in ``n`` events, as even as each event can deliver: an event takes its even share
    of what is left, more when the later events (with fewer groups, each able to merge fewer)
    could not make the rest, never more than it can make. None if ``n`` events cannot."""
    sizes, live = [], groups
    for k in range(n):
        left = n - k - 1
        size = -(-merges // (n - k))
        while size <= deliverable(live, candidates) and merges - size > _most(live - size, left, candidates):
            size += 1
        if size > deliverable(live, candidates):
            return None
        sizes.append(size)
        merges, live = merges - size, live - size
    return sizes if merges == 0 else None


def _even_steps(steps: int, n: int, start: int) -> list[int]:
    """``n`` evenly spaced steps after ``start``, the last at ``start + steps``."""
    return [start + math.ceil((k + 1) * steps / n) for k in range(n)]


def _fill(steps: list[int], per: int, merges: int) -> tuple[tuple[int, int], ...]:
    """``per`` merges at each of ``steps`` in turn until ``merges`` are placed."""
    out = []
    for step in steps:
        if merges == 0:
            break
        out.append((step, min(per, merges)))
        merges -= out[-1][1]
    return tuple(out)


def _spread(steps: int, merges: int, start: int, groups: int, candidates: str,
            fits: Callable[[list[int]], bool]) -> tuple[tuple[int, int], ...]:
    """``merges`` over the ``steps`` steps after ``start``: evenly spaced events ending at the
    window's last step, as few as every event can deliver and at most one per step."""
    for n in range(min(merges, steps), steps + 1):
        sizes = _shares(merges, n, groups, candidates)
        if sizes is not None and fits(sizes):
            return tuple(zip(_even_steps(steps, n, start), sizes, strict=True))
    raise ScheduleError(f"{merges} merges per module type do not fit in a merge window of {steps} steps (an event "
                        f"merges disjoint pairs of groups, as few as a third of them): widen it (merge_start, "
                        f"merge_end) or aim at more groups (target_groups, target_ratio)")


def build_schedule(cfg: AdapterConfig, num_layers: dict[str, int], total_steps: Optional[int] = None,
                   counts: Optional[ParamCounts] = None) -> MergeSchedule:
    """The schedule of a run of ``total_steps`` optimizer steps (None: unknown, see the module
    docstring); ``ScheduleError`` when the numbers given cannot work."""
    final = final_groups(cfg, num_layers, counts)
    if cfg.merge_grouping == "static":
        return MergeSchedule((), final, static=True)
    needed = max((n - final[m] for m, n in num_layers.items()), default=0)
    start = resolve_step(cfg.merge_start, total_steps)
    end = resolve_step(cfg.merge_end, total_steps)
    if total_steps is None:
        if start is None or cfg.merge_interval is None:
            raise ScheduleError(f"merge_start={cfg.merge_start}, merge_end={cfg.merge_end}, merge_interval="
                                f"{cfg.merge_interval}: a schedule spread over a fraction of the run needs the "
                                "run's length (total_steps); without it give merge_start as a step and a "
                                "merge_interval")
        return MergeSchedule((), final, every=(start, cfg.merge_interval, cfg.merges_per_event or 1))
    if not 0 <= start < end <= total_steps:
        raise ScheduleError(f"the merge window, steps {start} to {end} (merge_start={cfg.merge_start}, merge_end="
                            f"{cfg.merge_end}), must lie within the run's {total_steps} steps and hold one")
    if needed == 0:
        return MergeSchedule((), final)
    window = end - start
    interval, per_event = cfg.merge_interval, cfg.merges_per_event

    def fits(sizes: list[int]) -> bool:
        return _delivered(sizes, num_layers, final, cfg.merge_candidates)

    if per_event is not None and not fits([per_event] * math.ceil(needed / per_event)):
        raise ScheduleError(f"merges_per_event={per_event} is more than one event can always make (it merges "
                            f"disjoint {'pairs' if cfg.merge_candidates == 'all' else 'neighbouring pairs'} of "
                            f"groups, taken closest first); leave it unset, or at most "
                            f"{deliverable(max(num_layers.values()) - per_event, cfg.merge_candidates)}")
    if interval is None and per_event is None:
        return MergeSchedule(_spread(window, needed, start, max(num_layers.values()), cfg.merge_candidates, fits),
                             final)
    if interval is None:  # merges_per_event given: as few events as that allows, spread
        events = math.ceil(needed / per_event)
        if events > window:
            raise ScheduleError(f"merges_per_event={per_event} needs {events} merge events for {needed} merges per "
                                f"module type, but the window (steps {start} to {end}) has {window} steps; "
                                f"merges_per_event={math.ceil(needed / window)} would fit")
        return MergeSchedule(_fill(_even_steps(window, events, start), per_event, needed), final)
    steps = list(range(start + interval, end + 1, interval))
    per = per_event if per_event is not None else (math.ceil(needed / len(steps)) if steps else 1)
    if len(steps) * per >= needed and not fits([per] * math.ceil(needed / per)):
        raise ScheduleError(f"{per} merges per event ({len(steps)} events, merge_interval={interval}, for {needed} "
                            f"merges per module type) are more than one event can always make (it merges disjoint "
                            f"pairs of groups, taken closest first): a smaller merge_interval or a wider window would "
                            f"spread them")
    if len(steps) * per < needed:
        ways = []
        fits = window // math.ceil(needed / per) if needed <= window * per else 0
        if fits >= 1:
            ways.append(f"merge_interval={fits}")
        if steps:
            ways.append(f"merges_per_event={math.ceil(needed / len(steps))}")
        if not ways:
            ways.append("a wider window (merge_start, merge_end)")
        raise ScheduleError(f"ASLoRA cannot reach {_groups(final)} B groups per module type by step {end}: "
                            f"{len(steps)} merge events (merge_start={start}, merge_interval={interval}, "
                            f"merge_end={end}) x merges_per_event={per} = {len(steps) * per} merges, {needed} "
                            f"needed; " + " or ".join(ways) + " would")
    return MergeSchedule(_fill(steps, per, needed), final)

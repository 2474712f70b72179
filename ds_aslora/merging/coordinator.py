"""MergeCoordinator: ASLoRA's adaptive B merges on every rank of a DeepSpeed job, in agreement.

Per applied optimizer step each rank folds its flat slice of every live B group into a
running mean, so no rank holds every full mean: under ZeRO-3 the slice of the fp32 master
DeepSpeed gives it; under stages 0-2 the same cut of the working copy (the fp32 master in
fp32 training; in bf16 the bf16 value, so bf16 plans may differ between stages, never
between ranks). Means live where those slices live (the engine's device, or host memory
under ZeRO-3 optimizer offload) and are updated by one foreach call per step; the
communication buffers live on the engine's device. At an event:
  1. each rank computes its partial squared distances for the candidate pairs (one Gram
     matrix per module type) and ONE all-reduce sums them (sharded_distance; exact, raw
     or effective);
  2. MergePolicy derives the plan from the summed matrix, the same on every rank;
  3. ONE all-gather of a hash of (step, plan) checks that; a mismatch raises the same
     error on every rank (no rank goes on into collectives the others skip);
  4. each merge rewrites the representative's fp32 value and Adam moments to the lam
     blend, zeroes the retired moments and refreshes the working copy (zero_state), then
     ties the lower group to the representative (the optimizer layout never changes).
Call ``after_step()`` after every ``engine.step()``; it acts once per optimizer step. An
event that falls on a skipped step (fp16 overflow) runs at the next applied step.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from deepspeed.utils import log_dist

from ..adapters.count import count_trainable
from ..adapters.inject import adapter_config
from ..utils.ranks import rank_and_world
from .merger import apply_ties, fold_group, layers_by_type
from .policy import Merge, MergePolicy, update_running_means
from .schedule import param_counts
from .sharded_distance import FlatSlice, combine, gram_factor, local_terms
from .zero_state import state_access


class MergeDisagreement(RuntimeError):
    """Ranks derived different merge plans; raised on every rank alike."""


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


class MergeCoordinator:
    """Args:
        engine: the DeepSpeed engine of an ``method="aslora"`` model.
        perturb_plan: test hook, applied to this rank's plan before the agreement check.
    """

    def __init__(self, engine: Any, perturb_plan: Optional[Callable[[list[Merge]], list[Merge]]] = None,
                 total_steps: Optional[int] = None):
        self.engine = engine
        self.cfg = adapter_config(engine.module)
        if self.cfg.method != "aslora":
            raise ValueError(f"merging needs method='aslora', the model has {self.cfg.method!r}")
        self.layers = layers_by_type(engine.module)
        self.policy = MergePolicy(self.cfg, {m: len(ls) for m, ls in self.layers.items()}, total_steps,
                                  param_counts(engine.module))
        apply_ties(self.layers, self.policy)  # merge_grouping=static: its blocks share a B from the start
        self.access = state_access(engine)
        if engine.zero_optimization_stage() == 3:
            self._keep_resident()
        self.device = torch.device(engine.device)
        rank, world = rank_and_world()
        self.slices = {m: FlatSlice(numel=ls[0].out_features * ls[0].r, row=ls[0].r, rank=rank, world=world)
                       for m, ls in self.layers.items()}
        first = next(iter(self.layers))
        self.means_device = self.access.local([self.layers[first][0].lora_B], [self.slices[first]])[0].device
        self.means = {m: {i: torch.zeros(self.slices[m].stop - self.slices[m].start, device=self.means_device)
                          for i in range(len(ls))} for m, ls in self.layers.items()}
        self.observations = 0
        self.event_due = 0  # merges per module type due at a step the engine skipped (fp16 overflow)
        self.last_distances: dict[str, torch.Tensor] = {}  # squared, between the groups of last_groups
        self.last_groups: dict[str, list[tuple[int, ...]]] = {}
        self.perturb_plan = perturb_plan
        self._seen_step = engine.global_steps
        self.initial_trainable = count_trainable(engine.module)

    def _keep_resident(self) -> None:
        """ZeRO-3: any B may come to be read by other layers (ties). Such a read is not
        registered with DeepSpeed when the B is resident (persistent), so while a fetch
        trace is being recorded (first step, and the first step after a resume) the owner
        would free it between the tied layer's forward and backward. DeepSpeed never frees
        a parameter flagged as external on module exit; the flag leaves the trace as it is."""
        for layers in self.layers.values():
            for layer in layers:
                layer.lora_B.is_external_param = True

    # -- per step ---------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self) -> list[Merge]:
        """After ``engine.step()``: once per applied optimizer step, observe the live B
        groups and, at an event, merge. Returns the merges applied (the same on every rank)."""
        step = self.engine.global_steps
        if step == self._seen_step:  # not an accumulation boundary
            return []
        self._seen_step = step
        due = self.event_due + self.policy.due(step)  # an event due at a skipped step comes with this one
        if not self.engine.was_step_applied():  # skipped on every rank alike
            self.event_due = due
            return []
        self.event_due = 0
        self.observations += 1
        means, params, where = [], [], []
        for mtype, layers in self.layers.items():
            reps = self.policy.representatives(mtype)
            means += [self.means[mtype][rep] for rep in reps]
            params += [layers[rep].lora_B for rep in reps]
            where += [self.slices[mtype]] * len(reps)
        update_running_means(means, self.access.local(params, where), self.observations)
        if not due:
            return []
        self.last_distances = self.distances()
        plan = self.policy.plan(step, self.last_distances, due)
        if self.perturb_plan is not None:
            plan = self.perturb_plan(plan)
        self.verify(step, plan)
        for merge in plan:
            layers = self.layers[merge.module_type]
            self.access.merge(layers[merge.representative].lora_B, layers[merge.retired].lora_B, self.cfg.merge_lam)
            fold_group(layers, self.means[merge.module_type], merge, self.cfg.merge_lam)
        self.policy.apply(plan)
        self._log(step, plan)
        return plan

    def distances(self) -> dict[str, torch.Tensor]:
        """Squared distances between live groups' running means (inf off the candidate pairs),
        for every module type with merges left, from one all-reduce."""
        effective = self.cfg.merge_distance == "effective"
        todo = [m for m in sorted(self.layers) if self.policy.merges_left(m) > 0]
        # every pair, not only the candidates: one Gram matrix gives them all, and the whole
        # matrix is what a person looks at (TensorBoard heatmaps); the policy reads candidates
        sizes = {m: len(self.policy.groups[m]) for m in todo}
        pairs = {m: [(i, j) for i in range(n) for j in range(i + 1, n)] for m, n in sizes.items()}
        self.last_groups = {m: list(self.policy.groups[m]) for m in todo}
        terms = []
        for mtype in todo:
            means = [self.means[mtype][rep] for rep in self.policy.representatives(mtype)]
            factor = gram_factor(self._shared_A(mtype)).to(self.means_device) if effective else None
            terms.append(local_terms(means, pairs[mtype], self.slices[mtype], factor))
        summed = _all_reduce(torch.cat(terms).to(self.device)).cpu().split([t.numel() for t in terms]) if terms else []
        out = {}
        for mtype, chunk in zip(todo, summed, strict=True):
            n = len(self.policy.groups[mtype])
            matrix = torch.full((n, n), float("inf"), dtype=torch.float64)
            lower, upper = torch.tensor(pairs[mtype], dtype=torch.long).reshape(-1, 2).unbind(1)
            values = combine(chunk, pairs[mtype], n, self.slices[mtype], effective)
            matrix[lower, upper] = matrix[upper, lower] = values
            out[mtype] = matrix
        return out

    def _shared_A(self, mtype: str) -> torch.Tensor:
        A = self.layers[mtype][0].weight_A
        if hasattr(A, "ds_id"):  # engine mode under ZeRO-3: the bank's A is partitioned too
            import deepspeed

            with deepspeed.zero.GatheredParameters([A]):
                return A.detach().clone()
        return A.detach()

    def verify(self, step: int, plan: list[Merge]) -> None:
        """All ranks must hold the same (step, plan); otherwise every rank raises alike."""
        world = rank_and_world()[1]
        if world == 1:
            return
        text = repr((step, [(m.module_type, m.upper, m.lower, m.distance) for m in plan]))
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)
        hashes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(world)]
        dist.all_gather(hashes, torch.tensor([digest], dtype=torch.int64, device=self.device))
        seen = [int(h) for h in hashes]
        if len(set(seen)) > 1:
            raise MergeDisagreement(f"ASLoRA merge plans differ across ranks at step {step} (plan hash per rank: "
                                    f"{seen}); no merge was applied. Every rank must run the same config, model and "
                                    f"data order.")

    # -- accounting -------------------------------------------------------------------
    def accounting(self) -> dict:
        """Live trainable parameters (shared A once, retired B excluded) and the Adam moments
        that still matter; retired tensors keep their (zeroed) slots, the layout is fixed."""
        trainable = count_trainable(self.engine.module)
        return {"trainable": trainable, "live_groups": self.policy.live_groups(),
                "adam_moment_floats": 2 * trainable,
                "fraction_of_start": trainable / self.initial_trainable}

    def _log(self, step: int, plan: list[Merge]) -> None:
        if not plan:
            return
        acc = self.accounting()
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and monitor.enabled:  # TensorBoard / csv / wandb, on rank 0, x = samples
            x = self.engine.global_samples
            monitor.write_events([("Train/ASLoRA/trainable_params", acc["trainable"], x),
                                  ("Train/ASLoRA/live_B_groups", sum(acc["live_groups"].values()), x),
                                  ("Train/ASLoRA/merge_distance_min", min(m.distance for m in plan), x)])
        merges = "; ".join(f"{m.module_type} {list(m.lower)}->{list(m.upper)} (distance {m.distance:.4g})"
                           for m in plan)
        log_dist(f"ASLoRA merge at step {step}: {merges}. Live B groups {acc['live_groups']}; trainable "
                 f"{acc['trainable']:,} ({100 * acc['fraction_of_start']:.2f}% of the start); live Adam moments "
                 f"{acc['adam_moment_floats']:,} floats (retired ones zeroed in place)", ranks=[0])

    # -- checkpoint -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What every rank shares: groups, merge history (steps, distances), observations."""
        return {"policy": self.policy.state_dict(), "observations": self.observations, "event_due": self.event_due,
                "last_distances": {m: d.clone() for m, d in self.last_distances.items()},
                "last_groups": {m: [list(g) for g in gs] for m, gs in self.last_groups.items()}}

    def local_state_dict(self) -> dict:
        """This rank's running-mean slices and where they sit in the full tensors."""
        return {"slices": {m: (s.start, s.stop, s.numel) for m, s in self.slices.items()},
                "means": {m: {k: v.cpu().clone() for k, v in ms.items()} for m, ms in self.means.items()}}

    def saved_ranks_needed(self, saved_world: int) -> list[int]:
        """Ranks of a ``saved_world``-rank job whose running-mean files this rank needs: its own
        on the same world size, a few neighbours after a re-cut (at 70B every rank reading every
        file would be GBs per rank)."""
        return sorted({r for where in self.slices.values() for r in _overlapping(where, saved_world)})

    def load_state_dict(self, state: dict, files: dict[int, dict], saved_world: int) -> None:
        """Restore from ``state_dict()`` and the ``local_state_dict()`` of the saving job's ranks
        listed by ``saved_ranks_needed`` (``files[rank]``)."""
        self.policy.load_state_dict(state["policy"])
        self.observations, self.event_due = state["observations"], int(state["event_due"])
        self.last_distances = dict(state["last_distances"])
        self.last_groups = {m: [tuple(g) for g in gs] for m, gs in state.get("last_groups", {}).items()}
        self.means = {}
        for mtype, where in self.slices.items():
            reps = self.policy.representatives(mtype)
            local = {rep: torch.zeros(where.stop - where.start) for rep in reps}
            covered = 0
            for r in _overlapping(where, saved_world):
                start, stop, numel = files[r]["slices"][mtype]
                if numel != where.numel:
                    raise ValueError(f"saved merge state has {mtype} B of {numel} elements, this model {where.numel}")
                lo, hi = max(start, where.start), min(stop, where.stop)
                covered += max(0, hi - lo)
                for rep in reps:
                    local[rep][lo - where.start:hi - where.start] = files[r]["means"][mtype][rep][lo - start:hi - start]
            if covered != where.stop - where.start:
                raise ValueError(f"saved running means cover {covered} of this rank's {where.stop - where.start} "
                                 f"elements of {mtype}: the checkpoint's merge_means files do not tile the tensors")
            self.means[mtype] = {rep: local[rep].to(self.means_device) for rep in reps}
        apply_ties(self.layers, self.policy)
        self._seen_step = self.engine.global_steps


def _overlapping(where: FlatSlice, saved_world: int) -> list[int]:
    """Ranks of a ``saved_world``-rank job whose slice of the same tensor overlaps ``where``."""
    if where.stop == where.start:
        return []
    part = FlatSlice(where.numel, where.row, 0, saved_world).part
    return list(range(where.start // part, (where.stop - 1) // part + 1))

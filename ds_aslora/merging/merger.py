"""LocalMerger: ASLoRA merges applied to a plain PyTorch model and optimizer, in one process.

It is the reference the multi-rank coordinator must match: the same MergePolicy decisions,
the same running-mean and blend arithmetic, applied directly to ``lora_B`` and to the
optimizer's ``exp_avg`` / ``exp_avg_sq``.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from torch import nn

from ..adapters.inject import adapter_config, adapter_layers, module_type
from ..adapters.layers import AdapterLinear
from .policy import Merge, MergePolicy, blend, squared_distances, update_running_means
from .schedule import param_counts

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def layers_by_type(model: nn.Module) -> dict[str, list[AdapterLinear]]:
    """Adapter layers that own their B, grouped by module type, in layer order."""
    out: dict[str, list[AdapterLinear]] = defaultdict(list)
    for name, layer in adapter_layers(model):
        if layer.b_key is None:
            out[module_type(name)].append(layer)
    return dict(out)


class LocalMerger:
    """Call ``after_step(step)`` after every applied optimizer step.

    Args:
        model: a model injected with ``method="aslora"``.
        optimizer: the torch optimizer over its parameters (None: values only).
        total_steps: the run's optimizer steps, for a schedule given as fractions of the run.
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 total_steps: Optional[int] = None):
        self.cfg = adapter_config(model)
        if self.cfg.method != "aslora":
            raise ValueError(f"merging needs method='aslora', the model has {self.cfg.method!r}")
        self.layers = layers_by_type(model)
        self.optimizer = optimizer
        self.policy = MergePolicy(self.cfg, {m: len(ls) for m, ls in self.layers.items()}, total_steps,
                                  param_counts(model))
        apply_ties(self.layers, self.policy)  # merge_grouping=static: its blocks share a B from the start
        self.means = {m: {i: torch.zeros_like(layer.lora_B, dtype=torch.float32)
                          for i, layer in enumerate(ls)} for m, ls in self.layers.items()}
        self.observations = 0

    @torch.no_grad()
    def after_step(self, step: int) -> list[Merge]:
        """Fold the current B of every live group into its running mean, then merge if
        ``step`` is an event. Returns the merges applied."""
        self.observations += 1
        live = [(self.means[m][rep], ls[rep].lora_B) for m, ls in self.layers.items()
                for rep in self.policy.representatives(m)]
        update_running_means([m for m, _ in live], [b for _, b in live], self.observations)
        due = self.policy.due(step)
        if not due:
            return []
        plan = self.policy.plan(step, self.distances(), due)
        for merge in plan:
            self._apply(merge)
        self.policy.apply(plan)
        return plan

    def distances(self) -> dict[str, torch.Tensor]:
        out = {}
        for mtype, layers in self.layers.items():
            gram = None
            if self.cfg.merge_distance == "effective":
                A = layers[0].weight_A.detach().float()
                gram = A @ A.T  # (r, r)
            means = [self.means[mtype][rep] for rep in self.policy.representatives(mtype)]
            out[mtype] = squared_distances(means, gram)
        return out

    def _apply(self, merge: Merge) -> None:
        layers = self.layers[merge.module_type]
        blend_torch_state(layers[merge.representative].lora_B, layers[merge.retired].lora_B,
                          self.optimizer, self.cfg.merge_lam)
        fold_group(layers, self.means[merge.module_type], merge, self.cfg.merge_lam)

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "observations": self.observations,
                "means": {m: {str(k): v.clone() for k, v in ms.items()} for m, ms in self.means.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.observations = state["observations"]
        self.means = {m: {int(k): v.clone() for k, v in ms.items()} for m, ms in state["means"].items()}
        apply_ties(self.layers, self.policy)


def apply_ties(layers: dict[str, list[AdapterLinear]], policy: MergePolicy) -> None:
    """Point every layer at its group's representative, as the policy's tie map says."""
    for mtype, group_layers in layers.items():
        for pos, rep in enumerate(policy.tie_map(mtype)):
            group_layers[pos].tie_to(group_layers[rep] if rep != pos else None)


@torch.no_grad()
def blend_torch_state(upper: torch.Tensor, lower: torch.Tensor, optimizer: Optional[torch.optim.Optimizer],
                      lam: float) -> None:
    """On full tensors of a torch optimizer: the representative's value and Adam moments
    become the lam blend; the retired tensor's moments are zeroed (it gets no more gradient)."""
    upper.copy_(blend(upper, lower, lam))
    if optimizer is None:
        return
    up_state, lo_state = optimizer.state[upper], optimizer.state[lower]
    for key in ADAM_MOMENTS:
        if key in up_state and key in lo_state:
            up_state[key].copy_(blend(up_state[key], lo_state[key], lam))
            lo_state[key].zero_()


def fold_group(layers: list[AdapterLinear], means: dict[int, torch.Tensor], merge: Merge, lam: float) -> None:
    """After the values are blended: the merged group's running mean is the lam blend of the
    two, and every layer of the group uses the representative's B."""
    means[merge.representative] = blend(means[merge.representative], means.pop(merge.retired), lam)
    representative = layers[merge.representative]
    for pos in merge.upper + merge.lower:
        layers[pos].tie_to(representative if pos != merge.representative else None)

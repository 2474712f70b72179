"""Typed adapter configuration: one dataclass for lora, sharelora and aslora.

Validated eagerly: an unknown key or an impossible value raises ``ValueError`` with the
field name, so a typo in a YAML file fails before a 70B model is loaded.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

METHODS = ("lora", "sharelora", "aslora")
SHARES = ("A", "B", "AB")
SCOPES = ("module", "qkv")
A_SCOPES = ("module", "in_dim")
CANDIDATES = ("adjacent", "all")
GROUPINGS = ("adaptive", "static")
DISTANCES = ("raw", "effective")
QKV = ("q_proj", "k_proj", "v_proj")


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class AdapterConfig:
    """What to adapt and which adapter tensors are shared across layers.

    Every adapted Linear computes ``y = W x + (alpha / r) * B_l A_l dropout(x)``; the
    method only decides which of A_l, B_l are one tensor for several layers.
    """

    method: str = _help("lora | sharelora | aslora", "lora")
    r: int = _help("rank of A (r x d_in) and B (d_out x r)", 8)
    alpha: float = _help("scale numerator: the update is scaled by alpha / r", 16.0)
    dropout: float = _help("dropout on the adapter input, as peft's lora_dropout", 0.0)
    target_modules: Union[str, list[str]] = _help(
        "module-name suffixes to adapt (peft matching), or 'all-linear' (every nn.Linear "
        "but the output head)", "all-linear")
    # ShareLoRA (Song et al. 2024)
    share: Optional[str] = _help(
        "sharelora only: A | B | AB, which factor is one tensor per module type for all "
        "layers (default A)", None)
    scope: Optional[str] = _help(
        "sharelora only: module (one shared tensor per module type) | qkv (q, k and v of "
        "all layers share one tensor: the paper's self-attention variant; other targets "
        "share per module type) (default module)", None)
    # ASLoRA (Hu et al. 2024)
    a_scope: str = _help(
        "aslora: module (one global A per module type) | in_dim (one A for all module "
        "types with the same input dimension)", "module")
    merge_start: Union[int, float] = _help(
        "aslora: no merge at or before this optimizer step (an integer), or this fraction of the run (a "
        "float)", 0.1)
    merge_end: Union[int, float] = _help(
        "aslora: the last step a merge may fall on (an integer), or this fraction of the run (a float): "
        "the merged groups train on after it", 0.8)
    merge_interval: Optional[int] = _help(
        "aslora: steps between merge events (at merge_start + k x interval, up to merge_end); unset: the "
        "merges the target needs are spread evenly over the window", None)
    merges_per_event: Optional[int] = _help(
        "aslora: merges per module type at each event; unset: as many as the schedule needs", None)
    merge_count: Optional[int] = _help(
        "aslora: end after this many merges per module type (one of merge_count, target_groups, "
        "target_ratio; none: down to one group)", None)
    target_groups: Optional[int] = _help(
        "aslora: end when this many B groups per module type remain", None)
    target_ratio: Optional[float] = _help(
        "aslora: end at the most B groups whose trainable parameters are at most this fraction of "
        "plain LoRA's on the same targets", None)
    merge_candidates: str = _help(
        "aslora: adjacent (groups stay contiguous layer blocks) | all (any two groups)",
        "adjacent")
    merge_grouping: str = _help(
        "aslora: adaptive (groups merge during training, closest first) | static (the target's groups "
        "are equal blocks of contiguous layers from the first step, no merges: the ablation baseline)",
        "adaptive")
    merge_distance: str = _help(
        "aslora: raw = ||mean(B_i) - mean(B_j)||_F (the paper) | effective = "
        "||(mean(B_i) - mean(B_j)) A||_F (invariant to the A/B gauge)", "raw")
    merge_lam: float = _help(
        "aslora: merged value = lam * B_upper + (1 - lam) * B_lower, and the same blend "
        "for Adam's moments (1.0 = the lower layer takes the upper layer's B)", 0.5)

    def __post_init__(self) -> None:
        self._check_choice("method", METHODS)
        if self.method == "sharelora":
            self.share = "A" if self.share is None else self.share
            self.scope = "module" if self.scope is None else self.scope
            self._check_choice("share", SHARES)
            self._check_choice("scope", SCOPES)
        else:
            for name in ("share", "scope"):
                if getattr(self, name) is not None:
                    raise ValueError(f"AdapterConfig.{name} applies to method='sharelora' "
                                     f"only, got method={self.method!r}")
        self._check_int("r", 1)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ValueError(f"AdapterConfig.alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self._check_targets()
        self._check_choice("a_scope", A_SCOPES)
        self._check_choice("merge_candidates", CANDIDATES)
        self._check_choice("merge_grouping", GROUPINGS)
        self._check_choice("merge_distance", DISTANCES)
        self._check_step("merge_start", 0)
        self._check_step("merge_end", 1)
        for name, minimum in (("merge_interval", 1), ("merges_per_event", 1), ("merge_count", 0),
                              ("target_groups", 1)):
            if getattr(self, name) is not None:
                self._check_int(name, minimum)
        if self.target_ratio is not None and not (isinstance(self.target_ratio, (int, float))
                                                  and 0.0 < self.target_ratio <= 1.0):
            raise ValueError(f"AdapterConfig.target_ratio must be in (0, 1], got {self.target_ratio!r}")
        targets = [n for n in ("merge_count", "target_groups", "target_ratio") if getattr(self, n) is not None]
        if len(targets) > 1:
            raise ValueError(f"AdapterConfig: set one of merge_count, target_groups, target_ratio; got {targets}")
        if not isinstance(self.merge_lam, (int, float)) or not 0.0 <= self.merge_lam <= 1.0:
            raise ValueError(f"AdapterConfig.merge_lam must be in [0, 1], got {self.merge_lam!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AdapterConfig":
        """Build from a plain dict (YAML, JSON, checkpoint), rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"AdapterConfig.{name} must be one of {list(choices)}, got {value!r}")

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"AdapterConfig.{name} must be an integer >= {minimum}, got {value!r}")

    def _check_step(self, name: str, minimum: int) -> None:
        """A step (an integer >= minimum) or a fraction of the run (a float in [0, 1])."""
        value = getattr(self, name)
        if isinstance(value, float):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AdapterConfig.{name} as a fraction of the run must be in [0, 1], got {value!r}")
        else:
            self._check_int(name, minimum)

    def _check_targets(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != "all-linear":
                self.target_modules = [targets]
            return
        if (not isinstance(targets, (list, tuple)) or not targets
                or not all(isinstance(t, str) and t for t in targets)):
            raise ValueError("AdapterConfig.target_modules must be 'all-linear' or a non-empty "
                             f"list of module names, got {targets!r}")
        self.target_modules = list(targets)

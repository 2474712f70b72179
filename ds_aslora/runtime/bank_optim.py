"""The shared bank's optimizer: the one the user configured for the engine, in plain torch.

The bank lives outside the engine, so DeepSpeed never builds an optimizer for it. To train
the shared tensors like the per-layer ones, we read the DeepSpeed ``optimizer`` section and
build the same algorithm the engine builds (``_configure_basic_optimizer``): DeepSpeed's
``Adam`` is AdamW unless ``adam_w_mode`` is false, ``AdamW`` always is, ``Adagrad`` and any
``torch.optim`` class name are the torch class, ``Lion`` is the same update as DeepSpeed's
fused/CPU Lion. DeepSpeed-only optimizers with cross-rank state (1-bit, LAMB, MuP, Muon) are
refused with the reason rather than silently replaced by AdamW.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterable, Optional

import torch

# DeepSpeed switches that choose an implementation, not the algorithm.
_IMPLEMENTATION_KEYS = ("torch_adam", "fp32_optimizer_states", "set_grad_none", "bias_correction")
_REFUSED = ("lamb", "onebitadam", "zerooneadam", "onebitlamb", "muadam", "muadamw", "musgd", "muon")


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) as DeepSpeed's FusedLion/DeepSpeedCPULion apply it: decoupled
    decay, then ``p -= lr * sign(beta1 * m + (1 - beta1) * g)``, then ``m = beta2 * m + (1 - beta2) * g``."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Any] = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(exp_avg * beta1 + p.grad * (1.0 - beta1)), alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1.0 - beta2)


def _optimizer_class(name: str, params: dict) -> type:
    lowered = name.lower()
    if lowered in ("adam", "adamw"):
        adam_w_mode = params.pop("adam_w_mode", True)
        return torch.optim.AdamW if lowered == "adamw" or adam_w_mode else torch.optim.Adam
    if lowered == "lion":
        return Lion
    if lowered == "adagrad":
        return torch.optim.Adagrad
    if lowered in _REFUSED:
        raise ValueError(f"optimizer {name!r} cannot train the replicated shared bank (its state is not a plain "
                         f"per-tensor torch optimizer); use AdamW, Adam, Lion, Adagrad or a torch.optim optimizer")
    cls = getattr(torch.optim, name, None)  # DeepSpeed's own fallback for other names
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"unknown optimizer type {name!r} in the DeepSpeed config: use AdamW, Adam, Lion, Adagrad "
                         f"or a torch.optim class name (SGD, RMSprop, ...)")
    return cls


def bank_optimizer(params: list[torch.Tensor], optimizer_config: Optional[dict]) -> torch.optim.Optimizer:
    """The configured optimizer over ``params``; ``lr`` is set from the engine at every step."""
    if not optimizer_config or "type" not in optimizer_config:
        raise ValueError("the DeepSpeed config has no optimizer.type; the replicated shared bank follows the "
                         "engine's configured optimizer, so name one (e.g. \"optimizer\": {\"type\": \"AdamW\"})")
    kwargs = dict(optimizer_config.get("params", {}))
    cls = _optimizer_class(optimizer_config["type"], kwargs)
    for key in _IMPLEMENTATION_KEYS:
        value = kwargs.pop(key, None)
        if key == "bias_correction" and value is False:
            raise ValueError("optimizer.params.bias_correction=false has no torch equivalent for the shared bank")
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"optimizer.params {unknown} are not parameters of {cls.__name__}, which trains the "
                         f"shared bank for optimizer.type={optimizer_config['type']!r}; accepted: {sorted(accepted)}")
    kwargs["lr"] = 0.0
    return cls(params, **kwargs)

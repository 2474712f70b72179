"""Sibling adapter layers read one input: compute their low-rank projections ``x @ A^T`` once.

q, k and v (and gate and up) of a decoder layer are called one after another on the same hidden
states. Each adapter's first matmul reads that whole activation to produce ``r`` columns: memory
bound, and repeated for every sibling. Here the first sibling called computes the projections of
all of them in one matmul (their A's side by side; one A once when they share it, as ShareLoRA's
``scope=qkv`` and ASLoRA's ``a_scope=in_dim`` do) and hands each sibling its columns when it is
called on the same tensor. The backward then also runs one matmul for the A's and one for the input.

Siblings are the module types that decoder families (LLaMA, Mistral, Qwen2, Gemma, ...) call on one
tensor (``SIBLING_TYPES``), under one parent and with one input size. The convention is checked, not
trusted: a projection is reused only by a layer called on the very same tensor object at the same
version and grad mode, so a model that feeds k something else still gets exact numbers (k computes
its own from its input) and a recompute under activation checkpointing (new tensors) computes again, the same way
as the forward did. Off while a dropout is active (peft draws an independent mask per layer). A
layer whose A is a ZeRO-3 parameter projects alone, and looking at a sibling's is never a fetch;
under ZeRO-3 the reuse is off altogether (``runtime.engine``: its hooks give each module a detached
copy of the input, so no two siblings see one tensor). Off under ``torch.inference_mode`` (no
version counters) and ``torch.compile`` (the cache's guards would break the graph at every layer).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .layers import AdapterLinear


def _unmanaged(tensor: torch.Tensor) -> bool:
    # A ZeRO-3 parameter (ds_id) is whole only while ZeRO-3 says so: inside its own module's forward
    # and backward, or once a persistent one has been gathered by its module's first forward. A
    # projection that outlives its module's hooks must not hold one, and the joint must not change
    # between a forward and its recompute (activation checkpointing checks the saved tensors).
    return not hasattr(tensor, "ds_id")


SIBLING_TYPES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class _Input:
    """An input a leader projected: held weakly (never keeps an activation alive), with the
    projections made for the siblings that have not been called on it yet."""

    tensor: Callable[[], Optional[torch.Tensor]]
    key: tuple
    pending: dict[int, torch.Tensor]


class SiblingProjections:
    """The adapter layers of one parent module that read one input (a layer's q/k/v, its gate/up)."""

    def __init__(self, members: list["AdapterLinear"]):
        self.members = members
        self._inputs: dict[int, _Input] = {}  # leader id -> the input it projected last

    def projection(self, layer: "AdapterLinear", x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x @ A^T`` of ``layer`` in ``dtype``, computed with its siblings' when they read the same ``x``."""
        if torch.compiler.is_compiling() or x.is_inference():
            # inference tensors keep no version counter; under torch.compile the cache's guards would
            # break the graph at every layer: each layer its own projection (the compiler may fuse them)
            return F.linear(x.to(dtype), layer.cast_A(dtype))
        key = (x._version, torch.is_grad_enabled(), dtype)
        for seen in self._inputs.values():
            if seen.tensor() is x and seen.key == key and id(layer) in seen.pending:
                return seen.pending.pop(id(layer))
        joint, factors = [layer], [layer.weight_A]
        for m in self.members if _unmanaged(factors[0]) else ():
            A = m.peek_A()  # never a ZeRO-3 fetch of another layer's parameter
            if m is not layer and A is not None and _unmanaged(A) and m.compute_dtype(x) == dtype:
                joint.append(m)
                factors.append(A)
        projections = _project(x.to(dtype), joint, factors, dtype)
        pending = {id(m): p for m, p in zip(joint[1:], projections[1:], strict=True)}
        self._inputs[id(layer)] = _Input(weakref.ref(x), key, pending)
        return projections[0]

    def __getstate__(self) -> dict:
        # Copies (deepcopy, pickle) start with no input in flight: a pending projection is a graph node.
        return {**self.__dict__, "_inputs": {}}


class _JointProjection(torch.autograd.Function):
    """``[x @ A_i^T ...]`` for several A's in one matmul. Saves ``x`` and the A's themselves, never
    their concatenation (the backward rebuilds it), so the activation memory is what separate
    matmuls save (``planning/activations.py`` counts it exactly)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *factors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # as a matmul saves: x only for the A's gradients, the A's only for x's
        need_x, need_factors = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:])
        ctx.save_for_backward(x if need_factors else None, *(A if need_x else None for A in factors))
        ctx.rows = [A.shape[0] for A in factors]
        ctx.input_dtypes = [x.dtype] + [A.dtype for A in factors]
        columns = F.linear(x, torch.cat(factors)).split([A.shape[0] for A in factors], dim=-1)
        return tuple(c.contiguous() for c in columns)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, *factors = ctx.saved_tensors
        grad = torch.cat(grads, dim=-1)  # in the forward's output dtype (autocast may have lowered it)
        grad_x, grad_factors = None, [None] * len(factors)
        if ctx.needs_input_grad[0]:
            grad_x = F.linear(grad, torch.cat([A.to(grad.dtype) for A in factors]).t()).to(ctx.input_dtypes[0])
        if x is not None:
            flat = grad.reshape(-1, grad.shape[-1]).t()
            split = torch.mm(flat, x.reshape(-1, x.shape[-1]).to(grad.dtype)).split(ctx.rows)
            needs = zip(split, ctx.needs_input_grad[1:], ctx.input_dtypes[1:], strict=True)
            grad_factors = [g.to(dtype) if need else None for g, need, dtype in needs]
        return (grad_x, *grad_factors)


def _project(x: torch.Tensor, members: list["AdapterLinear"], factors: list[torch.Tensor],
             dtype: torch.dtype) -> list[torch.Tensor]:
    """``[x @ A^T for A in factors]`` (``factors[i]`` is ``members[i]``'s A) in one matmul; a factor
    listed twice is computed once."""
    distinct: list[int] = []  # the first member of each distinct factor
    for i, A in enumerate(factors):
        if not any(A is factors[j] for j in distinct):
            distinct.append(i)
    casts = [members[i].cast_A(dtype, factors[i]) for i in distinct]
    columns = (F.linear(x, casts[0]),) if len(casts) == 1 else _JointProjection.apply(x, *casts)
    return [columns[next(k for k, j in enumerate(distinct) if factors[j] is A)] for A in factors]

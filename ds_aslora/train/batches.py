"""Deterministic global batches from prepared rows: every rank knows every step's rows.

Loss normalisation contract: ``GlobalBatches`` gives, with each optimizer step's micro-batches,
the number of target tokens (``labels[:, 1:] != -100``) in the whole global batch, every
micro-batch of every rank, computed locally (every rank knows the global batch's rows). The
step's loss is ``sum of token losses / global_target_tokens`` whatever the accumulation, world
size and padding; with DeepSpeed (which divides by the accumulation steps and averages over
ranks) a micro-batch passes ``sum_ce * accumulation * world / global_target_tokens`` to
``engine.backward``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import datasets
import numpy as np
import torch

from .data import IGNORE_INDEX, int_column


def collate(rows: Mapping[str, Sequence[Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: ``input_ids`` with ``pad_id``, ``labels`` with -100, ``attention_mask`` 0.

    Packed rows (with ``sample_lengths``) also get ``position_ids`` that restart at every sample
    (0 on padding, each pad token a sequence of its own): given them without an attention mask
    (``model_inputs``), transformers attends within each sample only.
    """
    width = max(len(ids) for ids in rows["input_ids"])
    shape = (len(rows["input_ids"]), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows["input_ids"], rows["labels"], strict=True)):
        input_ids[i, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        labels[i, :len(lab)] = torch.as_tensor(lab, dtype=torch.long)
        attention_mask[i, :len(ids)] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if "sample_lengths" in rows:
        position_ids = torch.zeros(shape, dtype=torch.long)
        for i, lengths in enumerate(rows["sample_lengths"]):
            positions = [torch.arange(n) for n in lengths]
            if positions:
                position_ids[i, :sum(lengths)] = torch.cat(positions)
        batch["position_ids"] = position_ids
    return batch


def model_inputs(batch: dict[str, torch.Tensor], attn_implementation: str = "sdpa") -> dict[str, Any]:
    """What the model's forward takes, from a host batch: packed batches go without their attention mask, so that
    transformers builds the per-sample (block-diagonal) causal mask from the position ids. No KV
    cache: with one, transformers skips that mask (and a training forward never needs it).

    Flash attention reads position ids as packed samples only in a batch of one row, so a packed
    micro-batch of several rows goes to it as one row of their tokens, padding dropped. The loss is
    the same: each sample's first label is -100, so no token learns to predict the next row's. It
    also gets the samples' boundaries (``cu_seq_lens_*``, ``max_length_*``), computed here on the
    host batch: transformers would otherwise derive them from the position ids in every layer,
    each time waiting for the device."""
    if "position_ids" not in batch:
        return {**batch, "use_cache": False}
    inputs = {k: v for k, v in batch.items() if k != "attention_mask"}
    if not attn_implementation.startswith("flash_attention"):
        return {**inputs, "use_cache": False}
    if batch["input_ids"].shape[0] > 1:
        real = batch["attention_mask"].bool()
        inputs = {k: v[real].unsqueeze(0) for k, v in inputs.items()}
    positions = inputs["position_ids"][0]
    starts = torch.cat([torch.nonzero(positions == 0).flatten(), torch.tensor([positions.numel()])])
    boundaries = starts.to(torch.int32)
    longest = int((starts[1:] - starts[:-1]).max())
    return {**inputs, "cu_seq_lens_q": boundaries, "cu_seq_lens_k": boundaries, "max_length_q": longest,
            "max_length_k": longest, "use_cache": False}


def _batch_columns(dataset: datasets.Dataset) -> list[str]:
    return ["input_ids", "labels"] + (["sample_lengths"] if "sample_lengths" in dataset.column_names else [])


@dataclass
class StepBatch:
    """One optimizer step's data for this rank."""

    step: int  # data position: optimizer steps consumed before this one
    micro_batches: list[dict[str, torch.Tensor]]  # this rank's, one per accumulation micro-step
    global_target_tokens: int  # labels[:, 1:] != -100 over every micro-batch of every rank
    epoch: int  # passes over the data completed before this step's first row


class GlobalBatches:
    """This rank's micro-batches for optimizer steps ``start_step, start_step + 1, ...`` (endless).

    The data is one stream of seeded shuffles of the whole dataset, one per epoch; step t's global
    batch is its rows ``t*G .. t*G + G - 1`` (G = micro batch x accumulation x world), ordered
    [accumulation micro-step, rank, row]. So the global batch of a step does not depend on how it
    is split over ranks and micro-steps, and starting at step k (the saved data position) yields
    exactly what an uninterrupted run yields from k. No communication: every rank computes the
    same indices.
    """

    def __init__(self, dataset: datasets.Dataset, *, micro_batch_size: int, gradient_accumulation_steps: int,
                 world_size: int, rank: int, seed: int, pad_id: int, start_step: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if len(dataset) == 0:
            raise ValueError("no rows to train on")
        self.rows = dataset.select_columns(_batch_columns(dataset))
        self.n_targets = int_column(dataset, "n_targets")
        self.micro, self.accum, self.world, self.rank = micro_batch_size, gradient_accumulation_steps, world_size, rank
        self.global_size = micro_batch_size * gradient_accumulation_steps * world_size
        self.seed, self.pad_id, self.start_step = seed, pad_id, start_step
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            # Steps move forward: keep the previous epoch's order only.
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.n_targets))
        return self._orders[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        """Dataset rows of step ``step``'s global batch, in [micro-step, rank, row] order."""
        positions = step * self.global_size + np.arange(self.global_size)
        n = len(self.n_targets)
        epochs = positions // n
        indices = np.empty(self.global_size, dtype=np.int64)
        for epoch in np.unique(epochs):  # ascending: the order cache keeps the previous epoch
            chosen = epochs == epoch
            indices[chosen] = self._order(int(epoch))[positions[chosen] % n]
        return indices

    def batch(self, step: int) -> StepBatch:
        indices = self.global_indices(step)
        micro_batches = []
        for a in range(self.accum):
            start = (a * self.world + self.rank) * self.micro
            chosen = indices[start:start + self.micro].tolist()
            micro_batches.append(collate(self.rows[chosen], self.pad_id))
        return StepBatch(step=step, micro_batches=micro_batches,
                         global_target_tokens=int(self.n_targets[indices].sum()),
                         epoch=step * self.global_size // len(self.n_targets))

    def __iter__(self) -> Iterator[StepBatch]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


class EvalBatches:
    """This rank's share of an eval set, in order: eval step s holds rows ``s*M*W .. (s+1)*M*W - 1``
    (M micro batch, W world), this rank's M of them. Every rank gets the same number of
    micro-batches (ZeRO-3 needs every rank in every forward): slots past the end repeat row 0
    with all labels -100 (no target). ``global_target_tokens`` is per eval step, all ranks."""

    def __init__(self, dataset: datasets.Dataset, *, micro_batch_size: int, world_size: int, rank: int,
                 pad_id: int, max_batches: Optional[int] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rows = dataset.select_columns(_batch_columns(dataset))
        self.n_targets = int_column(dataset, "n_targets")
        self.micro, self.world, self.rank, self.pad_id = micro_batch_size, world_size, rank, pad_id
        steps = -(-len(self.n_targets) // (micro_batch_size * world_size))
        self.steps = steps if max_batches is None else min(steps, max_batches)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[StepBatch]:
        n, size = len(self.n_targets), self.micro * self.world
        for step in range(self.steps):
            positions = step * size + self.rank * self.micro + np.arange(self.micro)
            valid = positions < n
            batch = collate(self.rows[np.where(valid, positions, 0).tolist()], self.pad_id)
            batch["labels"][~torch.as_tensor(valid)] = IGNORE_INDEX
            everyone = np.arange(step * size, min((step + 1) * size, n))
            yield StepBatch(step=step, micro_batches=[batch], global_target_tokens=int(self.n_targets[everyone].sum()),
                            epoch=0)

"""Packing: whole samples into blocks of at most ``block_size`` tokens, each sample kept apart.

A sample is never split: blocks are filled by best-fit decreasing over the samples' lengths
(a sample longer than the block was already cut or refused by tokenisation's truncation
policy). Each block records its samples' lengths (``sample_lengths``), so the collator restarts
position ids at every sample and transformers builds a block-diagonal causal mask from them
(SDPA and eager at any batch size; flash attention gets each micro-batch as one row, see
``batches.model_inputs``): a sample attends to itself only, and its per-token
losses are those it has unpacked. A sample's first label is already -100 (nothing of it
precedes it), so no token learns to predict one sample from another.

Memory is bounded: the assignment is computed from the length column alone (8 bytes a row),
and the blocks are written by ``datasets.map`` in batches of ``batch_size`` blocks, never the
whole corpus in one call, each block its own list (no 2^31-element Arrow array).
"""
from __future__ import annotations

from typing import Optional

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Block index of each sample: longest first, each into the open block it fills most tightly
    (a new block when none has room). Deterministic: equal lengths go in row order; blocks are
    numbered in the order they open. O(n log capacity): a tree over the remaining capacities
    finds the tightest open block."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"sample lengths must be in [1, {capacity}], got {lengths.min()}..{lengths.max()}")
    size = 1 << int(capacity).bit_length()  # leaves 0..capacity (remaining room), a power of two
    tree = [0] * (2 * size)  # open blocks under each node
    open_blocks: list[list[int]] = [[] for _ in range(capacity + 1)]  # room -> blocks with that room
    block_of = np.empty(len(lengths), dtype=np.int64)
    n_blocks = 0

    def add(room: int, delta: int) -> None:
        node = size + room
        while node:
            tree[node] += delta
            node >>= 1

    def tightest(need: int) -> int:
        """Smallest room >= need with an open block, or -1: up from leaf ``need`` until a right
        sibling holds a block, then down to that subtree's leftmost such leaf."""
        node = size + need
        if tree[node]:
            return need
        while node > 1:
            if node % 2 == 0 and tree[node + 1]:
                node += 1
                break
            node //= 2
        else:
            return -1
        while node < size:
            node = 2 * node if tree[2 * node] else 2 * node + 1
        return node - size

    for row in np.argsort(-lengths, kind="stable"):
        need = int(lengths[row])
        room = tightest(need)
        if room < 0:
            block, room = n_blocks, capacity
            n_blocks += 1
        else:
            block = open_blocks[room].pop()
            add(room, -1)
        block_of[row] = block
        if room - need > 0:
            open_blocks[room - need].append(block)
            add(room - need, 1)
    return block_of


def pack(dataset: datasets.Dataset, block_size: int, *, batch_size: Optional[int] = 1000,
         num_proc: Optional[int] = None, cache_file_name: Optional[str] = None) -> datasets.Dataset:
    """Tokenised rows (``input_ids``, ``labels``, ``n_targets``) -> blocks with ``input_ids``,
    ``labels``, ``sample_lengths``, ``length`` and ``n_targets``. ``batch_size`` blocks are built
    per call (None: all in one call, the reference the batched path must equal)."""
    lengths = np.concatenate([np.zeros(0, np.int64)] + [  # streamed in batches: never every token at once
        pc.list_value_length(batch["input_ids"]).to_numpy().astype(np.int64)
        for batch in dataset.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=50_000)])
    block_of = best_fit_decreasing(lengths, block_size)
    order = np.argsort(block_of, kind="stable")  # rows block by block, in row order within a block
    starts = np.searchsorted(block_of[order], np.arange(int(block_of.max(initial=-1)) + 2))
    rows = dataset.select_columns(["input_ids", "labels", "n_targets"]).with_format("arrow")

    def blocks(batch: pa.Table) -> pa.Table:
        first, last = batch.column("block")[0].as_py(), batch.column("block")[-1].as_py()
        taken = rows[order[starts[first]:starts[last + 1]].tolist()]
        per_block = np.diff(starts[first:last + 2])  # samples in each block
        sample_lengths = lengths[order[starts[first]:starts[last + 1]]]
        block_rows = np.concatenate([[0], np.cumsum(per_block)])
        token_offsets = np.concatenate([[0], np.cumsum(sample_lengths)])[block_rows]
        ids = taken.column("input_ids").combine_chunks().flatten()
        labels = taken.column("labels").combine_chunks().flatten()
        targets = taken.column("n_targets").to_numpy()
        return pa.table({
            "input_ids": pa.ListArray.from_arrays(pa.array(token_offsets, pa.int32()), ids),
            "labels": pa.ListArray.from_arrays(pa.array(token_offsets, pa.int32()), labels),
            "sample_lengths": pa.ListArray.from_arrays(pa.array(block_rows, pa.int32()),
                                                       pa.array(sample_lengths, pa.int32())),
            "length": pa.array(np.diff(token_offsets), pa.int64()),
            "n_targets": pa.array(np.add.reduceat(targets, block_rows[:-1]) if len(targets) else [], pa.int64()),
        })

    index = datasets.Dataset.from_dict({"block": np.arange(len(starts) - 1)})
    packed = index.with_format("arrow").map(blocks, batched=True, batch_size=batch_size, remove_columns=["block"],
                                            num_proc=num_proc, cache_file_name=cache_file_name,
                                            load_from_cache_file=False, desc="packing")
    return packed.with_format(None)

"""Exact distances between B running means when each rank holds one flat slice of every B.

ZeRO-3 partitions each parameter on its own: the flattened tensor is cut into
``world_size`` pieces of ``ceil(numel / world_size)`` (the last one padded), so every B of
one shape is sliced at the same offsets on a rank. Elementwise work (running means, lam
blends) then needs no communication, and a squared distance is a sum of per-rank partial
sums, summed by one all-reduce per merge event.

Raw distance ``||m_i - m_j||_F^2`` is elementwise. The effective distance
``||(m_i - m_j) A||_F^2 = sum over rows of ||d_row L||^2`` (``L L^T = A A^T``, r x r) is
a sum over *rows*; a row that a slice boundary cuts ("cut row") is split across ranks, so
each rank contributes its part of ``m_row L`` for every mean (r numbers each; a pair's
``d_row L`` is the difference of two of them, formed after the sum) and those are summed
before squaring. Both travel in the same all-reduced vector: per mean, not per pair, so it
stays small at any world size (80 groups, r=64, 384 ranks: 16 MB per module type).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class FlatSlice:
    """This rank's part ``[start, stop)`` of a flattened (d_out, row) tensor, ZeRO-3's cut."""

    numel: int
    row: int
    rank: int
    world: int

    @property
    def part(self) -> int:
        return -(-self.numel // self.world)

    @property
    def start(self) -> int:
        return min(self.rank * self.part, self.numel)

    @property
    def stop(self) -> int:
        return min(self.start + self.part, self.numel)

    def cut_rows(self) -> list[int]:
        """Rows split between ranks, identical on every rank."""
        bounds = (q * self.part for q in range(1, self.world))
        return sorted({b // self.row for b in bounds if b < self.numel and b % self.row})

    def take(self, full: torch.Tensor) -> torch.Tensor:
        return full.reshape(-1)[self.start:self.stop]


def gram_factor(A: torch.Tensor) -> torch.Tensor:
    """``L`` (r x r, float64) with ``L L^T = A A^T``; eigh, so a rank-deficient A is fine."""
    A = A.detach().double()
    w, V = torch.linalg.eigh(A @ A.T)
    return V * w.clamp(min=0).sqrt()


def local_terms(means: list[torch.Tensor], pairs: list[tuple[int, int]], where: FlatSlice,
                factor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This rank's share of the squared distance of each pair, as one float64 vector to be
    summed across ranks: ``len(pairs)`` partial sums, then (effective only) each mean's cut-row
    projections, ``len(means) x len(cut_rows) x r``. ``means`` are local slices.

    All pairs come from one Gram matrix of the stacked means (``|m_i|^2 + |m_j|^2 -
    2 m_i.m_j``, float64), so an event costs one matrix product, not a Python loop over up
    to L(L-1)/2 pairs."""
    cuts = where.cut_rows() if factor is not None else []
    device = means[0].device  # where the slices live
    lower = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=device)
    upper = torch.tensor([j for _, j in pairs], dtype=torch.long, device=device)
    sums = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    proj = torch.zeros(len(means), len(cuts), where.row, dtype=torch.float64, device=device)
    if where.stop > where.start and pairs:
        if factor is None:
            rows_of = torch.stack(means)  # (n, slice)
        else:
            first = where.start // where.row
            rows = (where.stop - 1) // where.row - first + 1
            local_cuts = [(k, c - first) for k, c in enumerate(cuts) if 0 <= c - first < rows]
            whole = torch.ones(rows, dtype=torch.bool, device=device)
            whole[[row for _, row in local_cuts]] = False
            offset = where.start - first * where.row
            projected = torch.stack([_project(m, rows, offset, where.row, factor) for m in means])  # (n, rows, r)
            rows_of = projected[:, whole].reshape(len(means), -1)  # each mean projected once
            for k, row in local_cuts:
                proj[:, k] = projected[:, row]
        gram = _gram(rows_of)
        norms = gram.diagonal()
        sums = (norms[lower] + norms[upper] - 2 * gram[lower, upper]).clamp(min=0)
    return torch.cat([sums, proj.reshape(-1)])


def _gram(stacked: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """``X X^T`` in float64, a column block at a time (bounded memory at 70B)."""
    gram = torch.zeros(stacked.shape[0], stacked.shape[0], dtype=torch.float64, device=stacked.device)
    for start in range(0, stacked.shape[1], chunk):
        block = stacked[:, start:start + chunk].double()
        gram.addmm_(block, block.T)
    return gram


def _project(mean: torch.Tensor, rows: int, offset: int, row: int, factor: torch.Tensor) -> torch.Tensor:
    """The slice laid into the rows it touches (zeros elsewhere), times L: (rows, r)."""
    padded = torch.zeros(rows * row, dtype=torch.float64, device=mean.device)
    padded[offset:offset + mean.numel()] = mean.double()
    return padded.view(rows, row) @ factor


def combine(summed: torch.Tensor, pairs: list[tuple[int, int]], n_means: int, where: FlatSlice,
            effective: bool) -> torch.Tensor:
    """Squared distance per pair from the all-reduced ``local_terms`` vector."""
    n_cuts = len(where.cut_rows()) if effective else 0
    proj = summed[len(pairs):].view(n_means, n_cuts, where.row)
    lower = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    upper = torch.tensor([j for _, j in pairs], dtype=torch.long)
    return summed[:len(pairs)] + (proj[lower] - proj[upper]).pow(2).sum(dim=(1, 2))


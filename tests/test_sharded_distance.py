"""Sharded distances: per-rank partial terms, summed as an all-reduce would, equal the
single-process squared_distances (raw and effective), whatever the slices cut."""
import itertools

import pytest
import torch

from ds_aslora.merging.policy import squared_distances
from ds_aslora.merging.sharded_distance import FlatSlice, combine, gram_factor, local_terms


def test_slices_follow_zero3_partitioning():
    # ZeRO-3: part = ceil(numel / world), last rank padded, ranks past the end empty
    spans = [(s.start, s.stop) for s in (FlatSlice(numel=10, row=5, rank=q, world=4) for q in range(4))]
    assert spans == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert FlatSlice(numel=10, row=5, rank=0, world=4).cut_rows() == [0, 1]  # bounds 3, 6 (9 is in row 1 too)
    assert FlatSlice(numel=5, row=5, rank=3, world=4).start == 5 == FlatSlice(5, 5, 3, 4).stop
    assert FlatSlice(numel=64, row=4, rank=1, world=4).cut_rows() == []  # row-aligned cuts


@pytest.mark.parametrize("d_out, r, world", [(16, 4, 1), (16, 4, 3), (5, 3, 4), (7, 4, 2), (3, 8, 5), (32, 4, 4),
                                             (1, 5, 4)])  # the last: rank 3 holds nothing
@pytest.mark.parametrize("effective", [False, True])
def test_partial_terms_sum_to_the_full_distance(d_out, r, world, effective):
    gen = torch.Generator().manual_seed(d_out * r + world)
    means = [torch.randn(d_out, r, generator=gen) for _ in range(4)]
    A = torch.randn(r, 11, generator=gen)
    pairs = list(itertools.combinations(range(4), 2))
    factor = gram_factor(A) if effective else None
    slices = [FlatSlice(numel=d_out * r, row=r, rank=q, world=world) for q in range(world)]
    summed = sum(local_terms([s.take(m) for m in means], pairs, s, factor) for s in slices)
    got = combine(summed, pairs, len(means), slices[0], effective)
    expected = squared_distances(means, A @ A.T if effective else None)
    # raw: the same float32 differences, so only float64 summation order differs;
    # effective: A A^T factored in float64 instead of multiplied in float32
    tol = 1e-6 if effective else 1e-12
    torch.testing.assert_close(got, torch.stack([expected[p] for p in pairs]), rtol=tol, atol=0)


def test_gram_factor_handles_rank_deficient_A():
    A = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))  # r > d_in: A A^T singular
    L = gram_factor(A)
    torch.testing.assert_close(L @ L.T, A.double() @ A.double().T, rtol=1e-10, atol=1e-10)


def test_the_event_vector_stays_small_at_384_ranks():
    # 80 groups (70B), r=64, d_out 8192 (q/o_proj), 384 ranks: every slice boundary cuts a row. Per pair,
    # the cut rows' projections would be 3,160 pairs x 383 cuts x 64 x 8 bytes = 620 MB per module type.
    groups, r, d_out, world = 80, 64, 8192, 384
    where = FlatSlice(numel=d_out * r, row=r, rank=5, world=world)
    cuts = len(where.cut_rows())
    assert cuts > 300
    means = [torch.zeros(where.stop - where.start) for _ in range(groups)]
    pairs = list(itertools.combinations(range(groups), 2))
    terms = local_terms(means, pairs, where, torch.eye(r, dtype=torch.float64))
    assert terms.numel() == len(pairs) + groups * cuts * r
    assert terms.numel() * 8 < 17e6  # bytes all-reduced per module type and event

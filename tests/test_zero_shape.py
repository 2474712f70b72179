"""The distributed shape itself: one bank all-reduce per optimizer step, partitioned
per-layer optimizer state, and ranks that fail fast."""
import pytest
from conftest import tiny_model, tokens
from multirank import run_ranks
from test_zero_parity import ds_config

from ds_aslora import AdapterConfig, inject_adapters


def audit_worker(rank, layers, ga, stage):
    import deepspeed.comm as dist

    from ds_aslora.runtime.comm_audit import audit_collectives
    from ds_aslora.runtime.engine import initialize

    model = inject_adapters(tiny_model(num_hidden_layers=layers), AdapterConfig(method="aslora", r=4))
    engine, bank = initialize(model, ds_config(stage, ga, dist.get_world_size()))
    ids = tokens(batch=2, length=8)
    with audit_collectives() as record:
        for _ in range(2 * ga):  # two optimizer steps
            engine.backward(engine(ids, labels=ids).loss)
            bank.reduce()
            engine.step()
            bank.step()
    bank_bytes = sum(p.numel() * p.element_size() for p in bank.params)
    return record.count("ds_aslora"), record.count("ds_aslora", "all_reduce"), record.bytes("ds_aslora"), bank_bytes


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_bank_costs_one_all_reduce_per_step_whatever_the_depth_and_accumulation(stage):
    for layers, ga in ((2, 1), (4, 1), (4, 2)):
        calls, reduces, sent, bank_bytes = run_ranks(audit_worker, 2, layers, ga, stage)[0]
        assert (calls, reduces, sent) == (2, 2, 2 * bank_bytes), (layers, ga)


def partition_worker(rank, stage):
    import deepspeed.comm as dist

    from ds_aslora.runtime.engine import initialize

    model = inject_adapters(tiny_model(num_hidden_layers=4), AdapterConfig(method="aslora", r=4))
    per_layer = sum(p.numel() for p in model.parameters() if p.requires_grad) - sum(
        p.numel() for p in model.shared_bank.parameters())
    engine, bank = initialize(model, ds_config(stage, 1, dist.get_world_size()))
    opt = engine.optimizer
    groups = opt.single_partition_of_fp32_groups if stage < 3 else opt.fp32_partitioned_groups_flat
    return per_layer, sum(g.numel() for g in groups)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_per_layer_optimizer_state_shrinks_with_world_size(stage):
    for world in (2, 4):
        for full, local in run_ranks(partition_worker, world, stage):
            assert full / world <= local <= full / world + 64, (world, full, local)  # + alignment padding


def raising_worker(rank):
    import deepspeed.comm as dist

    if rank == 1:
        raise RuntimeError("rank 1 broke on purpose")
    dist.barrier()  # rank 0 would wait here forever if the harness did not stop it


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_job_fast_with_its_error():
    import time

    start = time.monotonic()
    with pytest.raises(Exception, match="rank 1 broke on purpose"):
        run_ranks(raising_worker, 2, timeout=120)
    assert time.monotonic() - start < 60

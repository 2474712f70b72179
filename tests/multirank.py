"""Run a function on several real processes (gloo, CPU DeepSpeed) and collect results.

Reusable by every multi-rank test: ``run_ranks(fn, world_size, *args)`` forks
``world_size`` processes, each with the env DeepSpeed's launcher would set, runs
``fn(rank, *args)`` and returns the list of what each rank returned. A rank that raises
fails the whole call with its traceback (torch terminates the other ranks), never a hang.
"""
from __future__ import annotations

import os
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

from ds_aslora.train.dist_setup import close_distributed
from ds_aslora.utils.ranks import free_port, remove_shm_buffers


def _worker(rank, fn, world_size, port, out_dir, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    try:
        result = fn(rank, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        # Written before this rank dies, so the parent can name the first cause, not the
        # "connection closed by peer" its neighbours see afterwards.
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        close_distributed()  # also the groups a test made through dist_setup


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0):
    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            return _run(fn, world_size, port, out_dir, args, timeout)
        finally:
            remove_shm_buffers(port)


def _run(fn, world_size, port, out_dir, args, timeout):
    ctx = mp.start_processes(_worker, args=(fn, world_size, port, out_dir, args),
                             nprocs=world_size, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):  # raises as soon as any rank fails
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                raise TimeoutError(f"{world_size} ranks did not finish within {timeout:.0f} s")
    except mp.ProcessRaisedException as err:
        errors = {r: open(os.path.join(out_dir, f"rank{r}.err")).read() for r in range(world_size)
                  if os.path.exists(os.path.join(out_dir, f"rank{r}.err"))}
        raise RuntimeError("\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))) from err
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def train_steps(engine, steps, global_batch, micro, *, bank=None, merger=None, on_event=None):
    """Optimizer steps on this rank's share of each global batch (rows ordered as
    [accumulation micro-step, rank, row]). Returns the global mean loss of each step."""
    import deepspeed.comm as dist

    from ds_aslora.runtime.step import micro_step

    rank, world, ga = dist.get_rank(), dist.get_world_size(), engine.gradient_accumulation_steps()
    losses = []
    for step in steps:
        ids = global_batch(step)
        step_loss = 0.0
        for m in range(ga):
            chunk = ids.view(ga, world, micro, -1)[m, rank]
            loss, plan = micro_step(engine, {"input_ids": chunk, "labels": chunk}, bank, merger)
            step_loss += loss.item() / ga
            if plan and on_event:
                on_event(step, plan)
        total = torch.tensor(step_loss)
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses

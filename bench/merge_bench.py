"""Cost of ASLoRA's merge coordination: one merge event vs one training step, and its bytes.

Every step after ``--warmup`` is a merge event (one merge per module type: 7 merges with
all-linear targets), so the figures are per event. Also reported: the per-step cost of
updating the running means (every applied step, no communication). Stages run one after
the other in the same job, on the same model shape and data. On CPU ranks:

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 bench/merge_bench.py

The default shape is SmolLM2-135M's (30 layers, hidden 576), random weights, fp32;
``--layers 80`` gives LLaMA-2-70B's depth (560 B tensors with all-linear targets, up to
3,160 candidate pairs per type with ``--candidates all``) at that width.
"""
from __future__ import annotations

import argparse
import statistics
import time

import deepspeed
import deepspeed.comm as dist
import torch
from step_bench import SMOLLM2_135M, ds_config
from transformers import LlamaConfig, LlamaForCausalLM

from ds_aslora import AdapterConfig, inject_adapters
from ds_aslora.merging.coordinator import MergeCoordinator
from ds_aslora.runtime.comm_audit import audit_collectives
from ds_aslora.runtime.engine import initialize
from ds_aslora.runtime.step import micro_step


def run_stage(stage, args):
    torch.manual_seed(0)
    cfg = AdapterConfig(method="aslora", r=args.r, alpha=2 * args.r, target_modules="all-linear",
                        merge_start=args.warmup, merge_interval=1, merges_per_event=1,
                        merge_distance=args.distance, merge_candidates=args.candidates)
    model = inject_adapters(LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": args.layers})), cfg)
    engine, bank = initialize(model, ds_config(args.batch, stage, dist.get_world_size()))
    merger = MergeCoordinator(engine)
    gen = torch.Generator().manual_seed(dist.get_rank())
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.seq), generator=gen).to(engine.device)
    steps, observes, events = [], [], []
    for step in range(1, args.warmup + args.events + 1):
        start = time.perf_counter()
        micro_step(engine, {"input_ids": ids, "labels": ids}, bank)  # merges run below, timed apart
        steps.append(time.perf_counter() - start)
        with audit_collectives() as record:
            start = time.perf_counter()
            plan = merger.after_step()
            elapsed = time.perf_counter() - start
        if plan:
            events.append((elapsed, record, len(plan)))
        elif step > 1:
            observes.append(elapsed)
    step_time = statistics.median(steps[1:])
    event_time = statistics.median(e for e, _, _ in events)
    return dict(stage=stage, step=step_time, event=event_time, observe=statistics.median(observes),
                merges=events[0][2], calls=events[-1][1].count(), mb=events[-1][1].bytes() / 2**20,
                summary=events[-1][1].summary(), live=merger.accounting())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="steps before the first event")
    parser.add_argument("--events", type=int, default=3)
    parser.add_argument("--distance", default="raw", choices=["raw", "effective"])
    parser.add_argument("--candidates", default="adjacent", choices=["adjacent", "all"])
    parser.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    args = parser.parse_args()
    deepspeed.init_distributed()
    rows = [run_stage(stage, args) for stage in args.stages]
    if dist.get_rank() == 0:
        print(f"\n{dist.get_world_size()} ranks, SmolLM2-135M width, {args.layers} layers, aslora r={args.r}, "
              f"batch {args.batch}x{args.seq}/rank, distance={args.distance}, candidates={args.candidates}, "
              f"medians over {args.events} events")
        print(f"{'ZeRO':<6}{'step s':>9}{'event s':>9}{'event/step':>12}{'merges':>8}{'calls':>7}{'MB/event':>10}"
              f"{'means ms':>10}{'means/step':>12}")
        for r in rows:
            print(f"{r['stage']:<6}{r['step']:>9.3f}{r['event']:>9.4f}{r['event'] / r['step']:>12.3f}{r['merges']:>8d}"
                  f"{r['calls']:>7d}{r['mb']:>10.3f}{1e3 * r['observe']:>10.2f}{r['observe'] / r['step']:>11.2%}")
        for r in rows:
            print(f"ZeRO-{r['stage']} event collectives: {r['summary']}; after: {r['live']}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

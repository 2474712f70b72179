"""Step time and per-step communication: the frozen base (the floor), peft LoRA, and our
lora / sharelora / aslora, on one DeepSpeed config.

All variants live in one job, on the same model shape and data; their steps are alternated
(variant 1, 2, ... then again) for ``--repeats`` rounds, so a moment of machine noise hits
every variant alike, and each figure is the median over rounds with its spread (min-max).
The floor is the base with every weight frozen but input gradients on (backward runs
through every layer, as adapters need), plus one trainable norm so DeepSpeed has a step.
Run on CPU ranks (or GPUs, without DS_ACCELERATOR):

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 bench/step_bench.py --stage 2

The default shape is SmolLM2-135M's (30 layers, hidden 576, GQA 9/3 heads), random weights.
Sibling projections (q/k/v, gate/up read one input: their x @ A^T in one matmul, or once for a
shared A) are on, as in the job; ``--no_sibling_reuse`` turns them off.
Under ZeRO-3 our variants re-gather their persistent tensors after each step in one all-gather per
dtype (ds_aslora.runtime.zero3_gather); ``--uncoalesced`` gives them DeepSpeed's one per tensor again.
``--profile N`` then profiles one more step of each variant and prints the N operators it calls more
often than the floor that take most time: where a variant's extra time goes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from ds_aslora import AdapterConfig, count_trainable, inject_adapters
from ds_aslora.adapters.inject import link_siblings
from ds_aslora.runtime.comm_audit import audit_collectives
from ds_aslora.runtime.engine import initialize
from ds_aslora.runtime.step import micro_step
from ds_aslora.runtime.zero3_gather import restore_persistent_gather

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    tie_word_embeddings=True)
FROZEN, PEFT = "frozen base", "peft lora"
VARIANTS = {
    FROZEN: None,
    PEFT: None,
    "lora": dict(method="lora"),
    "sharelora A": dict(method="sharelora", share="A"),
    "sharelora qkv": dict(method="sharelora", share="A", scope="qkv"),
    "aslora": dict(method="aslora"),
    "aslora in_dim": dict(method="aslora", a_scope="in_dim"),
}


def ds_config(batch, stage, world, bf16=False, persistence_threshold=None):
    zero = {"stage": stage}
    if persistence_threshold is not None:  # ZeRO-3: tensors at or under it stay whole on every rank
        zero["stage3_param_persistence_threshold"] = persistence_threshold
    return {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
            "train_batch_size": batch * world, "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
            "bf16": {"enabled": bf16}, "steps_per_print": 10 ** 9}


def build(variant, args, shape=SMOLLM2_135M):
    """(engine, bank, trainable parameters) of one variant, on a random-weight LLaMA of ``shape``."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    targets = args.targets if args.targets != ["all-linear"] else "all-linear"
    config = ds_config(args.batch, args.stage, dist.get_world_size(), args.bf16, args.persistence_threshold)
    if variant in (FROZEN, PEFT):
        if variant == FROZEN:
            model.requires_grad_(False)
            model.model.norm.weight.requires_grad_(True)
            model.enable_input_require_grads()
        else:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets))
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)  # before ZeRO-3 empties the local tensors
        engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=params)
        return engine, None, trainable
    cfg = AdapterConfig(r=args.r, alpha=2 * args.r, target_modules=targets, **VARIANTS[variant])
    model = inject_adapters(model, cfg)
    link_siblings(model, enabled=not args.no_sibling_reuse)
    trainable = count_trainable(model)
    engine, bank = initialize(model, config)
    if args.uncoalesced:
        restore_persistent_gather(engine.optimizer)
    return engine, bank, trainable


def alternate(jobs, ids, warmup, repeats):
    """One step of every variant in turn, ``warmup`` untimed rounds then ``repeats`` timed ones:
    ({variant: step seconds per round}, {variant: the last step's collectives})."""
    times = {v: [] for v in jobs}
    records = {}
    for round_ in range(warmup + repeats):
        for variant, (engine, bank, _) in jobs.items():
            batch = {"input_ids": ids.to(engine.device), "labels": ids.to(engine.device)}
            with audit_collectives() as record:
                start = time.perf_counter()
                micro_step(engine, batch, bank)
                get_accelerator().synchronize()
                elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[variant].append(elapsed)
                records[variant] = record
    return times, records


def profile_steps(jobs, ids):
    """{variant: {operator: (self CPU ms, calls)}} of one more step of each variant."""
    from torch.profiler import ProfilerActivity, profile
    ops = {}
    for variant, (engine, bank, _) in jobs.items():
        batch = {"input_ids": ids.to(engine.device), "labels": ids.to(engine.device)}
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            micro_step(engine, batch, bank)
        ops[variant] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}
    return ops


def print_added_ops(ops, top):
    """Where a variant's time goes beyond the floor's: the operators it calls more often than the floor
    does, with the self time they add (one step's profile: the base's own operators, called as often in
    every variant, are left out, as their time moves with the machine's noise, not with the variant)."""
    floor = ops.get(FROZEN, {})
    for variant, table in ops.items():
        if variant == FROZEN:
            continue
        added = {k: (ms - floor.get(k, (0.0, 0))[0], n - floor.get(k, (0, 0))[1]) for k, (ms, n) in table.items()}
        added = {k: v for k, v in added.items() if v[1] > 0}
        print(f"\n{variant}: {sum(n for _, n in added.values()):,} more operator calls than the floor, "
              f"{sum(ms for ms, _ in added.values()):+.0f} ms self CPU in them; the top {top}:")
        for key, (ms, calls) in sorted(added.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"  {key[:60]:<62}{ms:>+8.1f} ms{calls:>+7d} calls")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["all-linear"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8, help="rounds; each times one step of every variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each variant first")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--persistence_threshold", type=int, default=None,
                        help="ZeRO-3 stage3_param_persistence_threshold (default: DeepSpeed's, 1e5)")
    parser.add_argument("--uncoalesced", action="store_true",
                        help="ZeRO-3: our variants keep DeepSpeed's one post-step all-gather per persistent parameter "
                             "(ds_aslora.runtime.zero3_gather off; the frozen base and peft always use DeepSpeed's)")
    parser.add_argument("--no_sibling_reuse", action="store_true",
                        help="each adapter computes its own x @ A (ds_aslora.adapters.siblings off): today's cost")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timed rounds, profile one step of each variant and print the N operators it "
                             "adds (called more often than in the floor) that take most time")
    parser.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    args = parser.parse_args()
    deepspeed.init_distributed()
    jobs = {v: build(v, args) for v in args.variants}
    gen = torch.Generator().manual_seed(dist.get_rank())
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.seq), generator=gen)
    times, records = alternate(jobs, ids, args.warmup, args.repeats)
    ops = profile_steps(jobs, ids) if args.profile else {}
    if dist.get_rank() == 0:
        floor, peft = statistics.median(times.get(FROZEN, [float("nan")])), statistics.median(
            times.get(PEFT, [float("nan")]))
        print(f"\nZeRO-{args.stage}, {dist.get_world_size()} ranks, r={args.r}, targets={args.targets}, "
              f"sibling reuse {'off' if args.no_sibling_reuse else 'on'}, "
              f"batch {args.batch}x{args.seq}/rank, persistence threshold {args.persistence_threshold}, "
              f"median over {args.repeats} alternated rounds (min-max)")
        print(f"{'variant':<15}{'trainable':>12}{'s/step':>8}{'min-max':>15}{'x floor':>9}{'x peft':>8}"
              f"{'all-gathers':>13}{'collectives':>13}{'MB/step':>9}{'ours: calls/MB':>16}")
        for variant, (_, _, trainable) in jobs.items():
            t, rec = times[variant], records[variant]
            median = statistics.median(t)
            gathers = rec.count(op="all_gather_into_tensor") + rec.count(op="all_gather")
            print(f"{variant:<15}{trainable:>12,d}{median:>8.3f}{min(t):>7.3f}-{max(t):<7.3f}{median / floor:>9.2f}"
                  f"{median / peft:>8.2f}{gathers:>13d}{len(rec.calls):>13d}{rec.bytes() / 2**20:>9.2f}"
                  f"{rec.count('ds_aslora'):>8d}/{rec.bytes('ds_aslora') / 2**20:.3f}")
        print_added_ops(ops, args.profile)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

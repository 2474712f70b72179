"""Step time and per-step communication: our lora / sharelora / aslora vs peft LoRA.

All variants run in one job, on the same model shape, data and DeepSpeed config, so the
ratios are comparable. Run on CPU ranks (or GPUs, without DS_ACCELERATOR):

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 bench/step_bench.py --stage 2

The default shape is SmolLM2-135M's (30 layers, hidden 576, GQA 9/3 heads), random weights.
"""
from __future__ import annotations

import argparse
import statistics
import time

import deepspeed
import deepspeed.comm as dist
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ds_aslora import AdapterConfig, count_trainable, inject_adapters
from ds_aslora.comm_audit import audit_collectives
from ds_aslora.distributed import initialize
from ds_aslora.step import micro_step

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    tie_word_embeddings=True)
VARIANTS = {
    "peft lora": None,
    "lora": dict(method="lora"),
    "sharelora A": dict(method="sharelora", share="A"),
    "aslora": dict(method="aslora"),
}


def build(variant, args):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    targets = args.targets if args.targets != ["all-linear"] else "all-linear"
    if VARIANTS[variant] is None:
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets))
    cfg = AdapterConfig(r=args.r, alpha=2 * args.r, target_modules=targets, **VARIANTS[variant])
    return inject_adapters(model, cfg)


def ds_config(batch, stage, world, bf16=False, persistence_threshold=None):
    zero = {"stage": stage}
    if persistence_threshold is not None:  # ZeRO-3: tensors at or under it stay whole on every rank
        zero["stage3_param_persistence_threshold"] = persistence_threshold
    return {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
            "train_batch_size": batch * world, "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
            "bf16": {"enabled": bf16}, "steps_per_print": 10 ** 9}


def run_variant(variant, args):
    model = build(variant, args)
    trainable = count_trainable(model) if VARIANTS[variant] else model.get_nb_trainable_parameters()[0]
    world = dist.get_world_size()
    if VARIANTS[variant] is None:
        config = ds_config(args.batch, args.stage, world, args.bf16, args.persistence_threshold)
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          model_parameters=[p for p in model.parameters() if p.requires_grad])
        bank = None
    else:
        engine, bank = initialize(model, ds_config(args.batch, args.stage, world, args.bf16,
                                                   args.persistence_threshold))
    gen = torch.Generator().manual_seed(dist.get_rank())
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.seq), generator=gen).to(engine.device)
    times = []
    for step in range(args.warmup + args.steps):
        with audit_collectives() as record:
            start = time.perf_counter()
            micro_step(engine, {"input_ids": ids, "labels": ids}, bank)
            elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
    return trainable, statistics.median(times), record


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["all-linear"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--persistence_threshold", type=int, default=None,
                        help="ZeRO-3 stage3_param_persistence_threshold (default: DeepSpeed's, 1e5)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    args = parser.parse_args()
    deepspeed.init_distributed()
    rows = [(v, *run_variant(v, args)) for v in args.variants]
    if dist.get_rank() == 0:
        base_time = rows[0][2]
        print(f"\nZeRO-{args.stage}, {dist.get_world_size()} ranks, r={args.r}, targets={args.targets}, "
              f"persistence threshold {args.persistence_threshold}, "
              f"batch {args.batch}x{args.seq}/rank, median of {args.steps} steps")
        print(f"{'variant':<14}{'trainable':>12}{'step s':>9}{'vs peft':>9}{'collectives':>13}{'MB/step':>9}"
              f"{'ours: calls/MB':>16}")
        for name, trainable, step_time, rec in rows:
            print(f"{name:<14}{trainable:>12,d}{step_time:>9.3f}{step_time / base_time:>9.2f}{len(rec.calls):>13d}"
                  f"{rec.bytes() / 2**20:>9.2f}{rec.count('ds_aslora'):>8d}/{rec.bytes('ds_aslora') / 2**20:.3f}")
        print({name: rec.summary() for name, _, _, rec in rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Plan a run before renting the GPUs: exact trainable parameters and per-GPU memory.

    ds-aslora-plan --model-config tests/assets/configs/llama2-70b.json --method aslora --r 64 \
        --targets all-linear --zero 3 --nodes 4 --gpus 8 [--offload] [--micro_batch 1 --seq_len 4096] \
        [--merge_count K | --target_groups G]

Builds the model on the meta device (no weights, no download), then prints the trainable
counts (ASLoRA before and after its merge schedule) and the per-GPU memory table of
``ds_aslora.planning.memory`` beside the same table for peft-style plain LoRA on the same model, so the
saving of sharing shows row by row; then the agreement with DeepSpeed's own estimators.
Model-state rows are exact for the residency policy in ``ds_aslora/planning/memory.py``; activation
rows are estimates. From a checkout without installing: ``python launch/plan.py`` (same options).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..adapters.config import AdapterConfig
from ..adapters.count import build_on_meta
from ..adapters.inject import adapter_layers
from ..merging.schedule import model_schedule, owners_by_type, param_counts
from .activations import ATTENTIONS
from .inventory import DEEPSPEED_PERSISTENCE_THRESHOLD
from .memory import (
    MemoryPlan,
    TrainSetup,
    deepspeed_estimator_checks,
    memory_plan,
    schedule_merges,
    trainable_counts,
)


def _step(value: str) -> int | float:
    """As the job reads merge_start/merge_end: an integer is a step, a float a fraction of the run."""
    try:
        return int(value)
    except ValueError:
        return float(value)


def _threshold(value: str) -> str:
    if value != "auto" and not value.isdigit():
        raise argparse.ArgumentTypeError("an element count or 'auto'")
    return value


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "ds-aslora-plan") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", "--model_config", dest="model_config", required=True,
                   help="config.json of a HF causal LM (file or folder)")
    a = p.add_argument_group("adapters (AdapterConfig fields)")
    a.add_argument("--method", default="lora", choices=["lora", "sharelora", "aslora"])
    a.add_argument("--share", choices=["A", "B", "AB"])
    a.add_argument("--scope", choices=["module", "qkv"])
    a.add_argument("--a_scope", "--a-scope", dest="a_scope", default="module", choices=["module", "in_dim"])
    a.add_argument("--r", type=int, default=8)
    a.add_argument("--dropout", type=float, default=0.0, help="adapter dropout (adds activations)")
    a.add_argument("--target_modules", "--targets", dest="targets", nargs="+", default=["all-linear"],
                   help="module names (e.g. q_proj v_proj) or all-linear")
    merges = a.add_mutually_exclusive_group()
    merges.add_argument("--merge_count", "--merges", dest="merge_count", type=int,
                        help="aslora: merges per module type (default: down to one group)")
    merges.add_argument("--target_groups", type=int, help="aslora: end at this many B groups per module type")
    merges.add_argument("--target_ratio", type=float,
                        help="aslora: end at this fraction of LoRA's trainable parameters (at most)")
    a.add_argument("--merge_start", type=_step, default=0.1, help="aslora: a step (integer) or fraction of the run")
    a.add_argument("--merge_end", type=_step, default=0.8, help="aslora: a step (integer) or fraction of the run")
    a.add_argument("--merge_interval", type=int, help="aslora: steps between merge events (default: spread)")
    a.add_argument("--merges_per_event", type=int, help="aslora: merges per module type at each event")
    a.add_argument("--max_steps", type=int,
                   help="the run's optimizer steps: the plan then prints ASLoRA's schedule as the job runs it "
                        "(and refuses one that cannot reach its target, as the job does)")
    t = p.add_argument_group("training setup")
    t.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3], help="ZeRO stage")
    t.add_argument("--nodes", type=int, default=1)
    t.add_argument("--gpus", "--gpus_per_node", dest="gpus", type=int, default=8, help="GPUs per node")
    t.add_argument("--offload", action="store_true",
                   help="ZeRO-3 optimizer and parameter offload to cpu (ds_configs/zero3_offload.json)")
    t.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="training dtype")
    t.add_argument("--micro_batch", type=int, default=1)
    t.add_argument("--seq_len", type=int, default=4096)
    t.add_argument("--persistence_threshold", type=_threshold, default=None,
                   help="stage3_param_persistence_threshold: elements, or 'auto' (10 x hidden_size, what "
                        "ds_config.fill_auto gives the shipped configs); default DeepSpeed's 100000")
    t.add_argument("--reduce_bucket_size", type=int, default=None,
                   help="DeepSpeed's reduce_bucket_size; default the shipped configs' auto: hidden_size^2, at most "
                        "the trainable elements DeepSpeed holds")
    t.add_argument("--shared_mode", default="replicated", choices=["replicated", "engine"],
                   help="shared tensors replicated beside the engine (default) or registered in it")
    t.add_argument("--attention", "--attn_implementation", default="sdpa", choices=ATTENTIONS,
                   help="attention implementation (the job's --attn_implementation), for the activation estimate")
    p.add_argument("--bytes", action="store_true", help="print exact bytes instead of GiB")
    return p.parse_args(argv)


def _fmt(n: int, exact: bool) -> str:
    return f"{n:,}" if exact else f"{n / 2 ** 30:,.2f} GiB"


def _table(plans: list[tuple[str, MemoryPlan]], exact: bool) -> list[str]:
    """Rows side by side: per plan a GPU column, and a host column under offload."""
    offload = plans[0][1].setup.offload
    width = 16 if exact else 11
    kinds = ["GPU", "host"] if offload else ["GPU"]
    block = max(len(name) for name, _ in plans) + 2
    block = max(block, len(kinds) * width)
    lines = [f"{'per GPU':<46}" + "".join(f"{name:>{block}}" for name, _ in plans),
             f"{'':<46}" + "".join(f"{''.join(f'{k:>{width}}' for k in kinds):>{block}}" for _ in plans)]

    def line(label: str, values: list[tuple[int, int]]) -> str:
        cells = ""
        for gpu, host in values:
            text = "".join(f"{_fmt(v, exact) if v else '-':>{width}}" for v in (gpu, host)[:len(kinds)])
            cells += f"{text:>{block}}"
        return f"{label:<46}{cells}"

    for row in plans[0][1].rows:
        if row.key == "zero3_gather":
            lines.append(line("= model states", [p.model_states for _, p in plans]))
        lines.append(line(row.label, [(p.row(row.key).gpu, p.row(row.key).host) for _, p in plans]))
    lines.append(line("= peak with checkpointing (est.)", [(p.peak_gpu(True), 0) for _, p in plans]))
    lines.append(line("= peak without checkpointing (est.)", [(p.peak_gpu(False), 0) for _, p in plans]))
    return lines


def main(argv: Optional[Sequence[str]] = None, prog: str = "ds-aslora-plan") -> None:
    """The ``ds-aslora-plan`` command (``launch/plan.py`` passes its own ``prog``); bad input: one line, exit != 0."""
    args = parse_args(argv, prog)
    targets = "all-linear" if args.targets == ["all-linear"] else args.targets
    try:
        cfg = AdapterConfig(method=args.method, r=args.r, dropout=args.dropout, target_modules=targets,
                            share=args.share, scope=args.scope, a_scope=args.a_scope,
                            merge_count=args.merge_count, target_groups=args.target_groups,
                            **({"target_ratio": args.target_ratio, "merge_start": args.merge_start,
                                "merge_end": args.merge_end, "merge_interval": args.merge_interval,
                                "merges_per_event": args.merges_per_event} if args.method == "aslora" else {}))
        lora_cfg = AdapterConfig(method="lora", r=args.r, dropout=args.dropout, target_modules=targets)
        model = build_on_meta(args.model_config, cfg)
        lora = model if cfg.method == "lora" else build_on_meta(args.model_config, lora_cfg)
        threshold = args.persistence_threshold
        if threshold is not None:
            threshold = 10 * model.config.hidden_size if threshold == "auto" else int(threshold)
        setup = TrainSetup(zero_stage=args.zero, nodes=args.nodes, gpus_per_node=args.gpus, dtype=args.dtype,
                           offload=args.offload, micro_batch=args.micro_batch, seq_len=args.seq_len,
                           persistence_threshold=threshold, shared_mode=args.shared_mode, attention=args.attention,
                           reduce_bucket_size=args.reduce_bucket_size)
        plan = memory_plan(model, setup)
        lora_plan = plan if lora is model else memory_plan(lora, setup)
        checks = deepspeed_estimator_checks(plan.inventory, setup)
        schedule = model_schedule(model, args.max_steps) if cfg.method == "aslora" and args.max_steps else None
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None

    label = {"sharelora": f"sharelora share={cfg.share} scope={cfg.scope}",
             "aslora": f"aslora a_scope={cfg.a_scope}"}.get(cfg.method, "lora")
    short = {"sharelora": f"sharelora {cfg.share}"}.get(cfg.method, cfg.method)
    n_lora, _ = trainable_counts(lora)
    now, after = trainable_counts(model)
    L = model.config.num_hidden_layers
    print(f"{type(model).__name__} ({args.model_config}): {L} layers, {len(list(adapter_layers(model)))} "
          f"adapted modules, r={args.r}, targets={targets}")
    print("\ntrainable parameters (exact)")
    rows = [("peft-style LoRA", n_lora)]
    if cfg.method != "lora":
        rows.append((f"{label}" + (", before merges" if after is not None else ""), now))
    if after is not None:
        k = schedule_merges(model)
        groups = f"{L - k} B group{'s' if L - k > 1 else ''}"
        rows.append((f"aslora at the end of the run, after {k} merges per module type ({groups})", after))
    for name, value in rows:
        print(f"  {name:<58} {value:>15,d}  {100.0 * value / n_lora:6.2f}% of LoRA")
    if after is not None:
        print("  (retired B stay registered, so the memory below holds before and after the merges)")
        print(f"  {schedule.describe(owners_by_type(model), param_counts(model))} in {args.max_steps} steps"
              if schedule is not None else "  (give --max_steps to see the schedule that reaches it)")

    s = setup
    where = f"{s.nodes} node{'s' if s.nodes > 1 else ''} x {s.gpus_per_node} GPUs (world {s.world})"
    print(f"\nper-GPU memory: ZeRO-{s.zero_stage}{' + cpu offload' if s.offload else ''}, {where}, {s.dtype}, "
          f"micro_batch {s.micro_batch}, seq_len {s.seq_len}, {s.attention} attention, "
          f"shared tensors {s.shared_mode}")
    if s.zero_stage == 3:
        user = threshold if threshold is not None else DEEPSPEED_PERSISTENCE_THRESHOLD
        raised = f" (aslora: raised to {plan.threshold:,}, the largest per-layer B)" if plan.threshold != user else ""
        print(f"stage3_param_persistence_threshold {user:,}{raised}")
    plans = [(short, plan)] + ([("peft LoRA", lora_plan)] if lora_plan is not plan else [])
    print("\n".join(_table(plans, args.bytes)))

    if s.zero_stage == 3:
        d = s.dtype_bytes
        print(f"\nZeRO-3 resident adapter tensors, whole on every GPU ({s.dtype})")
        for name, p in plans:
            every = p.inventory.adapter_numel + (p.inventory.bank_numel if s.shared_mode == "engine" else 0)
            print(f"  {name:<12} {p.resident_adapter_numel:>13,} params = {d * p.resident_adapter_numel:>15,} B"
                  f"   (previous rule, every adapter tensor persistent: {d * every:,} B)")

    print("\nDeepSpeed's estimators (estimate_zero{2,3}_model_states_mem_needs, 16-bit, buffer factor 1)")
    if not checks:
        print("  not comparable here (they assume 16-bit training and ZeRO 1-3)")
    for c in checks:
        verdict = "agree" if c.agrees else f"DIFFER by {c.ours - c.deepspeed:,}"
        print(f"  {c.what:<58} ours {c.ours:>15,}  DeepSpeed {c.deepspeed:>15,}  {verdict}  ({c.note})")

    act = plan.activations
    print(f"\nactivations: {act.formula} formula (ds_aslora.planning.activations.activation_bytes); for reference, "
          f"Korthikanti et al.'s s*b*h*(34 + 5*a*s/h) per layer, which stores attention scores, gives "
          f"{_fmt(act.standard, args.bytes)} without checkpointing")

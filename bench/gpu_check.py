"""What a first GPU should tell us, in one command (one GPU, no downloads, under 8 minutes):

    python bench/gpu_check.py            # on a GPU machine
    DS_ACCELERATOR=cpu python bench/gpu_check.py --dry    # CPU, tiny shapes: the same code paths (CI)

1. **Host syncs and collectives per step** of ASLoRA (torch.profiler: ``aten::_local_scalar_dense``,
   every ``.item()``/``float()`` of a device tensor, and the runtime's synchronize calls; collectives
   from ``comm_audit``), where each comes from (profiler stacks), and its **peak memory** at
   ZeRO-3 against ``launch/plan.py``'s prediction for the same setup, DeepSpeed's gradient bucket
   size included (GPU only). First, so that no engine built before it counts.
2. **Step time** on a ~1B LLaMA shape (``bench/configs/llama-1b.json``, random weights, bf16),
   ZeRO-2 and ZeRO-3 at world 1: the frozen base (the floor), peft LoRA, our LoRA, ShareLoRA A and
   ASLoRA, alternated round by round (``step_bench.alternate``): s/step, tokens/s, x floor, x peft,
   and MFU (4 x parameters x tokens: forward and the input-gradient backward; the adapters' own
   FLOPs are a few percent) against the GPU's dense bf16 peak; and, from one profiled step, the
   share of its wall time the GPU spends in kernels and how many it launches (host-bound or not).
3. **A 3-step ASLoRA job** through ``launch/train.py`` (the built-in tiny model): a merge, a save at
   step 2, then a resume to step 3.

``--parts`` picks some of them. Prints one table; exits 1 if any part failed (the table says which).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import torch  # noqa: E402

# Dense bf16 peak of the GPUs we expect (TFLOP/s, no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
SCALAR_READ = "aten::_local_scalar_dense"  # a host read of a tensor (.item(), float())
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")  # the runtime waits for the GPU
SYNC_EVENTS = (SCALAR_READ, *WAITS)
PARTS = ("memory", "steps", "job")  # run in this order
DRY_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)


class Table:
    """Rows of (part, what, value); a failed part is a row too."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.failed: list[str] = []

    def add(self, part: str, what: str, value: str) -> None:
        self.rows.append((part, what, value))

    def run(self, part: str, fn, *args) -> None:
        try:
            fn(self, *args)
        except Exception as err:  # every failure becomes a row and the exit status
            traceback.print_exc()
            self.failed.append(part)
            self.add(part, "FAILED", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")

    def print(self) -> None:
        width = max(len(w) for _, w, _ in self.rows) + 2
        part_w = max(len(p) for p, _, _ in self.rows) + 2
        for part, what, value in self.rows:
            print(f"{part:<{part_w}}{what:<{width}}{value}")


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def step_bench_args(stage: int, args) -> SimpleNamespace:
    """The options `bench/step_bench.py` would parse, for its `build` (all-linear, the library's defaults)."""
    return SimpleNamespace(stage=stage, r=args.r, targets=["all-linear"], batch=args.batch, bf16=not args.dry,
                           persistence_threshold=None, uncoalesced=False, no_sibling_reuse=False)


def gpu_busy(engine, bank, ids: torch.Tensor) -> tuple[float, int]:
    """(share of one step's wall time the GPU spends in kernels, kernels launched): far below 1,
    the host cannot issue the step's work as fast as the GPU runs it."""
    from torch.profiler import ProfilerActivity, profile

    from ds_aslora.runtime.step import micro_step

    batch = {"input_ids": ids.to(engine.device), "labels": ids.to(engine.device)}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        micro_step(engine, batch, bank)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / 1e6 / wall, len(kernels)


def sync_sources(prof) -> str:
    """Where a profiled step's host syncs come from: the innermost frame outside torch (its optimizers
    excepted), with counts."""
    counts: Counter = Counter()
    for e in prof.events():
        if e.name in SYNC_EVENTS:
            frames = [f for f in (e.stack or []) if not f.startswith("<built-in")
                      and ("torch/" not in f or "torch/optim/" in f)]
            counts[frames[0].split("site-packages/")[-1] if frames else "?"] += 1
    return "; ".join(f"{n} {where}" for where, n in counts.most_common())


def step_times(table: Table, args, shape: dict, stage: int) -> None:
    import deepspeed.comm as dist
    import step_bench

    bench_args = step_bench_args(stage, args)
    jobs = {v: step_bench.build(v, bench_args, shape) for v in step_bench.VARIANTS}
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times, _ = step_bench.alternate(jobs, ids, args.warmup, args.repeats)
    floor, peft = (statistics.median(times[v]) for v in (step_bench.FROZEN, step_bench.PEFT))
    module = jobs[step_bench.FROZEN][0].module
    embedding = {id(p) for p in module.get_input_embeddings().parameters()}  # a lookup: no matmul FLOPs
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                   for p in module.parameters() if id(p) not in embedding)
    tokens = args.batch * args.seq * dist.get_world_size()
    peak = peak_tflops()
    for variant, t in times.items():
        median = statistics.median(t)
        mfu = f", MFU {4 * n_params * tokens / median / (peak * 1e12):.1%}" if peak else ""
        if torch.cuda.is_available():
            busy, kernels = gpu_busy(jobs[variant][0], jobs[variant][1], ids)
            mfu += f", GPU busy {busy:.0%} ({kernels:,} kernels)"
        table.add(f"ZeRO-{stage} step", variant,
                  f"{median:.3f} s ({min(t):.3f}-{max(t):.3f}), {tokens / median:,.0f} tok/s, "
                  f"{median / floor:.2f}x floor, {median / peft:.2f}x peft{mfu}")
    for engine, *_ in jobs.values():
        engine.destroy()


def syncs_and_memory(table: Table, args, shape: dict) -> None:
    import deepspeed.comm as dist
    import step_bench
    from deepspeed.accelerator import get_accelerator
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile

    from ds_aslora.planning.memory import TrainSetup, memory_plan
    from ds_aslora.runtime.comm_audit import audit_collectives
    from ds_aslora.runtime.step import micro_step

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()  # what earlier parts left behind: not this step's
    bench_args = step_bench_args(3, args)
    engine, bank, _ = step_bench.build("aslora", bench_args, shape)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()  # the steps' peak, not the build's
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(engine.device), "labels": ids.to(engine.device)}
    for _ in range(2):
        micro_step(engine, batch, bank)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with audit_collectives() as record, profile(activities=activities, with_stack=True,
                                                experimental_config=_ExperimentalConfig(verbose=True)) as prof:
        micro_step(engine, batch, bank)
        get_accelerator().synchronize()
    states = torch.cuda.memory_allocated() - held if on_gpu else 0  # between steps: weights and optimizer
    counts = {e.key: e.count for e in prof.key_averages()}
    scalars = counts.get(SCALAR_READ, 0)
    syncs = sum(c for k, c in counts.items() if k in WAITS)
    table.add("ASLoRA ZeRO-3 step", "host syncs", f"{scalars} scalar reads to host, {syncs} synchronize calls")
    table.add("ASLoRA ZeRO-3 step", "their sources", sync_sources(prof))
    table.add("ASLoRA ZeRO-3 step", "collectives", f"{len(record.calls)} calls, {record.bytes() / 2**20:.2f} MB "
              f"({record.count('ds_aslora')} ours)")
    if on_gpu:
        from transformers import LlamaConfig, LlamaForCausalLM

        from ds_aslora import AdapterConfig, inject_adapters

        with torch.device("meta"):
            meta = inject_adapters(LlamaForCausalLM(LlamaConfig(**shape)),
                                   AdapterConfig(method="aslora", r=args.r, alpha=2 * args.r))
        # step_bench leaves reduce_bucket_size at DeepSpeed's default; plan with what the engine uses
        plan = memory_plan(meta, TrainSetup(zero_stage=3, nodes=1, gpus_per_node=dist.get_world_size(), dtype="bf16",
                                            micro_batch=args.batch, seq_len=args.seq,
                                            reduce_bucket_size=engine.zero_reduce_bucket_size()))
        planned_states = plan.model_states[0] + plan.row("zero_buckets").gpu  # the bucket stays allocated
        table.add("ASLoRA ZeRO-3 step", "model states", f"{states / 2**30:.2f} GiB allocated between steps, "
                  f"{planned_states / 2**30:.2f} GiB planned with the gradient bucket "
                  f"({states / planned_states:.2f}x); {held / 2**30:.2f} GiB held before it")
        measured, predicted = torch.cuda.max_memory_allocated() - held, plan.peak_gpu(checkpointing=False)
        table.add("ASLoRA ZeRO-3 step", "peak memory", f"{measured / 2**30:.2f} GiB measured, "
                  f"{predicted / 2**30:.2f} GiB planned ({measured / predicted:.2f}x)")
    else:
        table.add("ASLoRA ZeRO-3 step", "peak memory", "n/a on CPU")
    engine.destroy()


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(("error", "Traceback")) or "Error" in line]
    return lines[-1] if lines else stderr.strip()[-300:]


def job_merge_save_resume(table: Table, args) -> None:
    """Steps 1-2 (a merge at 2, a save at 2), then a resume to step 3, through the real job."""
    with tempfile.TemporaryDirectory() as tmp:
        common = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--model", "tiny", "--method", "aslora",
                  "--target_modules", "q_proj,v_proj", "--merge_start", "1", "--merge_end", "2",
                  "--target_groups", "3", "--micro_batch_size", "2", "--save_interval", "2",
                  "--eval_interval", "0", "--output_dir", os.path.join(tmp, "out"),
                  "--deepspeed", os.path.join(ROOT, "ds_configs", "zero3.json")]
        launch = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")  # ours, not its
        env = {k: v for k, v in os.environ.items() if k not in launch}
        env["DS_ASLORA_CACHE"] = os.path.join(tmp, "cache")
        start = time.perf_counter()
        first = subprocess.run(common + ["--max_steps", "2"], env=env, capture_output=True, text=True, cwd=ROOT)
        if first.returncode:
            raise RuntimeError(f"the 2-step job exited {first.returncode}: {_last_error(first.stderr)}")
        second = subprocess.run(common + ["--max_steps", "3", "--resume", "auto", "--merge_end", "2"], env=env,
                                capture_output=True, text=True, cwd=ROOT)
        if second.returncode:
            raise RuntimeError(f"the resumed job exited {second.returncode}: {_last_error(second.stderr)}")
        if "at step 2" not in second.stdout:
            raise RuntimeError(f"the second job did not resume from step 2: {second.stdout.strip()[-300:]}")
        with open(os.path.join(tmp, "out", "summary.json")) as f:
            summary = json.load(f)
        if summary["steps"] != 3 or summary.get("live_B_groups") != {"q_proj": 3, "v_proj": 3}:
            raise RuntimeError(f"unexpected end state: steps {summary['steps']}, groups {summary.get('live_B_groups')}")
        table.add("ASLoRA job", "merge, save, resume", f"ok: 3 steps, 4 -> 3 B groups per type, "
                  f"{time.perf_counter() - start:.0f} s for both jobs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="tiny shapes, fp32, 1 round: the code paths on a CPU")
    parser.add_argument("--model_config", default=os.path.join(HERE, "configs", "llama-1b.json"))
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run")
    args = parser.parse_args()
    if args.dry:
        args.batch, args.seq, args.repeats, args.warmup, args.r = 2, 16, 1, 1, 4
        shape = DRY_SHAPE
    else:
        with open(args.model_config) as f:
            shape = {k: v for k, v in json.load(f).items() if k not in ("architectures", "model_type")}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1")
    from ds_aslora.utils.ranks import free_port, remove_shm_buffers

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(verbose=False)
    table = Table()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    table.add("machine", "device", f"{device}, torch {torch.__version__}, deepspeed {deepspeed.__version__}")
    try:
        if "memory" in args.parts:  # first: engines built before it may leave memory behind
            table.run("ASLoRA ZeRO-3 step", syncs_and_memory, args, shape)
        if "steps" in args.parts:
            for stage in (2, 3):
                table.run(f"ZeRO-{stage} step", step_times, args, shape, stage)
        if "job" in args.parts:
            table.run("ASLoRA job", job_merge_save_resume, args)
    finally:
        dist.destroy_process_group()
        remove_shm_buffers(os.environ["MASTER_PORT"])
    print()
    table.print()
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())

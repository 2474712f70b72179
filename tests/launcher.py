"""Run launch/train.py through the real DeepSpeed launcher on CPU ranks, for the job's tests."""
import os
import subprocess
import sys

from ds_aslora.utils.ranks import free_port, remove_shm_buffers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(ROOT, "launch", "train.py")
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
COMMON = ["--max_seq_length", "64", "--packing", "--micro_batch_size", "2", "--r", "4", "--alpha", "8",
          "--eval_interval", "6", "--log_interval", "1", "--warmup_steps", "1", "--dtype", "fp32"]


def launch(assets, out, *args, ranks=2, stage=3, check=True, module=False, ds=None):
    """One job through the deepspeed launcher (``module``: ``--module ds_aslora.train`` instead of
    launch/train.py; ``ds``: a DeepSpeed JSON instead of the shipped ``zero{stage}.json``); every
    finished job must exit 0 (no teardown abort)."""
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "DS_ASLORA_CACHE": str(assets["root"] / "cache")}
    job = ["--module", "ds_aslora.train"] if module else [os.path.join(ROOT, "launch", "train.py")]
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port), *job,
           "--deepspeed", str(ds or os.path.join(ROOT, "ds_configs", f"zero{stage}.json")), "--model", assets["base"],
           "--data", assets["train"], "--eval_data", assets["eval"], "--output_dir", str(out), *COMMON, *args]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    finally:
        remove_shm_buffers(port)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


# DeepSpeed refuses fp16 on a CPU without native fp16 kernels (oneDNN's check: AVX512-FP16 or AMX; the
# AMD EPYC these tests were written on has neither). torch's portable kernels compute fp16 all the same,
# so with that one check lifted the real loss scaler (overflow, skipped step, lowered scale) runs on any
# CPU. Arguments as launch/train.py's.
FP16_ON_CPU = ["-c", "import sys; from deepspeed.accelerator import get_accelerator; "
               "type(get_accelerator()).is_fp16_supported = lambda self: True; "
               f"sys.path.insert(0, {ROOT!r}); from ds_aslora.train.job import main; sys.exit(main(sys.argv[1:]))"]


def job(assets, out, *args, stage=2, model=None, data=None, script=(TRAIN_PY,), ds=None, stdout=False, env=None):
    """One process (plain python), the tiny base unless ``model``: returns (status, error lines, stderr)
    (and stdout with ``stdout``)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "DS_ASLORA_CACHE": str(assets["root"] / "cache"), **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    cmd = [sys.executable, *script, "--deepspeed", ds or os.path.join(ROOT, "ds_configs", f"zero{stage}.json"),
           "--model", model or assets["base"], "--data", data or assets["train"], "--output_dir", str(out),
           "--max_steps", "2", "--max_seq_length", "64", "--eval_interval", "0", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    return (done.returncode, errors, done.stderr) + ((done.stdout,) if stdout else ())

"""The job as several nodes run it, on this one machine: two torchrun "nodes" of two ranks
each over the loopback address train and resume; a rank killed with SIGKILL stops the whole
job within seconds and the last checkpoint resumes."""
import os
import signal
import subprocess
import sys
import time

import pytest
from launcher import COMMON, ROOT, launch

from ds_aslora.utils.ranks import free_port, remove_shm_buffers

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def two_nodes(assets, out, *args):
    """Two torchrun invocations (node ranks 0 and 1, 2 ranks each) meeting at 127.0.0.1. torchrun's
    own parser takes ``--r`` for an abbreviation of its options, so r goes in the YAML config."""
    port = free_port()
    config = assets["root"] / "rank.yaml"
    config.write_text("r: 4\n")
    common = [a for i, a in enumerate(COMMON) if a != "--r" and (i == 0 or COMMON[i - 1] != "--r")]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "DS_ASLORA_CACHE": str(assets["root"] / "cache")}
    nodes = [subprocess.Popen(
        [TORCHRUN, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), os.path.join(ROOT, "launch", "train.py"), "--deepspeed",
         os.path.join(ROOT, "ds_configs", "zero3.json"), "--model", assets["base"], "--data", assets["train"],
         "--eval_data", assets["eval"], "--output_dir", str(out), "--config", str(config), *common, *args],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return outputs[0]


@pytest.mark.slow
def test_two_nodes_of_two_ranks_train_and_resume(assets):
    out = assets["root"] / "two-nodes"
    aslora = ["--method", "aslora", "--merge_start", "1", "--merge_interval", "1", "--target_groups", "3"]
    first = two_nodes(assets, out, *aslora, "--max_steps", "2", "--save_interval", "2")
    assert "global batch 8 (2 x 1 x 4 ranks)" in first
    states = sorted(f for f in os.listdir(out / "checkpoints" / "global_step2") if f.endswith("optim_states.pt"))
    assert len(states) == 4  # one ZeRO-3 partition per rank of both nodes
    resumed = two_nodes(assets, out, *aslora, "--max_steps", "4", "--save_interval", "2", "--resume", "auto")
    assert "resumed from" in resumed and "at step 2" in resumed
    assert (out / "checkpoints" / "latest").read_text() == "global_step4"


def rank_pid(out, local_rank):
    """PID of the training process of ``local_rank`` whose command line names ``out``."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"--local_rank={local_rank}".encode() in cmdline and str(out).encode() in cmdline:
                return int(pid)
    return None


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_within_seconds_and_the_last_checkpoint_resumes(assets):
    out = assets["root"] / "killed"
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "DS_ASLORA_CACHE": str(assets["root"] / "cache")}
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    job = subprocess.Popen(
        [deepspeed, "--num_gpus", "2", "--master_port", str(port), os.path.join(ROOT, "launch", "train.py"),
         "--deepspeed", os.path.join(ROOT, "ds_configs", "zero2.json"), "--model", assets["base"],
         "--data", assets["train"], "--eval_data", assets["eval"], "--output_dir", str(out), *COMMON,
         "--max_steps", "400", "--save_interval", "3", "--eval_interval", "0"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.5)
    assert latest.exists(), "no checkpoint written"
    os.kill(rank_pid(out, 1), signal.SIGKILL)
    killed = time.monotonic()
    job.wait(timeout=120)
    assert job.returncode != 0 and time.monotonic() - killed < 30  # no rank left hanging in a collective
    remove_shm_buffers(port)
    step = int(latest.read_text()[len("global_step"):])
    done = launch(assets, out, "--max_steps", str(step + 2), "--save_interval", "3", "--eval_interval", "0",
                  "--resume", "auto", stage=2)
    assert f"at step {step}" in done.stdout

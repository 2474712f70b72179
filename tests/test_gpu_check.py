"""bench/gpu_check.py in its CPU dry mode: every part of the first-GPU check runs (tiny shapes), so
the script cannot rot between the GPU sessions that run it for real."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_part(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "DS_ASLORA_CACHE": str(tmp_path)}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--dry"], env=env,
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout[done.stdout.rindex("machine "):]
    for row in ("ZeRO-2 step", "ZeRO-3 step", "host syncs", "collectives", "peak memory",
                "ok: 3 steps, 4 -> 3 B groups per type"):
        assert row in table, row
    assert "FAILED" not in table
    steps = [re.split(r"\s{2,}", line)[:2] for line in table.splitlines() if re.match(r"ZeRO-\d step", line)]
    assert steps == [[f"ZeRO-{stage} step", variant] for stage in (2, 3)
                     for variant in ("frozen base", "peft lora", "lora", "sharelora A", "sharelora qkv", "aslora",
                                  "aslora in_dim")]

"""The fine-tuning job: ``deepspeed launch/train.py --deepspeed ds_configs/zero3.json [--config run.yaml] [--flags]``.

Also runs under ``torchrun`` and with plain ``python`` (one process). Installed, the same job is
``deepspeed --module ds_aslora.train``, ``python -m ds_aslora.train`` or ``ds-aslora-train``; the
code is ``ds_aslora/train/job.py``. Every option: ``--help``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ds_aslora.train.job import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""``python -m ds_aslora.train``, ``deepspeed --module ds_aslora.train`` and ``torchrun -m ds_aslora.train``:
the job of ``launch/train.py`` where there is no checkout, only the installed package."""
import sys

from .job import main

if __name__ == "__main__":
    sys.exit(main())

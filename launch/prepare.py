"""Tokenise and pack a run's data ahead of the job: ``python launch/prepare.py --config run.yaml [--flags]``.

The same options as ``launch/train.py``; the job then reads the cache instead of tokenising.
Installed, the same command is ``ds-aslora-prepare``; the code is ``ds_aslora/train/prepare.py``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ds_aslora.train.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

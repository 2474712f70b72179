"""Plan a run before renting the GPUs, from a checkout: ``python launch/plan.py --model-config ... [--help]``.

Installed, the same command is ``ds-aslora-plan``; the code is ``ds_aslora/planning/cli.py``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ds_aslora.planning.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python launch/plan.py"))

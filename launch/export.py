"""Export a trained adapter offline, from a checkout: ``python launch/export.py OUTPUT_DIR_OR_CHECKPOINT [--help]``.

Installed, the same command is ``ds-aslora-export``; the code is ``ds_aslora/export/cli.py``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ds_aslora.export.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python launch/export.py"))

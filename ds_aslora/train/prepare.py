"""Prepare a run's data ahead of the job: tokenise and pack into the cache ``launch/train.py`` reads.

    python launch/prepare.py --config run.yaml [--FIELD VALUE ...]     # installed: ds-aslora-prepare

Takes the same ``--config`` and flags as the job (``--deepspeed`` optional; options the data does
not use are accepted and ignored, so one YAML serves both). On a cluster run it once, on one node
and without GPUs, with ``data_cache_dir`` on the shared disk: every rank of the job then reads the
result instead of tokenising. It needs the tokenizer only, never the model's weights.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

from .data import cache_dir_of, default_workers, prepare_data
from .job import apply_embedded_defaults
from .model_setup import load_tokenizer, resolve_model_path
from .run_config import ConfigError, parse_run_config

USAGE = ("usage: python launch/prepare.py [--config run.yaml] [--FIELD VALUE ...]\n"
         "   or: ds-aslora-prepare ... (installed); the job's options, --deepspeed optional")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status 0 when the data is prepared (or already was), 2 on bad input (one line)."""
    started = time.perf_counter()
    try:
        run, _ = parse_run_config(argv, require_deepspeed=False, usage=USAGE)
        if run.data.data is None:
            apply_embedded_defaults(run)
        tokenizer = load_tokenizer(resolve_model_path(run.model.model, tokenizer_only=True),
                                   run.model.trust_remote_code)
        workers = run.data.preprocessing_num_workers or default_workers()
        data = prepare_data(run.data, tokenizer, seed=run.training.seed, cache_dir=cache_dir_of(run.data),
                            num_proc=workers)
    except (ConfigError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    if data.from_cache:
        print(f"already prepared: {data.cache}")
        return 0
    if data.miss:
        print(f"no cached set had this key; {data.miss}")
    rows = sum(stats.rows for stats in data.stats.values())
    targets = sum(stats.target_tokens for stats in data.stats.values())
    print(f"prepared {rows:,} rows ({targets:,} target tokens) in {seconds:.1f} s, {rows / seconds:,.0f} rows/s "
          f"with up to {workers} workers: {data.cache}")
    for split, stats in data.stats.items():
        print(f"  {split}: {stats.kept:,} of {stats.rows:,} rows kept, {stats.truncated:,} truncated "
              f"(longest {stats.longest:,} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export a trained adapter offline (CPU): a peft LoRA dir and a merged Hugging Face model folder.

    ds-aslora-export OUTPUT_DIR                       # <dir>/adapter/peft (if missing), <dir>/merged
    ds-aslora-export OUTPUT_DIR/checkpoints/global_step800   # <dir>/exports/global_step800/{peft,merged}
    ds-aslora-export COMPACT_ADAPTER_DIR --base /models/llama-2-7b --out exports/run1
        [--no-merged] [--max_shard_size 2GB] [--dtype bf16] [--overwrite]

PATH is a training output dir (its final compact adapter, <dir>/adapter/compact), a checkpoint
folder (<ckpt>/adapter) or a compact adapter dir itself. The base model is --base, else the
``model`` of the run's run_config.yaml, else the folder the adapter records. ``--out DIR``
writes DIR/peft and DIR/merged. The merge streams the base one shard at a time; no GPU needed.
From a checkout without installing: ``python launch/export.py`` (same arguments).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from .adapter import CONFIG
from .merged import ExportError, merge_into_base, parse_size, read_compact_config, write_peft


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "ds-aslora-export") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="CHECKPOINT_OR_OUTPUT_DIR",
                   help="training output dir, checkpoint folder (global_stepN) or compact adapter dir")
    p.add_argument("--base", help="base Hugging Face model folder (default: run_config.yaml's model)")
    p.add_argument("--out", help="write OUT/peft and OUT/merged (default: see above)")
    p.add_argument("--no-merged", "--no_merged", dest="merged", action="store_false",
                   help="only the peft adapter dir")
    p.add_argument("--max_shard_size", "--max-shard-size", default="2GB",
                   help="bytes per merged shard: 2GB, 500MB, 4GiB (default 2GB)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="dtype of the merged floating-point weights (default: the base's)")
    p.add_argument("--overwrite", action="store_true", help="replace existing peft/merged outputs")
    return p.parse_args(argv)


def _is_compact(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG))


def locate(path: str) -> tuple[str, Optional[str], str]:
    """(compact dir, training output dir or None, kind) for an output dir, checkpoint or compact dir."""
    if not os.path.isdir(path):
        raise ExportError(f"{path!r} does not exist or is not a folder")
    if _is_compact(path):
        return path, None, "adapter"
    if _is_compact(os.path.join(path, "adapter")):
        parent = os.path.dirname(os.path.abspath(path))
        run_dir = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None
        return os.path.join(path, "adapter"), run_dir, "checkpoint"
    if _is_compact(os.path.join(path, "adapter", "compact")):
        return os.path.join(path, "adapter", "compact"), path, "output"
    ckpts = os.path.join(path, "checkpoints")
    if os.path.isdir(ckpts):
        tags = sorted((t for t in os.listdir(ckpts) if t.startswith("global_step")),
                      key=lambda t: int(t[len("global_step"):]) if t[len("global_step"):].isdigit() else -1)
        have = f" (there: {', '.join(tags[-3:])})" if tags else ""
        final = os.path.join(path, "adapter", "compact")
        raise ExportError(f"{path!r} has no final adapter {final!r} (training not finished?): export a "
                          f"checkpoint folder instead, {os.path.join(ckpts, 'global_stepN')}{have}")
    raise ExportError(f"{path!r} is not a training output dir, checkpoint folder or compact adapter dir "
                      f"(no {CONFIG}, adapter/{CONFIG} or adapter/compact/{CONFIG})")


def base_model(given: Optional[str], run_dir: Optional[str], compact_dir: str) -> str:
    """--base, else run_config.yaml's model, else the folder the adapter records."""
    if given:
        if not os.path.isdir(given):
            raise ExportError(f"base model folder {given!r} does not exist")
        return given
    run_config = os.path.join(run_dir, "run_config.yaml") if run_dir else None
    if run_config and os.path.isfile(run_config):
        import yaml

        with open(run_config) as f:
            model = (yaml.safe_load(f) or {}).get("model")
        if model and os.path.isdir(model):
            return model
        raise ExportError(f"{run_config} names model {model!r}, which is not a folder here: pass --base BASE_MODEL_DIR")
    recorded = read_compact_config(compact_dir).get("base_model_name_or_path")
    if recorded and os.path.isdir(recorded):
        return recorded
    raise ExportError(f"base model unknown (no run_config.yaml; the adapter records {recorded!r}): "
                      f"pass --base BASE_MODEL_DIR")


def destinations(args: argparse.Namespace, compact_dir: str, run_dir: Optional[str], kind: str
                 ) -> tuple[str, str]:
    """(peft dir, merged dir)."""
    if args.out:
        return os.path.join(args.out, "peft"), os.path.join(args.out, "merged")
    if kind == "output":
        return os.path.join(run_dir, "adapter", "peft"), os.path.join(run_dir, "merged")
    if kind == "checkpoint" and run_dir is not None:
        root = os.path.join(run_dir, "exports", os.path.basename(os.path.normpath(args.path)))
        return os.path.join(root, "peft"), os.path.join(root, "merged")
    raise ExportError(f"where to write? pass --out DIR for {kind} folder {args.path!r}")


def main(argv: Optional[Sequence[str]] = None, prog: str = "ds-aslora-export") -> int:
    """The ``ds-aslora-export`` command (``launch/export.py`` passes its own ``prog``): 0, or 2 on bad input."""
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        parse_size(args.max_shard_size)
        compact_dir, run_dir, kind = locate(args.path)
        read_compact_config(compact_dir)
        base = base_model(args.base, run_dir, compact_dir)
        peft_dir, merged_dir = destinations(args, compact_dir, run_dir, kind)
        if os.path.isfile(os.path.join(peft_dir, CONFIG)) and not args.overwrite:
            print(f"peft adapter: {peft_dir} (exists, kept)")
        else:
            write_peft(compact_dir, base, peft_dir)
            print(f"peft adapter: {peft_dir}")
        if args.merged:
            done = merge_into_base(base, compact_dir, merged_dir, max_shard_size=args.max_shard_size,
                                   dtype=args.dtype, overwrite=args.overwrite)
            print(f"merged model: {merged_dir} ({len(done['shards'])} shard(s), {done['total_size'] / 1e9:.2f} GB, "
                  f"{done['merged']} adapted weights merged)")
    except (ExportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

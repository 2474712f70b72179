"""Training data: local files -> token ids and labels -> (packed) rows, prepared once and cached.

Formats, detected from the columns (or forced): ``text`` (column ``text``: every token is a
target), ``alpaca`` (``instruction``, optional ``input``, ``output``: rendered with the Alpaca
prompt, loss on the output and EOS), ``prompt_completion`` (TRL's ``prompt``, ``completion``:
loss on the completion and EOS) and ``chat`` (``messages`` [{role, content}] as OpenAI, or
ShareGPT ``conversations`` [{from, value}]: ``render``). ``train_on_prompt`` trains on every
token instead. A sample's first token is never a target (nothing of the sample precedes it).

``prepare_data`` keeps its result whole under the cache folder, keyed by everything it depends
on (``prepared_key_parts``): a restart, or the job after ``launch/prepare.py``, reads it back instead
of tokenising. Tokenising runs in ``preprocessing_num_workers`` processes. In a multi-rank job
one rank prepares first (then a barrier): the others find the cache.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.fingerprint import Hasher

from ..utils.atomic import write_text
from .assets import cache_root, ensure_built
from .packing import pack
from .render import Renderer
from .run_config import DataConfig

IGNORE_INDEX = -100  # label of a token that is not trained
FORMATS = ("text", "alpaca", "chat", "prompt_completion")
# Accepted column sets per format; detection tries them in this order.
FORMAT_COLUMNS = {"chat": (("messages",), ("conversations",)), "alpaca": (("instruction", "output"),),
                  "prompt_completion": (("prompt", "completion"),), "text": (("text",),)}
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
# Part of every cache key: bump when the tokenisation rules change, so old caches are not reused.
CACHE_VERSION = 2
JSON_ARRAY_WARN_BYTES = 1 << 30  # datasets reads a .json array whole (pyarrow streams JSON lines only)
TOKEN_IDS = datasets.Sequence(datasets.Value("int32"))  # ids and labels: half the bytes of int64 on disk
TOKENIZED_FEATURES = datasets.Features({"input_ids": TOKEN_IDS, "labels": TOKEN_IDS, "length": datasets.Value("int64"),
                                        "n_targets": datasets.Value("int64")})

log = logging.getLogger(__name__)


def ensure_pad_token(tokenizer: Any) -> int:
    """The pad id, setting pad = eos when the tokenizer has none (as peft/TRL users expect), else unk.

    Safe with pad = eos: labels never come from pad ids (padding is masked by position in
    ``collate``), so real EOS targets stay targets.
    """
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError("the tokenizer has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer.pad_token_id


def load_data(path: str, cache_dir: Optional[str] = None) -> datasets.Dataset:
    """Rows of a local .jsonl/.json/.csv/.parquet/.arrow file or a ``save_to_disk`` folder (no hub).

    A .jsonl file is checked line by line first, so a malformed line is named by its number.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} not found")
    if os.path.isdir(path):
        try:
            dataset = datasets.load_from_disk(path)
        except FileNotFoundError:
            raise ValueError(f"{path!r} is a folder but not a datasets save_to_disk folder") from None
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset and len(dataset) != 1:
                raise ValueError(f"{path!r} holds splits {list(dataset)}: expected 'train' or a single split")
            dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext not in LOADERS:
            raise ValueError(f"{path!r}: unsupported file type {ext!r}; accepted: {', '.join(LOADERS)} or a "
                             "save_to_disk folder")
        if ext == ".jsonl":
            _check_json_lines_once(path, cache_dir)
        elif ext == ".json" and os.path.getsize(path) > JSON_ARRAY_WARN_BYTES and _starts_with(path, b"["):
            log.warning("%s: a JSON array of %.1f GB is read whole into memory (datasets streams JSON lines "
                        "only); convert it to .jsonl for a bounded load", path, os.path.getsize(path) / 1e9)
        try:
            dataset = datasets.load_dataset(LOADERS[ext], data_files=path, split="train", cache_dir=cache_dir)
        except datasets.exceptions.DatasetGenerationError as err:
            if ext == ".json":
                _check_json(path)
            raise ValueError(f"{path!r} cannot be read as {LOADERS[ext]}: {err.__cause__ or err}") from err
    if len(dataset) == 0:
        raise ValueError(f"{path!r} has no rows")
    return dataset


def _starts_with(path: str, prefix: bytes) -> bool:
    """Whether the file's first non-blank bytes are ``prefix``."""
    with open(path, "rb") as f:
        return f.read(4096).lstrip().startswith(prefix)


def _check_json_lines_once(path: str, cache_dir: Optional[str]) -> None:
    """Check a JSON-lines file once per content (``_file_identity``): a marker in the cache records it."""
    marker = os.path.join(cache_dir, "checked", Hasher.hash(_file_identity(path))) if cache_dir else None
    if marker and os.path.isfile(marker):
        return
    _check_json_lines(path)
    if marker:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        write_text(marker, path + "\n")


def _check_json_lines(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: malformed JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")


def _check_json(path: str) -> None:
    """After datasets failed on a .json file: name the malformed line (the file may be JSON lines)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # more than one document: JSON lines in a .json file
            _check_json_lines(path)
        raise ValueError(f"{path}, line {err.lineno}: malformed JSON ({err.msg}, column {err.colno})") from None


def _accepted(fmt: str) -> str:
    return " or ".join("+".join(columns) for columns in FORMAT_COLUMNS[fmt])


def detect_format(columns: Sequence[str], forced: str = "auto", source: str = "data") -> str:
    """``forced`` if the columns allow it, else the first format (chat, alpaca, text) whose columns are present."""
    present = set(columns)
    fits = [fmt for fmt, sets in FORMAT_COLUMNS.items() if any(set(s) <= present for s in sets)]
    if forced != "auto":
        if forced not in FORMATS:
            raise ValueError(f"format must be one of {['auto', *FORMATS]}, got {forced!r}")
        if forced not in fits:
            raise ValueError(f"{source}: format {forced!r} needs columns {_accepted(forced)}; "
                             f"found {sorted(present)}")
        return forced
    if not fits:
        accepted = "; ".join(f"{fmt}: {_accepted(fmt)}" for fmt in FORMAT_COLUMNS)
        raise ValueError(f"{source}: no known columns, found {sorted(present)}; accepted: {accepted} "
                         "(alpaca: input optional)")
    return fits[0]


@dataclass(frozen=True)
class TokenizeStats:
    """What tokenisation did to one dataset (for the log)."""

    rows: int  # rows in
    kept: int  # rows with at least one target token (the others are dropped)
    truncated: int  # rows longer than max_seq_length, cut at the end (dropped if no target was left)
    longest: int  # the longest row before truncation, in tokens
    target_tokens: int  # targets in the kept rows (after the causal shift)


def _cache_file(cache_dir: Optional[str], stage: str, key: str) -> Optional[str]:
    if cache_dir is None:
        return None
    os.makedirs(cache_dir, exist_ok=True)
    return os.path.join(cache_dir, f"{stage}-{key}.arrow")


def int_column(dataset: datasets.Dataset, name: str) -> np.ndarray:
    """One integer column as int64 numpy, read through Arrow without Python lists."""
    return dataset.with_format("arrow")[name].to_numpy().astype(np.int64, copy=False)


ROWS_PER_WORKER = 2000  # fewer rows than this per process: starting a process costs more than it saves


def default_workers() -> int:
    """The CPUs this process may use (its affinity mask, not the machine's count), at most 16."""
    return max(1, min(len(os.sched_getaffinity(0)), 16))


def _workers(requested: Optional[int], rows: int) -> Optional[int]:
    """``num_proc`` for ``datasets.map``: None (this process) when one worker would do."""
    workers = min(requested or default_workers(), max(1, rows // ROWS_PER_WORKER))
    return workers if workers > 1 else None


def tokenize(dataset: datasets.Dataset, tokenizer: Any, fmt: str, max_seq_length: Optional[int],
             train_on_prompt: bool = False, truncation: str = "truncate", *, cache_dir: Optional[str] = None,
             source: str = "data", num_proc: Optional[int] = 1) -> tuple[datasets.Dataset, TokenizeStats]:
    """Rows -> ``input_ids``, ``labels`` (-100 where not trained), ``length`` (before truncation),
    ``n_targets`` (``labels[1:] != -100``); rows without a target are dropped.

    ``max_seq_length`` None: no limit. Longer rows are cut at the end (``truncation='truncate'``,
    counted in the stats) or refused (``'refuse'``: ValueError with the count and the longest
    length). ``num_proc`` worker processes (None: ``default_workers()``; fewer for a small
    dataset). Cached in ``cache_dir`` by ``datasets``, per worker shard: an interrupted run keeps
    the shards it finished.
    """
    if truncation not in ("truncate", "refuse"):
        raise ValueError(f"truncation must be 'truncate' or 'refuse', got {truncation!r}")
    fmt = detect_format(dataset.column_names, fmt, source)
    key = Hasher.hash([dataset._fingerprint, tokenizer_fingerprint(tokenizer), fmt, max_seq_length, train_on_prompt,
                       CACHE_VERSION])
    renderer = Renderer(tokenizer, fmt, train_on_prompt)

    def rows_to_tokens(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "n_targets": []}
        rows = [{k: v[j] for k, v in batch.items()} for j in range(len(indices))]
        try:
            rendered = renderer.batch(rows, indices)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        for ids, mask in rendered:
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
            out["length"].append(len(ids))
            if max_seq_length is not None:
                ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            if labels:
                labels[0] = IGNORE_INDEX  # nothing of the sample precedes its first token
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["n_targets"].append(sum(label != IGNORE_INDEX for label in labels[1:]))
        return out

    workers = _workers(num_proc, len(dataset))
    if workers:  # forked workers: one tokenizer thread each, not a pool per worker (tokenizers warns otherwise)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenized = dataset.map(rows_to_tokens, batched=True, with_indices=True, remove_columns=dataset.column_names,
                            cache_file_name=_cache_file(cache_dir, "tokenized", key), load_from_cache_file=True,
                            new_fingerprint=key, desc=f"tokenizing {source}", features=TOKENIZED_FEATURES,
                            num_proc=workers)
    lengths, targets = int_column(tokenized, "length"), int_column(tokenized, "n_targets")
    too_long = int((lengths > max_seq_length).sum()) if max_seq_length is not None else 0
    if truncation == "refuse" and too_long:
        raise ValueError(f"{too_long} of {len(lengths)} sequences in {source} are longer than max_seq_length="
                         f"{max_seq_length} (longest: {lengths.max()} tokens); raise max_seq_length or set "
                         "truncation=truncate")
    keep = np.flatnonzero(targets > 0)
    if len(keep) == 0:
        raise ValueError(f"{source}: no row has a token to train on after tokenisation ({len(lengths)} rows: "
                         "e.g. conversations without an assistant turn, or prompts longer than max_seq_length)")
    if len(keep) < len(lengths):
        tokenized = tokenized.select(keep)
    stats = TokenizeStats(rows=len(lengths), kept=len(keep), truncated=too_long, longest=int(lengths.max()),
                          target_tokens=int(targets.sum()))
    return tokenized, stats


@dataclass
class PreparedData:
    """Tokenised (and packed) train and eval sets, ready for ``GlobalBatches`` / ``EvalBatches``."""

    train: datasets.Dataset
    eval: Optional[datasets.Dataset]
    format: str
    stats: dict[str, TokenizeStats]  # "train", and "eval" when there is one
    cache: Optional[str] = None  # the prepared-data folder, when there is a cache
    from_cache: bool = False  # read back whole: nothing was tokenised
    digest: Optional[str] = None  # the training set's content (content_digest), kept with the cache
    miss: Optional[str] = None  # when tokenised with a cache: the nearest cached set's differing key parts

    def train_digest(self) -> str:
        """What a resumed run compares: the training rows themselves, not where they were read from."""
        if self.digest is None:
            self.digest = content_digest(self.train)
        return self.digest


def content_digest(dataset: datasets.Dataset, window: int = 65_536, chunk: int = 4_096) -> str:
    """A hash of every row's values: per window of rows, column by column (list columns: the
    window's lengths, then its values): the same rows give the same digest wherever and whenever
    they were tokenised. Read ``chunk`` rows at a time and hashed from Arrow's buffers, so memory
    stays at a chunk whatever the rows' length (a window of long rows is gigabytes). Integers are
    hashed as int64 whatever their stored width. ``window`` is part of the digest's definition
    (caches and checkpoints keep digests): keep it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(sorted(dataset.column_names)).encode())
    columns = []
    for name in sorted(dataset.column_names):
        kind = dataset.data.schema.field(name).type
        columns.append((dataset.select_columns([name]).with_format("arrow"),
                        pa.types.is_list(kind) or pa.types.is_large_list(kind)))
    n = len(dataset)
    for start in range(0, n, window):
        parts = [(a, min(a + chunk, start + window, n)) for a in range(start, min(start + window, n), chunk)]
        for rows, is_list in columns:
            if is_list:  # the window's lengths first
                for a, b in parts:
                    h.update(np.asarray(pc.list_value_length(rows[a:b].column(0)).combine_chunks(), dtype=np.int64))
            for a, b in parts:
                values = rows[a:b].column(0)
                for piece in (pc.list_flatten(values) if is_list else values).chunks:
                    array = np.asarray(piece)
                    h.update(np.ascontiguousarray(array, dtype=np.int64 if array.dtype.kind in "iu" else None))
    return h.hexdigest()


def cache_dir_of(config: DataConfig) -> str:
    """Where prepared data is kept: ``data_cache_dir``, else ``<cache root>/datasets``."""
    return config.data_cache_dir or os.path.join(cache_root(), "datasets")


def data_files(spec: str) -> list[str]:
    """``--data a.jsonl,b.parquet``: the files of one training set, in order."""
    return [part.strip() for part in spec.split(",") if part.strip()]


def _file_identity(path: str) -> list:
    """What a file's rows depend on, without reading it whole: name, size, modification time (as
    ``datasets`` keys its own cache, less the folder: a shared disk mounted elsewhere on another
    node is the same file) and a hash of its first, middle and last MiB (``cp -p``, ``rsync -a`` and
    one-second mtimes make equal sizes and times of different files). A folder: its files."""
    if os.path.isdir(path):
        return [os.path.basename(os.path.normpath(path))] + [_file_identity(os.path.join(path, f))
                                                               for f in sorted(os.listdir(path))]
    if not os.path.exists(path):
        return [path, None]  # load_data names it
    st = os.stat(path)
    return [os.path.basename(path), st.st_size, st.st_mtime_ns, _sampled_digest(path, st.st_size)]


def _sampled_digest(path: str, size: int, piece: int = 1 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for start in sorted({0, max(0, size // 2 - piece // 2), max(0, size - piece)}):
            f.seek(start)
            h.update(f.read(piece))
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The tokenizer's hash (vocabulary, special tokens, chat template and every setting) without
    where it was loaded from: a hub id and its local snapshot, or one folder on two mounts, are the
    same tokenizer. A setting naming a file (``vocab_file``) is its path: the file's content is in
    the tokenizer's state already."""
    def where(key: str, value: Any) -> bool:
        return key == "name_or_path" or (isinstance(value, str) and os.path.sep in value and os.path.exists(value))

    clone = copy.copy(tokenizer)
    clone.__dict__.update({k: None for k, v in vars(tokenizer).items() if where(k, v)})
    clone.init_kwargs = {k: v for k, v in tokenizer.init_kwargs.items() if not where(k, v)}
    return Hasher.hash(clone)


def prepared_key_parts(config: DataConfig, tokenizer: Any, seed: int) -> dict[str, str]:
    """Everything a prepared data set depends on, part by part (hashed): each file's identity, each
    data option, the tokenizer and the rules' version. Their hash is the cache folder's key;
    ``launch/prepare.py`` and the job compute it alike, so either finds the other's. A cache miss
    names the parts that differ."""
    options = {k: v for k, v in dataclasses.asdict(config).items()
               if k not in ("data", "eval_data", "data_cache_dir", "preprocessing_num_workers")}
    parts = {"data files": [_file_identity(p) for p in data_files(config.data or "")],
             "eval_data files": [_file_identity(p) for p in data_files(config.eval_data)] if config.eval_data else None,
             "seed": seed if config.eval_fraction > 0 else None,  # only the eval split draws on it
             "tokenizer": tokenizer_fingerprint(tokenizer), "version": CACHE_VERSION,
             **{f"option {k}": v for k, v in sorted(options.items())}}
    return {name: Hasher.hash(value) for name, value in parts.items()}


def nearest_miss(cache_dir: str, parts: dict[str, str]) -> Optional[str]:
    """Why no cached set fits: the key parts in which the closest one in ``cache_dir`` differs."""
    best: Optional[tuple[int, str, list[str]]] = None
    for entry in sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []:
        if entry.startswith("."):  # a build under way, or a crashed one's leftovers
            continue
        try:
            with open(os.path.join(cache_dir, entry, PREPARED_META)) as f:
                theirs = json.load(f).get("key_parts") or {}
        except (OSError, ValueError):
            continue
        differ = sorted(k for k in parts.keys() | theirs.keys() if parts.get(k) != theirs.get(k))
        if theirs and (best is None or len(differ) < best[0]):
            best = (len(differ), entry, differ)
    return f"the nearest cached set, {best[1]}, differs in: {', '.join(best[2])}" if best else None


def _load_files(spec: str, forced: str, cache_dir: Optional[str]) -> tuple[datasets.Dataset, str]:
    """One data set from one or several files, each detected on its own, then tokenised alike."""
    parts, formats = [], []
    for path in data_files(spec):
        dataset = load_data(path, cache_dir)
        formats.append(detect_format(dataset.column_names, forced, path))
        parts.append(dataset)
    if len(set(formats)) > 1:
        raise ValueError(f"{spec}: the files have different formats ({', '.join(formats)}); one run trains one "
                         "format (convert them, or train on one)")
    if len(parts) > 1:
        columns = sorted(set.intersection(*(set(p.column_names) for p in parts)))
        parts = [p.select_columns(columns) for p in parts]
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), formats[0]


def prepare_data(config: DataConfig, tokenizer: Any, *, seed: int, cache_dir: Optional[str],
                 num_proc: Optional[int] = None) -> PreparedData:
    """Load, split (``eval_fraction``) or load ``eval_data``, tokenise and pack, as ``config`` says.

    With a ``cache_dir`` the result is kept whole under ``prepared-<key>/`` (``prepared_key_parts``), built
    once among processes sharing the folder (``ensure_built``: a lock, a temporary folder flushed to
    disk and renamed when complete): a later call with the same key reads it back (``from_cache``)
    without loading, checking or tokenising anything.
    """
    if config.data is None:
        raise ValueError("no training data: set data (a .jsonl/.json/.csv/.parquet/.arrow file or a folder)")
    if not cache_dir:
        return _prepare(config, tokenizer, seed, None, None, num_proc)
    parts = prepared_key_parts(config, tokenizer, seed)
    folder = os.path.join(cache_dir, f"prepared-{Hasher.hash(parts)}")
    # The tokenising maps' shards, per host (locks may not span nodes: two nodes may build at once);
    # an interrupted preparation keeps the shards it finished, for the next one on this host.
    work = f"{folder}.work-{socket.gethostname()}"
    built: dict[str, Optional[str]] = {}

    def build(tmp: str) -> None:
        built["miss"] = nearest_miss(cache_dir, parts)
        _save_prepared(_prepare(config, tokenizer, seed, cache_dir, work, num_proc), tmp, parts)

    ensure_built(folder, build)
    if built:
        shutil.rmtree(work, ignore_errors=True)
    data = _read_prepared(folder, from_cache="miss" not in built)
    data.miss = built.get("miss")
    return data


def _prepare(config: DataConfig, tokenizer: Any, seed: int, cache_dir: Optional[str], work: Optional[str],
             num_proc: Optional[int]) -> PreparedData:
    workers = num_proc if num_proc is not None else config.preprocessing_num_workers
    train, fmt = _load_files(config.data, config.format, cache_dir)
    evaluation, eval_source = None, None
    if config.eval_data:
        evaluation, eval_source = _load_files(config.eval_data, config.format, cache_dir)[0], config.eval_data
    elif config.eval_fraction > 0:
        parts = train.train_test_split(test_size=config.eval_fraction, seed=seed)
        train, evaluation, eval_source = parts["train"], parts["test"], f"{config.data} (eval split)"
    prepared, stats = {}, {}
    for name, dataset, source in (("train", train, config.data), ("eval", evaluation, eval_source)):
        if dataset is None:
            continue
        dataset, stats[name] = tokenize(dataset, tokenizer, fmt, config.max_seq_length, config.train_on_prompt,
                                        config.truncation, cache_dir=work, source=source, num_proc=workers)
        if config.packing:
            dataset = pack(dataset, config.max_seq_length, num_proc=_workers(workers, len(dataset)),
                           cache_file_name=_cache_file(work, f"packed-{name}", "blocks"))
        prepared[name] = dataset
    return PreparedData(train=prepared["train"], eval=prepared.get("eval"), format=fmt, stats=stats)


PREPARED_META = "prepared.json"  # what was prepared, and from what (key_parts)


def _save_prepared(data: PreparedData, folder: str, key_parts: dict[str, str]) -> None:
    for name in ("train", "eval"):
        dataset = getattr(data, name)
        if dataset is not None:
            dataset.save_to_disk(os.path.join(folder, name))
    meta = {"format": data.format, "stats": {k: dataclasses.asdict(v) for k, v in data.stats.items()},
            "rows_digest": data.train_digest(), "key_parts": key_parts}
    write_text(os.path.join(folder, PREPARED_META), json.dumps(meta))


def _read_prepared(folder: str, from_cache: bool = True) -> PreparedData:
    with open(os.path.join(folder, PREPARED_META)) as f:
        meta = json.load(f)
    sets = {name: datasets.load_from_disk(os.path.join(folder, name)) if os.path.isdir(os.path.join(folder, name))
            else None for name in ("train", "eval")}
    return PreparedData(train=sets["train"], eval=sets["eval"], format=meta["format"],
                        stats={k: TokenizeStats(**v) for k, v in meta["stats"].items()}, cache=folder,
                        from_cache=from_cache, digest=meta.get("rows_digest"))

"""Training data: local files -> token ids and labels -> (packed) rows; ``batches`` serves them.

Formats, detected from the columns (or forced): ``text`` (column ``text``: every token is a
target), ``alpaca`` (``instruction``, optional ``input``, ``output``: rendered with the Alpaca
prompt, loss on the output and EOS) and ``chat`` (``messages`` [{role, content}] as OpenAI, or
ShareGPT ``conversations`` [{from, value}]: rendered with the tokenizer's chat template, or
``FALLBACK_CHAT_TEMPLATE`` when it has none; loss on the assistant turns, including the
template's end-of-turn text). ``train_on_prompt`` trains on every token instead. A sample's
first token is never a target (nothing of the sample precedes it), so packed samples do not
learn to predict one sample from the previous one.

Tokenised and packed datasets are cached by ``datasets`` under the caller's cache folder,
named by a fingerprint of the data, the tokenizer and the settings: a restart reads them back
instead of tokenising again. In a multi-rank job let one rank prepare first (then a barrier):
the others find the cache.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import datasets
import numpy as np
import pyarrow as pa
from datasets.fingerprint import Hasher

from .run_config import DataConfig

IGNORE_INDEX = -100
FORMATS = ("text", "alpaca", "chat")
# Accepted column sets per format; detection tries them in this order.
FORMAT_COLUMNS = {"chat": (("messages",), ("conversations",)), "alpaca": (("instruction", "output"),),
                  "text": (("text",),)}
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n")
# For tokenizers without a chat template: role headers, EOS after each assistant reply.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|assistant|>\\n' }}{% endif %}")
# Part of every cache key: bump when the tokenisation rules change, so old caches are not reused.
CACHE_VERSION = 1


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
            _check_json_lines(path)
        try:
            dataset = datasets.load_dataset(LOADERS[ext], data_files=path, split="train", cache_dir=cache_dir)
        except datasets.exceptions.DatasetGenerationError as err:
            if ext == ".json":
                _check_json(path)
            raise ValueError(f"{path!r} cannot be read as {LOADERS[ext]}: {err.__cause__ or err}") from err
    if len(dataset) == 0:
        raise ValueError(f"{path!r} has no rows")
    return dataset


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


def _messages(row: Mapping[str, Any], index: int) -> list[dict[str, str]]:
    """OpenAI ``messages`` or ShareGPT ``conversations`` as [{role, content}]."""
    if row.get("messages") is not None:
        turns, role_key, content_key, roles = row["messages"], "role", "content", None
    else:
        turns, role_key, content_key, roles = row.get("conversations"), "from", "value", SHAREGPT_ROLES
    out = []
    for turn in turns or []:
        role, content = turn.get(role_key), turn.get(content_key)
        if roles is not None:
            if role not in roles:
                raise ValueError(f"row {index}: unknown ShareGPT role {role!r} (known: {list(roles)})")
            role = roles[role]
        if content is not None and not isinstance(content, str):
            raise ValueError(f"row {index}: message content must be text, got {type(content).__name__}")
        out.append({"role": role, "content": content or ""})
    return out


def _default_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before a text by default (BOS for Llama, nothing for Qwen)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Renderer:
    """One row -> (input_ids, trainable mask), for one tokenizer and format (bench/quality.py renders its
    test prompts with it, so scoring sees exactly what training saw)."""

    def __init__(self, tokenizer: Any, fmt: str, train_on_prompt: bool):
        self.tok, self.fmt, self.train_on_prompt = tokenizer, fmt, train_on_prompt
        self.eos = tokenizer.eos_token_id
        if self.eos is None and not (fmt == "chat" and tokenizer.chat_template):
            raise ValueError("the tokenizer has no eos token to end responses with")
        self.prefix = _default_prefix(tokenizer)
        self.template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def __call__(self, row: Mapping[str, Any], index: int) -> tuple[list[int], list[bool]]:
        if self.fmt == "text":
            ids = self.prefix + self.encode(row["text"] or "") + [self.eos]
            return ids, [True] * len(ids)
        if self.fmt == "alpaca":
            fields = {k: row.get(k) or "" for k in ("instruction", "input")}
            prompt = (ALPACA_PROMPT_WITH_INPUT if fields["input"] else ALPACA_PROMPT).format(**fields)
            prompt_ids = self.prefix + self.encode(prompt)
            response = self.encode(row["output"] or "") + [self.eos]
            return prompt_ids + response, [self.train_on_prompt] * len(prompt_ids) + [True] * len(response)
        return self._chat(_messages(row, index), index)

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=generation_prompt)

    def _chat(self, messages: list[dict[str, str]], index: int) -> tuple[list[int], list[bool]]:
        """Assistant spans found by rendering turn by turn: the conversation up to turn i with the
        generation prompt is where reply i starts, up to and including turn i is where it ends (the
        template's end-of-turn included). Token boundaries are the common prefixes of those
        renderings' tokens with the whole conversation's, so a token that straddles a boundary
        is never split. A conversation that ends with a reply ends with EOS (added if the template
        does not put it there)."""
        if not messages:
            return [], []
        prefix = self.prefix if self.template is FALLBACK_CHAT_TEMPLATE else []
        full = self.render(messages)
        ids = prefix + self.encode(full)
        mask = [self.train_on_prompt] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or self.train_on_prompt:
                continue
            start_text = self.render(messages[:i], generation_prompt=True) if i else ""
            end_text = self.render(messages[:i + 1])
            if not (end_text.startswith(start_text) and full.startswith(end_text)):
                raise ValueError(
                    f"row {index}: the chat template does not render turn by turn (the conversation up to turn "
                    f"{i} is not a prefix of the whole one), so assistant tokens cannot be located; "
                    "use a template without history-dependent rendering or set train_on_prompt")
            start = len(prefix) + _common_prefix(self.encode(start_text), ids[len(prefix):])
            end = len(prefix) + _common_prefix(self.encode(end_text), ids[len(prefix):])
            mask[start:end] = [True] * (end - start)
        if (messages[-1]["role"] == "assistant" and self.eos is not None
                and not full.rstrip().endswith(self.tok.eos_token)):
            ids, mask = ids + [self.eos], mask + [True]
        return ids, mask


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


def tokenize(dataset: datasets.Dataset, tokenizer: Any, fmt: str, max_seq_length: Optional[int],
             train_on_prompt: bool = False, truncation: str = "truncate", *, cache_dir: Optional[str] = None,
             source: str = "data") -> tuple[datasets.Dataset, TokenizeStats]:
    """Rows -> ``input_ids``, ``labels`` (-100 where not trained), ``length`` (before truncation),
    ``n_targets`` (``labels[1:] != -100``); rows without a target are dropped.

    ``max_seq_length`` None: no limit (packing cuts blocks instead). Longer rows are cut at the
    end (``truncation='truncate'``, counted in the stats) or refused (``'refuse'``: ValueError
    with the count and the longest length). Cached in ``cache_dir`` (see module docstring).
    """
    if truncation not in ("truncate", "refuse"):
        raise ValueError(f"truncation must be 'truncate' or 'refuse', got {truncation!r}")
    fmt = detect_format(dataset.column_names, fmt, source)
    key = Hasher.hash([dataset._fingerprint, Hasher.hash(tokenizer), fmt, max_seq_length, train_on_prompt,
                       CACHE_VERSION])
    renderer = Renderer(tokenizer, fmt, train_on_prompt)

    def rows_to_tokens(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "n_targets": []}
        for j, index in enumerate(indices):
            try:
                ids, mask = renderer({k: v[j] for k, v in batch.items()}, index)
            except ValueError as err:
                raise ValueError(f"{source}: {err}") from None
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

    tokenized = dataset.map(rows_to_tokens, batched=True, with_indices=True, remove_columns=dataset.column_names,
                            cache_file_name=_cache_file(cache_dir, "tokenized", key), load_from_cache_file=True,
                            new_fingerprint=key, desc=f"tokenizing {source}")
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


def pack(dataset: datasets.Dataset, block_size: int, *, cache_dir: Optional[str] = None) -> datasets.Dataset:
    """Concatenate the rows and cut blocks of ``block_size`` tokens (the last one may be shorter).

    Labels travel with their tokens (a sample's first token is already -100). No attention
    masking between samples in a block: a sample sees the previous ones, as HF's ``group_texts``.
    """
    key = Hasher.hash([dataset._fingerprint, block_size, CACHE_VERSION])

    def blocks(table: pa.Table) -> pa.Table:
        ids, labels = (table.column(name).combine_chunks().flatten().to_numpy() for name in ("input_ids", "labels"))
        starts = np.arange(0, len(ids), block_size)
        offsets = pa.array(np.append(starts, len(ids)), pa.int64())
        targets = labels != IGNORE_INDEX
        targets[starts] = False  # a block's first label is never predicted (the causal shift)
        return pa.table({"input_ids": pa.LargeListArray.from_arrays(offsets, pa.array(ids)),
                         "labels": pa.LargeListArray.from_arrays(offsets, pa.array(labels)),
                         "length": np.diff(np.append(starts, len(ids))),
                         "n_targets": np.add.reduceat(targets.astype(np.int64), starts)})

    packed = dataset.with_format("arrow").map(blocks, batched=True, batch_size=None,
                                              remove_columns=dataset.column_names,
                                              cache_file_name=_cache_file(cache_dir, "packed", key),
                                              load_from_cache_file=True, new_fingerprint=key, desc="packing")
    return packed.with_format(None)


@dataclass
class PreparedData:
    """Tokenised (and packed) train and eval sets, ready for ``GlobalBatches`` / ``EvalBatches``."""

    train: datasets.Dataset
    eval: Optional[datasets.Dataset]
    format: str
    stats: dict[str, TokenizeStats]  # "train", and "eval" when there is one


def prepare_data(config: DataConfig, tokenizer: Any, *, seed: int, cache_dir: Optional[str]) -> PreparedData:
    """Load, split (``eval_fraction``) or load ``eval_data``, tokenise and pack, as ``config`` says."""
    if config.data is None:
        raise ValueError("no training data: set data (a .jsonl/.json/.csv/.parquet/.arrow file or a folder)")
    train = load_data(config.data, cache_dir)
    fmt = detect_format(train.column_names, config.format, config.data)
    evaluation, eval_source = None, None
    if config.eval_data:
        evaluation, eval_source = load_data(config.eval_data, cache_dir), config.eval_data
    elif config.eval_fraction > 0:
        parts = train.train_test_split(test_size=config.eval_fraction, seed=seed)
        train, evaluation, eval_source = parts["train"], parts["test"], f"{config.data} (eval split)"
    limit = None if config.packing else config.max_seq_length
    prepared, stats = {}, {}
    for name, dataset, source in (("train", train, config.data), ("eval", evaluation, eval_source)):
        if dataset is None:
            continue
        dataset, stats[name] = tokenize(dataset, tokenizer, config.format, limit, config.train_on_prompt,
                                        config.truncation, cache_dir=cache_dir, source=source)
        prepared[name] = pack(dataset, config.max_seq_length, cache_dir=cache_dir) if config.packing else dataset
    return PreparedData(train=prepared["train"], eval=prepared.get("eval"), format=fmt, stats=stats)

"""Offline export of a compact adapter: a peft LoRA dir, or a merged Hugging Face model folder.

Everything runs on CPU without the training job. The model is only ever built on the
*meta* device (from the base ``config.json``), to learn which tensor each adapted module
uses: its own factors, a shared bank tensor, or the B of the representative it is tied to.
Values come from the compact ``adapter_model.safetensors``.

``merge_into_base`` streams the base checkpoint tensor by tensor (one base shard open at a
time) and holds at most one output shard in memory: each ``.weight`` of an adapted Linear
becomes ``W + scaling * B @ A``, computed in fp32 and cast back to the base dtype (or
``dtype``). Output shards, names and index are those ``save_pretrained`` writes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import struct
from dataclasses import dataclass
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters.config import AdapterConfig
from ..adapters.count import build_on_meta
from ..adapters.inject import adapter_layers
from ..adapters.layers import AdapterLinear
from ..utils.atomic import fsync_path
from .adapter import COMPACT_FORMAT, CONFIG, WEIGHTS, compact_state_dict, export_peft

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# Files of a base folder that are weights (never copied: the merged shards replace them).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_FLOAT_CODES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*$", re.IGNORECASE)


class ExportError(ValueError):
    """Bad input to an export; the message is one line for the user."""


@dataclass(frozen=True)
class LayerDelta:
    """What one adapted Linear adds: ``scaling * B @ A``. Shared factors are the same tensor
    object in every LayerDelta that uses them (nothing is materialised per layer)."""

    A: torch.Tensor  # (r, in_features)
    B: torch.Tensor  # (out_features, r)
    scaling: float

    def delta(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, shape (out_features, in_features)."""
        return (self.B.float() @ self.A.float()) * self.scaling


# ---------------------------------------------------------------------------------------------
# The compact adapter, resolved against the base model's architecture.


def read_compact_config(compact_dir: str) -> dict:
    """The compact export's ``adapter_config.json``, checked to be one."""
    path = os.path.join(compact_dir, CONFIG)
    if not os.path.isdir(compact_dir):
        raise ExportError(f"adapter folder {compact_dir!r} does not exist")
    if not os.path.isfile(path):
        raise ExportError(f"no {CONFIG} in {compact_dir!r}: not an adapter folder")
    with open(path) as f:
        config = json.load(f)
    if config.get("format") != COMPACT_FORMAT:
        kind = "a peft adapter" if "peft_type" in config else f"format={config.get('format')!r}"
        raise ExportError(f"{compact_dir!r} is {kind}, not a ds_aslora compact export")
    if not os.path.isfile(os.path.join(compact_dir, WEIGHTS)):
        raise ExportError(f"no {WEIGHTS} in {compact_dir!r}: incomplete compact export")
    return config


def _config_source(base: str) -> str:
    """A base model folder or its config.json."""
    if os.path.isdir(base):
        if not os.path.isfile(os.path.join(base, "config.json")):
            raise ExportError(f"no config.json in base model folder {base!r}")
    elif not os.path.isfile(base):
        raise ExportError(f"base model {base!r} does not exist")
    return base


def _adapted_meta_model(compact_dir: str, base_config: str) -> tuple[nn.Module, dict[int, torch.Tensor], dict]:
    """(model on meta with the compact's adapters and ties, {id(meta tensor): stored value},
    compact config). Every key is checked against the model; nothing is copied into meta."""
    config = read_compact_config(compact_dir)
    try:
        cfg = AdapterConfig.from_dict(config["adapter"])
        model = build_on_meta(_config_source(base_config), cfg)
    except ExportError:
        raise
    except (ValueError, OSError, KeyError) as err:
        raise ExportError(f"cannot build the base model from {base_config!r} with the adapter of "
                          f"{compact_dir!r}: {err}") from err
    layers = dict(adapter_layers(model))
    ties = config.get("ties", {})
    unknown = sorted((set(ties) | set(ties.values())) - set(layers))
    if unknown:
        raise ExportError(f"the tie map names modules the base model lacks: {unknown[:5]}")
    for path, rep in ties.items():
        try:
            layers[path].tie_to(layers[rep])
        except ValueError as err:
            raise ExportError(f"bad tie {path} -> {rep}: {err}") from err
    try:
        stored = load_file(os.path.join(compact_dir, WEIGHTS))
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ExportError(f"cannot read {os.path.join(compact_dir, WEIGHTS)!r}: {err}") from err
    expected = compact_state_dict(model, read=lambda t: t)  # key -> meta tensor of the model
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or extra:
        raise ExportError(f"the compact adapter {compact_dir!r} does not fit the base model {base_config!r}: "
                          f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                          f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    values = {}
    for key, meta in expected.items():
        if tuple(stored[key].shape) != tuple(meta.shape):
            raise ExportError(f"{key}: the adapter stores shape {tuple(stored[key].shape)}, the base model "
                              f"needs {tuple(meta.shape)}")
        values[id(meta)] = stored[key]
    return model, values, config


def resolve_adapter(compact_dir: str, base_config: str) -> dict[str, LayerDelta]:
    """Per adapted module path (e.g. ``model.layers.0.self_attn.q_proj``), in model order, the
    A, B and scaling it uses. ``base_config``: the base model folder or its config.json."""
    model, values, _ = _adapted_meta_model(compact_dir, base_config)
    return _deltas(model, values)


def _deltas(model: nn.Module, values: dict[int, torch.Tensor]) -> dict[str, LayerDelta]:
    # weight_A / weight_B are the tensors the layer reads: its own, the bank's, or its representative's B.
    return {path: LayerDelta(values[id(layer.weight_A)], values[id(layer.weight_B)], layer.scaling)
            for path, layer in adapter_layers(model)}


def write_peft(compact_dir: str, base_config: str, out_dir: str,
               base_model_name_or_path: Optional[str] = None) -> None:
    """A plain peft LoRA dir (``export_peft``'s output: shared and tied factors materialised
    under every layer's key). The recorded base defaults to the compact's, else ``base_config``."""
    model, values, config = _adapted_meta_model(compact_dir, base_config)
    name = base_model_name_or_path or config.get("base_model_name_or_path") or base_config
    # clone: a shared tensor is written once per layer, and safetensors refuses shared storage.
    export_peft(model, out_dir, name, read=lambda t: values[id(t)].clone())


# ---------------------------------------------------------------------------------------------
# The base checkpoint, read one shard at a time.


@dataclass(frozen=True)
class _Entry:
    file: str  # shard path
    key: str
    code: str  # safetensors dtype code
    shape: tuple[int, ...]
    nbytes: int


def _header(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as err:
        raise ExportError(f"cannot read safetensors header of {path!r}: {err}") from err
    header.pop("__metadata__", None)
    return header


def base_weight_files(base_dir: str) -> list[str]:
    """The base checkpoint's safetensors files, in index order."""
    if not os.path.isdir(base_dir):
        raise ExportError(f"base model folder {base_dir!r} does not exist")
    index = os.path.join(base_dir, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map") or {}
        files = list(dict.fromkeys(weight_map.values()))
        absent = [name for name in files if not os.path.isfile(os.path.join(base_dir, name))]
        if not files or absent:
            raise ExportError(f"{index!r} names shards that are missing: {absent[:3] or 'none listed'}")
        return [os.path.join(base_dir, name) for name in files]
    if os.path.isfile(os.path.join(base_dir, SAFE_WEIGHTS)):
        return [os.path.join(base_dir, SAFE_WEIGHTS)]
    legacy = [n for n in sorted(os.listdir(base_dir)) if n.endswith((".bin", ".pth", ".pt"))]
    hint = f" (found {legacy[:3]}: convert them to safetensors first)" if legacy else ""
    raise ExportError(f"base model folder {base_dir!r} has no {SAFE_WEIGHTS} or {SAFE_INDEX}{hint}")


def _entries(files: list[str]) -> list[_Entry]:
    entries, seen = [], {}
    for path in files:
        for key, info in _header(path).items():
            if key in seen:
                raise ExportError(f"tensor {key!r} is in two base shards: {seen[key]!r} and {path!r}")
            seen[key] = path
            start, end = info["data_offsets"]
            entries.append(_Entry(path, key, info["dtype"], tuple(info["shape"]), end - start))
    return entries


def _match_weights(deltas: dict[str, LayerDelta], keys: set[str], prefix: str) -> dict[str, str]:
    """checkpoint key -> adapted module path. Keys are ``<path>.weight``; a checkpoint saved
    without (or with) the base-model prefix (``model.`` for LLaMA) also matches."""
    found, unmatched = {}, []
    for path in deltas:
        candidates = [f"{path}.weight"]
        if prefix and path.startswith(prefix + "."):
            candidates.append(f"{path[len(prefix) + 1:]}.weight")
        elif prefix:
            candidates.append(f"{prefix}.{path}.weight")
        key = next((k for k in candidates if k in keys), None)
        if key is None:
            unmatched.append(path)
        else:
            found[key] = path
    if unmatched:
        raise ExportError(f"the base checkpoint has no weight for {len(unmatched)} adapted module(s): "
                          f"{unmatched[:5]}{' ...' if len(unmatched) > 5 else ''} (looked for '<path>.weight')")
    return found


# ---------------------------------------------------------------------------------------------
# The merged folder.


def parse_size(size: Union[int, str]) -> int:
    """Bytes from ``2GB`` (10^9), ``2GiB`` (2^30), ``500MB``, or an int."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise ExportError(f"max_shard_size {size!r}: expected bytes or a size like '2GB', '500MB', '4GiB'")
        unit = (match.group(2) or "B").upper()
        base = 1024 if "I" in unit else 1000
        value = int(float(match.group(1)) * base ** ("BKMGT".index(unit[0]) if unit != "B" else 0))
    if value <= 0:
        raise ExportError(f"max_shard_size must be positive, got {size!r}")
    return value


def _dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _plan_shards(entries: list[_Entry], out_bytes: dict[str, int], max_bytes: int) -> list[list[_Entry]]:
    """In checkpoint order, as huggingface_hub's splitter (save_pretrained): a tensor that would
    tip a shard over the limit starts the next one; one bigger than the limit gets its own."""
    shards: list[list[_Entry]] = []
    current: list[_Entry] = []
    size = 0
    for entry in entries:
        n = out_bytes[entry.key]
        if n > max_bytes:
            shards.append([entry])
            continue
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    if current or not shards:
        shards.append(current)
    return shards


class _Reader:
    """Tensors of the base checkpoint, keeping only one shard file open."""

    def __init__(self) -> None:
        self.path: Optional[str] = None
        self.handle = None

    def get(self, entry: _Entry) -> torch.Tensor:
        if entry.file != self.path:
            self.close()
            self.handle = safe_open(entry.file, framework="pt", device="cpu").__enter__()
            self.path = entry.file
        return self.handle.get_tensor(entry.key)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.__exit__(None, None, None)
        self.path, self.handle = None, None


def _check_mergeable(entries: list[_Entry], adapted: dict[str, str], deltas: dict[str, LayerDelta]) -> None:
    """From the headers alone, before anything is written: dtype and shape of every adapted weight."""
    for entry in entries:
        if entry.key not in adapted:
            continue
        delta = deltas[adapted[entry.key]]
        want = (delta.B.shape[0], delta.A.shape[1])
        if entry.code not in _FLOAT_CODES:
            raise ExportError(f"{entry.key} is stored as {entry.code}: only F32/F16/BF16/F64 base weights can be "
                              f"merged (quantized bases are not supported)")
        if entry.shape != want:
            raise ExportError(f"{entry.key} has shape {entry.shape} in the base checkpoint, the adapter needs {want}")


def _check_out(out_dir: str, overwrite: bool) -> None:
    """Refuse a non-empty ``out_dir`` unless ``overwrite``."""
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ExportError(f"output {out_dir!r} exists and is not a folder")
        if os.listdir(out_dir) and not overwrite:
            raise ExportError(f"output folder {out_dir!r} exists and is not empty (overwrite=True / --overwrite "
                              f"replaces it)")


def _prepare_out(out_dir: str, overwrite: bool) -> str:
    """A fresh temporary sibling of ``out_dir`` to build the folder in."""
    out_dir = os.path.abspath(out_dir)
    _check_out(out_dir, overwrite)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _publish(tmp: str, out_dir: str) -> None:
    """Rename the finished temporary folder into place (the old one, if any, goes after)."""
    out_dir = os.path.abspath(out_dir)
    old = None
    if os.path.isdir(out_dir):
        if os.listdir(out_dir):
            old = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.old-{os.getpid()}")
            os.replace(out_dir, old)
        else:
            os.rmdir(out_dir)
    os.replace(tmp, out_dir)
    fsync_path(os.path.dirname(out_dir))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _copy_side_files(base_dir: str, out_dir: str, dtype: Optional[torch.dtype]) -> list[str]:
    """config.json (dtype updated when cast), generation config, tokenizer files, chat template,
    custom code, license: every top-level regular file that is not a weight file."""
    copied = []
    for name in sorted(os.listdir(base_dir)):
        src = os.path.join(base_dir, name)
        if name.startswith(".") or not os.path.isfile(src) or name.endswith(_WEIGHT_SUFFIXES):
            continue
        if name == "config.json" and dtype is not None:
            with open(src) as f:
                config = json.load(f)
            name_of_dtype = str(dtype).removeprefix("torch.")
            config["dtype"] = name_of_dtype  # transformers 5; older versions read torch_dtype
            if "torch_dtype" in config:
                config["torch_dtype"] = name_of_dtype
            with open(os.path.join(out_dir, name), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
        else:
            shutil.copy2(src, os.path.join(out_dir, name))
        copied.append(name)
    return copied


def merge_into_base(base_dir: str, compact_dir: str, out_dir: str, max_shard_size: Union[int, str] = "2GB",
                    dtype: Union[None, str, torch.dtype] = None, overwrite: bool = False) -> dict:
    """Write a merged Hugging Face model folder to ``out_dir`` (loads with ``from_pretrained``).

    Args:
        base_dir: the base model folder (config.json + safetensors, single or sharded).
        compact_dir: the compact adapter export (``export_compact``).
        out_dir: the merged folder; built in a temporary sibling and renamed into place.
        max_shard_size: bytes per output shard (``2GB``, ``4GiB`` or an int); one file when it fits.
        dtype: cast floating-point tensors to this dtype (``bf16``...); default: the base's dtypes.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns ``{"out_dir", "shards", "total_size", "merged"}`` (merged: number of adapted weights).
    Raises ExportError before writing anything when the inputs do not fit together.
    """
    max_bytes = parse_size(max_shard_size)
    real_out = os.path.realpath(out_dir)
    for name, path in (("base model", base_dir), ("adapter", compact_dir)):
        real = os.path.realpath(path)
        if real == real_out or real.startswith(real_out + os.sep):
            raise ExportError(f"output folder {out_dir!r} would replace the {name} folder {path!r}")
    out_dtype = _dtype(dtype)
    files = base_weight_files(base_dir)
    _check_out(out_dir, overwrite)
    model, values, _ = _adapted_meta_model(compact_dir, base_dir)
    deltas = _deltas(model, values)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, AdapterLinear) and getattr(model.config, "tie_word_embeddings", False):
        raise ExportError("the adapter targets the output head, which this model ties to the input embeddings: "
                          "a merge cannot change one without the other")
    prefix = getattr(model, "base_model_prefix", "") or ""
    del model
    entries = _entries(files)
    adapted = _match_weights(deltas, {e.key for e in entries}, prefix)
    _check_mergeable(entries, adapted, deltas)

    def out_bytes(e: _Entry) -> int:
        if out_dtype is not None and e.code in _FLOAT_CODES:
            return math.prod(e.shape) * out_dtype.itemsize
        return e.nbytes

    sizes = {e.key: out_bytes(e) for e in entries}
    shards = _plan_shards(entries, sizes, max_bytes)
    tmp = _prepare_out(out_dir, overwrite)
    reader = _Reader()
    try:
        names = [SAFE_WEIGHTS] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for name, shard in zip(names, shards, strict=True):
            tensors = {}
            for entry in shard:
                tensor = reader.get(entry)
                target = out_dtype if out_dtype is not None and tensor.dtype in _FLOAT_CODES.values() \
                    else tensor.dtype
                if entry.key in adapted:  # W + scaling * B @ A in fp32, then the output dtype
                    tensor = (tensor.float() + deltas[adapted[entry.key]].delta()).to(target)
                tensors[entry.key] = tensor.to(target).contiguous()
                weight_map[entry.key] = name
            path = os.path.join(tmp, name)
            save_file(tensors, path, metadata={"format": "pt"})
            fsync_path(path)
            log.info("wrote %s (%d tensors, %.2f GB)", name, len(tensors), sum(sizes[e.key] for e in shard) / 1e9)
            del tensors
        reader.close()
        total = sum(sizes.values())
        if len(shards) > 1:
            index = {"metadata": {"total_size": total, "total_parameters": sum(math.prod(e.shape) for e in entries)},
                     "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(tmp, SAFE_INDEX), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
        _copy_side_files(base_dir, tmp, out_dtype)
        _publish(tmp, out_dir)
    finally:
        reader.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out_dir": os.path.abspath(out_dir), "shards": names, "total_size": total, "merged": len(adapted)}

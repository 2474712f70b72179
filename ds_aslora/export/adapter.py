"""Adapter export: a plain peft LoRA directory for servers, and a compact format for us.

* peft (``export_peft``): ``adapter_config.json`` + ``adapter_model.safetensors`` with
  ``base_model.model.<path>.lora_{A,B}.weight`` for every adapted module. Shared and tied
  tensors are materialised per layer, because vLLM, LoRAX and ``PeftModel`` know nothing
  about cross-layer sharing.
* compact (``export_compact`` / ``load_compact``): every trainable tensor once (bank tensors
  under ``shared_bank.<key>``, live per-layer factors under ``<path>.lora_{A,B}``) plus the
  tie map of merged ASLoRA layers; loads back into a model for more training or export.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters.config import AdapterConfig
from ..adapters.inject import BANK_NAME, adapter_config, adapter_layers, find_bank, inject_adapters, module_type
from ..merging.zero_state import gather_fp32
from ..utils.atomic import atomic_write
from ..utils.ranks import raise_together, rank_and_world

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
COMPACT_FORMAT = "ds_aslora.compact"


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").clone().contiguous()


def _write(out_dir: str, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Weights, then config, each via a temporary name (an interrupted export never leaves
    a half-written file under the final name)."""
    os.makedirs(out_dir, exist_ok=True)

    def dump_config(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    atomic_write(os.path.join(out_dir, WEIGHTS), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(os.path.join(out_dir, CONFIG), dump_config)


def _base_name(model: nn.Module, given: Optional[str]) -> Optional[str]:
    return given or getattr(getattr(model, "config", None), "_name_or_path", None) or None


Read = Callable[[torch.Tensor], torch.Tensor]


def peft_state_dict(model: nn.Module, read: Read = _plain) -> dict[str, torch.Tensor]:
    tensors = {}
    for path, layer in adapter_layers(model):
        tensors[f"base_model.model.{path}.lora_A.weight"] = read(layer.weight_A)
        tensors[f"base_model.model.{path}.lora_B.weight"] = read(layer.weight_B)
    return tensors


def export_peft(model: nn.Module, out_dir: str, base_model_name_or_path: Optional[str] = None,
                read: Read = _plain) -> None:
    """A standard peft LoRA adapter (loads with ``PeftModel.from_pretrained``). ``read`` maps
    a model tensor to the value to write (``export_engine`` passes the fp32 masters)."""
    cfg = adapter_config(model)
    layers = list(adapter_layers(model))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": sorted({module_type(p) for p, _ in layers}),
        "base_model_name_or_path": _base_name(model, base_model_name_or_path), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }
    _write(out_dir, peft_state_dict(model, read), config)


def compact_state_dict(model: nn.Module, read: Read = _plain) -> dict[str, torch.Tensor]:
    """Every live trainable adapter tensor once, keyed relative to the model root."""
    bank = find_bank(model)
    tensors = {f"{BANK_NAME}.{key}": read(bank.get(key)) for key in bank.keys()}
    for path, layer in adapter_layers(model):
        if layer.lora_A is not None:
            tensors[f"{path}.lora_A"] = read(layer.lora_A)
        if layer.lora_B is not None and not layer.is_tied:
            tensors[f"{path}.lora_B"] = read(layer.lora_B)
    return tensors


def tie_map(model: nn.Module) -> dict[str, str]:
    """Path of each tied layer -> path of the representative whose B it uses."""
    paths = {id(layer): path for path, layer in adapter_layers(model)}
    return {path: paths[id(layer.tied_to)] for path, layer in adapter_layers(model) if layer.is_tied}


def export_compact(model: nn.Module, out_dir: str, base_model_name_or_path: Optional[str] = None,
                   read: Read = _plain) -> None:
    config = {"format": COMPACT_FORMAT, "version": 1, "adapter": adapter_config(model).to_dict(),
              "ties": tie_map(model), "base_model_name_or_path": _base_name(model, base_model_name_or_path)}
    _write(out_dir, compact_state_dict(model, read), config)


def export_engine(engine: Any, *, peft_dir: Optional[str] = None, compact_dir: Optional[str] = None,
                  base_model_name_or_path: Optional[str] = None) -> None:
    """Collective: every rank calls it. Exports a DeepSpeed job's adapters from their fp32
    masters (not the bf16 working copy; under ZeRO-3 not the empty partitions), gathered one
    tensor at a time so no device ever holds the whole adapter set; they collect in rank 0's
    host memory and rank 0 alone writes."""
    rank = rank_and_world()[0]
    model = engine.module
    params = [p for _, layer in adapter_layers(model) for p in (layer.lora_A, layer.lora_B) if p is not None]
    params += list(find_bank(model).parameters())
    masters: dict[int, torch.Tensor] = {}
    for p in params:
        value = gather_fp32(p)
        if rank == 0:
            masters[id(p)] = _plain(value)
    error = None
    if rank == 0:
        def read(t: torch.Tensor) -> torch.Tensor:
            return masters[id(t)].clone()  # a shared tensor is written once per layer

        try:
            if peft_dir is not None:
                export_peft(model, peft_dir, base_model_name_or_path, read)
            if compact_dir is not None:
                export_compact(model, compact_dir, base_model_name_or_path, read)
        except Exception as err:  # noqa: BLE001 - safetensors' I/O errors are not OSError; no rank may wait
            error = f"export failed: {type(err).__name__}: {err}"
    raise_together(error, OSError)


def load_compact(model: nn.Module, in_dir: str) -> nn.Module:
    """Load a compact export into ``model`` (injecting the adapters if it has none)."""
    conf_path = os.path.join(in_dir, CONFIG)
    if not os.path.isfile(conf_path):
        raise FileNotFoundError(f"no {CONFIG} in {in_dir!r}: not an adapter directory")
    with open(conf_path) as f:
        config = json.load(f)
    if config.get("format") != COMPACT_FORMAT:
        raise ValueError(f"{in_dir!r} is not a ds_aslora compact export (format={config.get('format')!r})")
    cfg = AdapterConfig.from_dict(config["adapter"])
    if find_bank(model) is None:
        inject_adapters(model, cfg)
    elif adapter_config(model) != cfg:
        raise ValueError(f"model adapters {adapter_config(model)} differ from the export's {cfg}")
    layers = dict(adapter_layers(model))
    unknown = sorted((set(config["ties"]) | set(config["ties"].values())) - set(layers))
    if unknown:
        raise ValueError(f"tie map names modules this model lacks: {unknown[:5]}")
    for layer in layers.values():
        layer.tie_to(None)
    for path, rep in config["ties"].items():
        layers[path].tie_to(layers[rep])
    tensors = load_file(os.path.join(in_dir, WEIGHTS))
    expected = compact_state_dict(model)
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"compact export does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if params[key].shape != value.shape:
                raise ValueError(f"{key}: export has shape {tuple(value.shape)}, model {tuple(params[key].shape)}")
            params[key].copy_(value)
    return model

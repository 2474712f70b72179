"""Run configuration of the training job: typed sections, one flat namespace for YAML and CLI.

``parse_run_config(argv)`` reads ``--config run.yaml`` (a flat mapping: each key is a field
name, the same name as its command-line flag, no sections) and then the command line, which
overrides the file field by field. Every field name is unique across sections, so a name
means one thing everywhere; unknown names fail with the closest valid one.

Settings that also exist in a DeepSpeed JSON (batch sizes, learning rate, weight decay,
clipping, precision, warmup and total steps) default to *unset* (``None``, or ``"auto"`` for
``dtype``): ``derive`` takes the JSON's explicit value then, its documented default when
neither sets it, and refuses a run config and a JSON that set different values. ``derive`` is
the one place where effective numbers come from; ``deepspeed_config`` writes them into the
DeepSpeed config and removes its ``scheduler`` (the loop drives the learning rate with
``lr_at``: DeepSpeed's ``WarmupCosineLR`` trains its first steps at lr 0).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from ..atomic import write_text
from ..config import AdapterConfig
from ..ds_config import AUTO, auto_values, fill_auto

log = logging.getLogger(__name__)

DTYPES = ("auto", "bf16", "fp16", "fp32")
FORMATS = ("auto", "text", "alpaca", "chat")
TRUNCATIONS = ("truncate", "refuse")
SCHEDULERS = ("cosine", "linear", "constant")
# DeepSpeed scheduler types whose shape the loop's schedule (lr_at) reproduces.
DS_SCHEDULERS = {"WarmupCosineLR": "cosine", "WarmupDecayLR": "linear", "WarmupLR": "constant"}
# Defaults of the settings a DeepSpeed JSON may also hold (used when neither sets them).
DEFAULT_LEARNING_RATE = 2e-4
DEFAULT_MICRO_BATCH_SIZE = 1
DEFAULT_GRADIENT_ACCUMULATION_STEPS = 1
DEFAULT_WEIGHT_DECAY = 0.0
DEFAULT_MAX_GRAD_NORM = 1.0
DEFAULT_WARMUP_RATIO = 0.03
DEFAULT_LR_SCHEDULER = "cosine"


class ConfigError(ValueError):
    """A bad run configuration; its message is one line for the user (train.py prints it and exits)."""


def _help(text: str, default: Any = None) -> Any:
    return field(default=default, metadata={"help": text})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    _check(value in choices, f"{name} must be one of {list(choices)}, got {value!r}")


def _check_min(name: str, value: Optional[float], minimum: float) -> None:
    _check(value is None or value >= minimum, f"{name} must be >= {minimum}, got {value!r}")


@dataclass
class ModelConfig:
    """Which base model, in which precision."""

    model: Optional[str] = _help(
        "base model: a Hugging Face model folder, or 'tiny' (a small random Llama for smoke tests); "
        "unset: the trainer's built-in default")
    dtype: str = _help(
        "auto | bf16 | fp16 | fp32; auto: the DeepSpeed config's bf16/fp16.enabled if set, else bf16 on a "
        "GPU with bf16 support and fp32 otherwise", "auto")
    activation_checkpointing: bool = _help(
        "recompute activations in the backward (non-reentrant): far less memory for 13B-70B", True)
    trust_remote_code: bool = _help("allow model code shipped with the checkpoint (transformers' flag)", False)

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)


@dataclass
class DataConfig:
    """What to train on and how it becomes token sequences."""

    data: Optional[str] = _help(
        "training data: a .jsonl/.json/.csv/.parquet/.arrow file or a datasets save_to_disk folder; unset: the "
        "trainer's built-in sample")
    eval_data: Optional[str] = _help("evaluation data, same forms as data (exclusive with eval_fraction)")
    format: str = _help(
        "auto | text | alpaca | chat; auto: from the columns (messages/conversations: chat, "
        "instruction+output: alpaca, text: text)", "auto")
    max_seq_length: int = _help("tokens per sequence (longer ones: see truncation)", 2048)
    packing: bool = _help(
        "concatenate samples into max_seq_length blocks (no attention masking between samples; no "
        "sample is truncated)", False)
    eval_fraction: float = _help(
        "hold out this fraction of data for evaluation (deterministic with seed); 0: none", 0.0)
    train_on_prompt: bool = _help(
        "alpaca/chat: also train on prompt tokens; default: loss on responses (assistant turns) only", False)
    truncation: str = _help(
        "truncate | refuse: cut sequences longer than max_seq_length (counted and logged), or stop", "truncate")
    data_cache_dir: Optional[str] = _help(
        "where tokenised datasets are cached (per node), so a restart does not tokenise again; unset: "
        "<cache root>/datasets, the cache root being $DS_ASLORA_CACHE, else $XDG_CACHE_HOME/ds_aslora, else "
        "~/.cache/ds_aslora (outside output_dir, which bad input leaves untouched)")

    def __post_init__(self) -> None:
        _check_choice("format", self.format, FORMATS)
        _check_choice("truncation", self.truncation, TRUNCATIONS)
        _check_min("max_seq_length", self.max_seq_length, 2)
        _check(0.0 <= self.eval_fraction < 1.0, f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        _check(not (self.eval_data and self.eval_fraction > 0),
               "set eval_data or eval_fraction, not both")


@dataclass
class TrainingConfig:
    """Optimisation. Unset (None) fields come from the DeepSpeed config, else the default named."""

    learning_rate: Optional[float] = _help(
        f"peak learning rate; unset: optimizer.params.lr of the DeepSpeed config, else {DEFAULT_LEARNING_RATE}")
    micro_batch_size: Optional[int] = _help(
        "sequences per rank per forward; unset: train_micro_batch_size_per_gpu, else "
        f"{DEFAULT_MICRO_BATCH_SIZE}")
    gradient_accumulation_steps: Optional[int] = _help(
        "micro-batches per optimizer step; unset: the DeepSpeed config's, else "
        f"{DEFAULT_GRADIENT_ACCUMULATION_STEPS}")
    max_steps: Optional[int] = _help(
        "optimizer steps to train; unset: scheduler.params.total_num_steps of the DeepSpeed config (required "
        "from one of them)")
    warmup_steps: Optional[int] = _help(
        "linear warmup steps (exclusive with warmup_ratio); unset: scheduler.params.warmup_num_steps, else "
        f"warmup_ratio {DEFAULT_WARMUP_RATIO}")
    warmup_ratio: Optional[float] = _help("warmup steps as a fraction of max_steps, rounded up")
    lr_scheduler: Optional[str] = _help(
        "cosine | linear | constant decay after warmup (to 0 at max_steps); unset: from the DeepSpeed "
        f"scheduler type (WarmupCosineLR, WarmupDecayLR, WarmupLR), else {DEFAULT_LR_SCHEDULER}")
    weight_decay: Optional[float] = _help(
        f"AdamW weight decay; unset: optimizer.params.weight_decay, else {DEFAULT_WEIGHT_DECAY}")
    max_grad_norm: Optional[float] = _help(
        f"gradient clipping threshold (0: none); unset: gradient_clipping, else {DEFAULT_MAX_GRAD_NORM}")
    seed: int = _help("seed of the adapter initialisation, the data order and the eval split", 42)
    eval_interval: int = _help("evaluate every this many optimizer steps and at the end; 0: never", 100)
    eval_batches: Optional[int] = _help("micro-batches per rank per evaluation; unset: the whole eval set")
    dist_timeout_minutes: float = _help(
        "timeout of collectives (NCCL/gloo): a rank stuck or gone without a broken connection stops the others "
        "after at most this long (a killed process is noticed at once); setup waits on slow one-rank work "
        "(tokenising, model conversion) use 4 hours", 30.0)

    def __post_init__(self) -> None:
        _check(self.learning_rate is None or self.learning_rate > 0,
               f"learning_rate must be > 0, got {self.learning_rate!r}")
        _check_min("micro_batch_size", self.micro_batch_size, 1)
        _check_min("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _check_min("max_steps", self.max_steps, 1)
        _check_min("warmup_steps", self.warmup_steps, 0)
        _check(self.warmup_ratio is None or 0.0 <= self.warmup_ratio < 1.0,
               f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        _check(self.warmup_steps is None or self.warmup_ratio is None, "set warmup_steps or warmup_ratio, not both")
        if self.lr_scheduler is not None:
            _check_choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _check_min("weight_decay", self.weight_decay, 0.0)
        _check_min("max_grad_norm", self.max_grad_norm, 0.0)
        _check_min("eval_interval", self.eval_interval, 0)
        _check_min("eval_batches", self.eval_batches, 1)
        _check(self.dist_timeout_minutes > 0, f"dist_timeout_minutes must be > 0, got {self.dist_timeout_minutes!r}")


@dataclass
class LoggingConfig:
    """Where results go and how often the loop reports."""

    output_dir: str = _help("checkpoints, exported adapters, TensorBoard events (runs/<run_name>)", "outputs")
    run_name: Optional[str] = _help("TensorBoard run name; unset: the last part of output_dir")
    log_interval: int = _help("log loss, lr, grad norm and throughput every this many optimizer steps", 10)

    def __post_init__(self) -> None:
        _check(bool(self.output_dir), "output_dir must not be empty")
        _check_min("log_interval", self.log_interval, 1)


@dataclass
class CheckpointConfig:
    """Resumable checkpoints."""

    save_interval: int = _help("save a checkpoint every this many optimizer steps and at the end; 0: at the end",
                               500)
    save_total_limit: Optional[int] = _help("keep the last this many checkpoints; unset: keep all", 3)
    resume: Optional[str] = _help("auto (the latest checkpoint in output_dir, if any) | a checkpoint folder")
    overwrite_output_dir: bool = _help("train in an output_dir that already holds checkpoints, ignoring them",
                                       False)

    def __post_init__(self) -> None:
        _check_min("save_interval", self.save_interval, 0)
        _check_min("save_total_limit", self.save_total_limit, 1)
        _check(not (self.resume and self.overwrite_output_dir), "set resume or overwrite_output_dir, not both")


SECTIONS: dict[str, type] = {"model": ModelConfig, "adapter": AdapterConfig, "data": DataConfig,
                             "training": TrainingConfig, "logging": LoggingConfig, "checkpoint": CheckpointConfig}
# Flags that are not run-config fields: the YAML file, the DeepSpeed JSON, DeepSpeed's launcher's rank.
CONFIG, DEEPSPEED, LOCAL_RANK = "config", "deepspeed", "local_rank"


def _field_index() -> dict[str, tuple[str, Any]]:
    """field name -> (section, type hint); a name in two sections would make the flat namespace ambiguous."""
    index: dict[str, tuple[str, Any]] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"field {f.name!r} is in sections {index[f.name][0]!r} and {section!r}"
            index[f.name] = (section, hints[f.name])
    assert not {CONFIG, DEEPSPEED, LOCAL_RANK} & set(index), "a run-config field shadows a launcher flag"
    return index


FIELDS = _field_index()


@dataclass
class RunConfig:
    """Every setting of one training run, by section; ``to_dict``/``from_dict`` use the flat layout."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        """Flat {field: value}, the YAML layout (``save_resolved`` writes it; ``from_dict`` reads it back)."""
        return {k: v for section in SECTIONS for k, v in dataclasses.asdict(getattr(self, section)).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "run config") -> "RunConfig":
        """Build from flat {field: value} (YAML, checkpoint); strings are converted as on the command line."""
        by_section: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        for key, value in _typed(values, source).items():
            by_section[FIELDS[key][0]][key] = value
        try:
            return cls(**{section: SECTIONS[section](**kw) for section, kw in by_section.items()})
        except ValueError as err:  # AdapterConfig's own errors too: one type for train.py to report
            raise ConfigError(str(err)) from None


def _typed(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Each value converted to its field's type; unknown keys refused with the closest known one."""
    typed = {}
    for key, value in values.items():
        if key not in FIELDS:
            raise ConfigError(_unknown_key(key, value, source))
        typed[key] = _convert(value, FIELDS[key][1], f"{key} in {source}")
    return typed


def _unknown_key(key: str, value: Any, source: str) -> str:
    if key in SECTIONS and isinstance(value, Mapping):
        return (f"{source}: {key!r} is a section name, but the run config is flat: write its fields "
                f"({', '.join(list(value)[:3])}) at the top level")
    close = difflib.get_close_matches(key, list(FIELDS), n=1)
    return f"unknown key {key!r} in {source}" + (f"; did you mean {close[0]!r}?" if close else " (see --help)")


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` (a CLI string or a YAML value) as type ``hint``; ConfigError naming ``where`` otherwise."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Union and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
    if hint == Union[str, list[str]]:  # target_modules: a name, 'all-linear', a comma list or a YAML list
        if isinstance(value, str):
            return value if value == "all-linear" else [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{where}: expected 'all-linear' or module names, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {hint}")


def help_text() -> str:
    """``--help``: every flag by section, with its help and default."""
    lines = ["usage: deepspeed launch/train.py --deepspeed ds_configs/zero3.json [--config run.yaml] "
             "[--FIELD VALUE ...]", "",
             "--config FILE: flat YAML {field: value}; flags given on the command line override it.",
             "Booleans: --flag / --flag false. Lists: --target_modules q_proj,v_proj."]
    for section, cls in SECTIONS.items():
        lines += ["", f"{section}:"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = "unset" if default is None else default
            lines.append(f"  --{f.name} (default: {shown}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _read_cli(argv: Sequence[str]) -> tuple[dict[str, str], Optional[str], Optional[str]]:
    """Split argv into ({field: raw string}, --config, --deepspeed); the last of a repeated flag wins."""
    options: dict[str, str] = {}
    special: dict[str, Optional[str]] = {CONFIG: None, DEEPSPEED: None, LOCAL_RANK: None}
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: options are --name value or --name=value")
        name, has_value, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if name not in FIELDS and name not in special:
            close = difflib.get_close_matches(name, [*FIELDS, *special], n=1)
            raise ConfigError(f"unknown option --{name}" + (f"; did you mean --{close[0]}?" if close else
                                                            " (--help lists the options)"))
        if not has_value:
            nxt = argv[i] if i < len(argv) else None
            if name in FIELDS and FIELDS[name][1] is bool:
                value = "true"
                if nxt is not None and nxt.lower() in _TRUE + _FALSE:
                    value, i = nxt, i + 1
            elif nxt is None or nxt.startswith("--"):
                raise ConfigError(f"option --{name} needs a value")
            else:
                value, i = nxt, i + 1
        if name in special:
            special[name] = value
        else:
            options[name] = value
    if special[LOCAL_RANK] is not None:  # DeepSpeed's launcher; the rank itself is read from the env
        _convert(special[LOCAL_RANK], int, "--local_rank")
    return options, special[CONFIG], special[DEEPSPEED]


def load_yaml(path: str) -> dict[str, Any]:
    """The run config file as a flat dict (not yet validated)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run config {path!r} not found")
    with open(path) as f:
        try:
            values = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"run config {path!r} is not valid YAML: {' '.join(str(err).split())}") from None
    if values is None:
        return {}
    _check(isinstance(values, dict), f"run config {path!r} must be a mapping of field: value, "
                                     f"got {type(values).__name__}")
    return values


def parse_run_config(argv: Optional[Sequence[str]] = None) -> tuple[RunConfig, str]:
    """(RunConfig, DeepSpeed JSON path) from ``--config`` YAML and command-line overrides.

    ``--deepspeed FILE`` is required (on the command line or as the YAML key ``deepspeed``);
    ``--local_rank`` (DeepSpeed's launcher) is accepted and ignored.
    """
    options, config_path, ds_path = _read_cli(sys.argv[1:] if argv is None else argv)
    values = load_yaml(config_path) if config_path else {}
    _check(CONFIG not in values, f"run config {config_path!r}: 'config' cannot be nested")
    yaml_ds = values.pop(DEEPSPEED, None)
    ds_path = ds_path or yaml_ds
    typed = _typed(values, repr(config_path))
    typed.update({k: _convert(v, FIELDS[k][1], f"--{k}") for k, v in options.items()})  # the command line wins
    run = RunConfig.from_dict(typed)
    _check(bool(ds_path), "no DeepSpeed config: pass --deepspeed FILE (shipped: ds_configs/zero2.json, "
                          "ds_configs/zero3.json, ds_configs/zero3_offload.json)")
    return run, str(ds_path)


@dataclass(frozen=True)
class Derived:
    """Effective numbers of a run: the run config merged with the DeepSpeed JSON and the world size."""

    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int  # sequences per optimizer step: micro batch x accumulation x world
    max_steps: int
    warmup_steps: int
    learning_rate: float
    lr_scheduler: str
    weight_decay: float
    max_grad_norm: float
    dtype: str  # bf16 | fp16 | fp32
    run_name: str


def _explicit(ds: Mapping[str, Any], path: str) -> Any:
    """The DeepSpeed JSON's value at dotted ``path``; None when absent or ``"auto"``."""
    node: Any = ds
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return None if node == AUTO else node


class _Settle:
    """Picks each effective value: run config, else the DeepSpeed JSON, else the default; refuses conflicts."""

    def __init__(self, ds: Mapping[str, Any], ds_path: str):
        self.ds, self.ds_path = ds, ds_path

    def pick(self, name: str, run_value: Any, ds_keys: Sequence[str], default: Any, label: Any = None) -> Any:
        """``label``: how the run value is shown in a conflict (default: the value itself)."""
        chosen, chosen_from = run_value, f"{name}={run_value if label is None else label} (run config)"
        for key in ds_keys:
            value = _explicit(self.ds, key)
            if value is None:
                continue
            if chosen is not None and value != chosen:
                raise ConfigError(f"{chosen_from} contradicts {key}={value} in {self.ds_path}")
            if chosen is None:
                chosen, chosen_from = value, f"{key}={value} in {self.ds_path}"
        return default if chosen is None else chosen


def _on_gpu_with_bf16() -> bool:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return accelerator.device_name() != "cpu" and accelerator.is_bf16_supported()


def _settle_dtype(dtype: str, ds: Mapping[str, Any], ds_path: str, on_gpu: Optional[bool]) -> str:
    bf16, fp16 = _explicit(ds, "bf16.enabled"), _explicit(ds, "fp16.enabled")
    _check(not (bf16 and fp16), f"bf16.enabled and fp16.enabled are both true in {ds_path}")
    if dtype != "auto":
        for key, value in (("bf16.enabled", bf16), ("fp16.enabled", fp16)):
            wanted = dtype == key.split(".")[0]
            _check(value is None or bool(value) == wanted,
                   f"dtype={dtype} (run config) contradicts {key}={json.dumps(value)} in {ds_path}")
        return dtype
    if bf16 or fp16:
        return "bf16" if bf16 else "fp16"
    if bf16 is None and (_on_gpu_with_bf16() if on_gpu is None else on_gpu):
        return "bf16"
    return "fp32"


def _check_scheduler(ds: Mapping[str, Any], ds_path: str) -> None:
    """The loop replaces DeepSpeed's scheduler; refuse settings of it that the replacement would drop."""
    scheduler = ds.get("scheduler")
    if not scheduler:
        return
    kind = scheduler.get("type")
    _check(kind in DS_SCHEDULERS, f"scheduler.type={kind!r} in {ds_path} is not supported: the training loop "
                                  f"drives the learning rate (types it reproduces: {list(DS_SCHEDULERS)})")
    for key, value in scheduler.get("params", {}).items():
        if value == AUTO or key in ("total_num_steps", "warmup_num_steps", "warmup_max_lr"):
            continue
        _check(key == "warmup_type" and value == "linear",
               f"scheduler.params.{key}={json.dumps(value)} in {ds_path} has no equivalent in the training loop's "
               "schedule (linear warmup from 0, decay to 0 at max_steps): remove it")


def derive(run: RunConfig, world_size: int, ds_json: Optional[Mapping[str, Any]] = None, *,
           ds_path: str = "the DeepSpeed config", on_gpu: Optional[bool] = None) -> Derived:
    """Every effective number of the run, in one place (see the module docstring for the rule).

    ``on_gpu``: whether ``dtype: auto`` may pick bf16; unset: asks DeepSpeed's accelerator.
    """
    _check(world_size >= 1, f"world_size must be >= 1, got {world_size}")
    ds = ds_json or {}
    t = run.training
    settle = _Settle(ds, ds_path)
    _check_scheduler(ds, ds_path)
    micro = settle.pick("micro_batch_size", t.micro_batch_size, ["train_micro_batch_size_per_gpu"],
                        DEFAULT_MICRO_BATCH_SIZE)
    accum = settle.pick("gradient_accumulation_steps", t.gradient_accumulation_steps,
                        ["gradient_accumulation_steps"], DEFAULT_GRADIENT_ACCUMULATION_STEPS)
    global_batch = micro * accum * world_size
    explicit_batch = _explicit(ds, "train_batch_size")
    _check(explicit_batch is None or explicit_batch == global_batch,
           f"train_batch_size={explicit_batch} in {ds_path} is not micro_batch_size {micro} x "
           f"gradient_accumulation_steps {accum} x world size {world_size} = {global_batch}")
    lr = settle.pick("learning_rate", t.learning_rate, ["optimizer.params.lr", "scheduler.params.warmup_max_lr"],
                     DEFAULT_LEARNING_RATE)
    ds_kind = _explicit(ds, "scheduler.type")
    ds_shape = DS_SCHEDULERS.get(ds_kind)
    _check(t.lr_scheduler is None or ds_shape is None or ds_shape == t.lr_scheduler,
           f"lr_scheduler={t.lr_scheduler} (run config) contradicts scheduler.type={ds_kind} in {ds_path} "
           f"(that is {ds_shape})")
    max_steps = settle.pick("max_steps", t.max_steps, ["scheduler.params.total_num_steps"], None)
    _check(max_steps is not None, f"max_steps is not set: pass --max_steps N (or set "
                                  f"scheduler.params.total_num_steps in {ds_path})")
    run_warmup = t.warmup_steps if t.warmup_ratio is None else math.ceil(t.warmup_ratio * max_steps)
    label = None if t.warmup_ratio is None else f"{run_warmup} (warmup_ratio {t.warmup_ratio})"
    warmup = settle.pick("warmup_steps", run_warmup, ["scheduler.params.warmup_num_steps"],
                         math.ceil(DEFAULT_WARMUP_RATIO * max_steps), label=label)
    _check(warmup <= max_steps, f"warmup_steps={warmup} exceeds max_steps={max_steps}")
    return Derived(
        world_size=world_size, micro_batch_size=micro, gradient_accumulation_steps=accum,
        global_batch_size=global_batch, max_steps=max_steps, warmup_steps=warmup, learning_rate=float(lr),
        lr_scheduler=t.lr_scheduler or ds_shape or DEFAULT_LR_SCHEDULER,
        weight_decay=float(settle.pick("weight_decay", t.weight_decay, ["optimizer.params.weight_decay"],
                                       DEFAULT_WEIGHT_DECAY)),
        max_grad_norm=float(settle.pick("max_grad_norm", t.max_grad_norm, ["gradient_clipping"],
                                        DEFAULT_MAX_GRAD_NORM)),
        dtype=_settle_dtype(run.model.dtype, ds, ds_path, on_gpu),
        run_name=run.logging.run_name or os.path.basename(os.path.normpath(run.logging.output_dir)))


def lr_at(step: int, derived: Derived) -> float:
    """Learning rate of optimizer step ``step`` (1-based: the first update is step 1).

    Linear warmup ``lr * step / warmup`` (step 1 already trains at ``lr / warmup``, never 0), then
    cosine or linear decay from ``lr`` at step ``warmup + 1`` towards 0 one step past ``max_steps``
    (as Hugging Face's schedules: every step trains; constant: stays at ``lr``).
    """
    lr, warmup, total = derived.learning_rate, derived.warmup_steps, derived.max_steps
    if not 1 <= step <= total:
        raise ValueError(f"step {step} outside the schedule's 1..{total}")
    if step <= warmup:
        return lr * step / warmup
    if derived.lr_scheduler == "constant":
        return lr
    progress = (step - warmup - 1) / (total - warmup)
    if derived.lr_scheduler == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (1.0 - progress)


def _set(config: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        config = config.setdefault(key, {})
    config[leaf] = value


def deepspeed_config(ds_json: Mapping[str, Any], derived: Derived, tensorboard_dir: Optional[str] = None, *,
                     ds_path: str = "the DeepSpeed config", hidden_size: Optional[int] = None) -> dict:
    """The DeepSpeed config the engine gets: ``"auto"`` values filled from ``derived``, the effective values
    written where DeepSpeed reads them, and ``scheduler`` removed (the loop sets the lr with ``lr_at``).

    ``derived`` must come from ``derive(..., ds_json)`` (which refused contradictions). ``hidden_size``
    fills ZeRO-3's bucket-size ``"auto"`` values (unset: those stay unfilled, an error naming them).
    TensorBoard events go to ``<tensorboard_dir>/<run_name>``.
    """
    config = copy.deepcopy(dict(ds_json))
    scheduler = config.pop("scheduler", None)
    if scheduler is not None:
        log.info("DeepSpeed scheduler %s in %s is replaced by the training loop's schedule: linear warmup over %d "
                 "steps to lr %g, then %s decay to step %d", scheduler.get("type"), ds_path, derived.warmup_steps,
                 derived.learning_rate, derived.lr_scheduler, derived.max_steps)
    values = auto_values(micro_batch=derived.micro_batch_size, grad_accum=derived.gradient_accumulation_steps,
                         world_size=derived.world_size, lr=derived.learning_rate, weight_decay=derived.weight_decay,
                         clip=derived.max_grad_norm, bf16=derived.dtype == "bf16", tensorboard_dir=tensorboard_dir,
                         job_name=derived.run_name, hidden_size=hidden_size or 1)
    values["fp16.enabled"] = derived.dtype == "fp16"
    if hidden_size is None:  # no model width: leave ZeRO-3's bucket "auto"s for fill_auto to name
        values = {k: v for k, v in values.items() if not k.startswith("zero_optimization.")}
    config = fill_auto(config, values)
    effective = {"train_micro_batch_size_per_gpu": derived.micro_batch_size,
                 "gradient_accumulation_steps": derived.gradient_accumulation_steps,
                 "train_batch_size": derived.global_batch_size, "gradient_clipping": derived.max_grad_norm}
    if "optimizer" in config:
        effective.update({"optimizer.params.lr": derived.learning_rate,
                          "optimizer.params.weight_decay": derived.weight_decay})
    for half in ("bf16", "fp16"):
        if half in config or derived.dtype == half:
            effective[f"{half}.enabled"] = derived.dtype == half
    for path, value in effective.items():
        _set(config, path, value)
    return config


def save_resolved(run: RunConfig, ds_config: Mapping[str, Any], out_dir: str) -> None:
    """Write ``run_config.yaml`` (flat, loadable with ``--config``) and ``ds_config.json`` into ``out_dir``:
    with both, the run can be repeated exactly and a resumed job can compare its configuration."""
    os.makedirs(out_dir, exist_ok=True)
    parts = []
    for section in SECTIONS:
        body = yaml.safe_dump(dataclasses.asdict(getattr(run, section)), sort_keys=False, default_flow_style=False)
        parts.append(f"# {section}\n{body}")
    write_text(os.path.join(out_dir, "run_config.yaml"), "\n".join(parts))
    write_text(os.path.join(out_dir, "ds_config.json"), json.dumps(ds_config, indent=2) + "\n")


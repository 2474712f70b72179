"""Run configuration of the training job: typed sections, one flat namespace for YAML and CLI.

``parse_run_config(argv)`` reads ``--config run.yaml`` (a flat mapping: each key is a field
name, the same name as its command-line flag, no sections) and then the command line, which
overrides the file field by field. Every field name is unique across sections, so a name
means one thing everywhere; unknown names fail with the closest valid one. Other trainers' names
for our options (``ALIASES``: ``lora_r``, ``eval_steps``, ...) are read as ours.

Settings that also exist in a DeepSpeed JSON (batch sizes, learning rate, weight decay,
clipping, precision, warmup and total steps) default to *unset* (``None``, or ``"auto"`` for
``dtype``); ``resolved.derive`` settles them against the JSON and the world size.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import yaml

from ..adapters.config import AdapterConfig
from ..planning.activations import ATTENTIONS

log = logging.getLogger(__name__)

DTYPES = ("auto", "bf16", "fp16", "fp32")
FORMATS = ("auto", "text", "alpaca", "chat", "prompt_completion")
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


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    require(value in choices, f"{name} must be one of {list(choices)}, got {value!r}")


def _check_min(name: str, value: Optional[float], minimum: float) -> None:
    require(value is None or value >= minimum, f"{name} must be >= {minimum}, got {value!r}")


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
    attn_implementation: str = _help(
        "sdpa | eager | flash_attention_2 | flash_attention_3 (transformers' attention kernels; flash needs GPUs, "
        "bf16/fp16 and the flash-attn or flash-attn-3 package); packed micro-batches go to flash attention as one "
        "row", "sdpa")

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("attn_implementation", self.attn_implementation, ATTENTIONS)


@dataclass
class DataConfig:
    """What to train on and how it becomes token sequences."""

    data: Optional[str] = _help(
        "training data: a .jsonl/.json/.csv/.parquet/.arrow file or a datasets save_to_disk folder, or several "
        "separated by commas (each detected on its own, one format for all); unset: the trainer's built-in sample")
    eval_data: Optional[str] = _help("evaluation data, same forms as data (exclusive with eval_fraction)")
    format: str = _help(
        "auto | text | alpaca | chat | prompt_completion; auto: from the columns (messages/conversations: chat, "
        "instruction+output: alpaca, prompt+completion: prompt_completion, text: text)", "auto")
    max_seq_length: int = _help("tokens per sequence, or per block with packing (longer samples: see truncation)",
                                2048)
    packing: bool = _help(
        "pack whole samples into max_seq_length blocks (best-fit decreasing; a sample is never split, position "
        "ids restart at each sample and attention stays within it)", False)
    eval_fraction: float = _help(
        "hold out this fraction of data for evaluation (deterministic with seed); 0: none", 0.0)
    train_on_prompt: bool = _help(
        "alpaca/chat/prompt_completion: also train on prompt tokens; default: loss on responses (assistant "
        "turns) only", False)
    truncation: str = _help(
        "truncate | refuse: cut sequences longer than max_seq_length (counted and logged), or stop", "truncate")
    preprocessing_num_workers: Optional[int] = _help(
        "processes that tokenise and pack; unset: the CPUs this process may use, at most 16 (small data sets "
        "use fewer)")
    data_cache_dir: Optional[str] = _help(
        "where tokenised datasets are cached (per node), so a restart does not tokenise again; unset: "
        "<cache root>/datasets, the cache root being $DS_ASLORA_CACHE, else $XDG_CACHE_HOME/ds_aslora, else "
        "~/.cache/ds_aslora (outside output_dir, which bad input leaves untouched)")

    def __post_init__(self) -> None:
        _check_choice("format", self.format, FORMATS)
        _check_choice("truncation", self.truncation, TRUNCATIONS)
        _check_min("max_seq_length", self.max_seq_length, 2)
        require(0.0 <= self.eval_fraction < 1.0, f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        _check_min("preprocessing_num_workers", self.preprocessing_num_workers, 1)
        require(not (self.eval_data and self.eval_fraction > 0), "set eval_data or eval_fraction, not both")


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
        "optimizer steps to train; unset: scheduler.params.total_num_steps of the DeepSpeed config, or "
        "num_train_epochs")
    num_train_epochs: Optional[float] = _help(
        "passes over the training set instead of max_steps: steps = ceil(epochs x training sequences (after "
        "packing) / global batch), printed at start")
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
    early_stopping_patience: Optional[int] = _help(
        "stop when this many evaluations in a row did not lower the best eval loss (a checkpoint is saved at "
        "the stop); unset: never")
    dist_timeout_minutes: float = _help(
        "timeout of collectives (NCCL/gloo), DeepSpeed's groups included: a rank stuck or gone stops the others "
        "after at most this long (a killed process is usually noticed sooner); setup waits on slow one-rank work "
        "(tokenising, model conversion) use 4 hours", 30.0)

    def __post_init__(self) -> None:
        require(self.learning_rate is None or self.learning_rate > 0,
               f"learning_rate must be > 0, got {self.learning_rate!r}")
        _check_min("micro_batch_size", self.micro_batch_size, 1)
        _check_min("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _check_min("max_steps", self.max_steps, 1)
        require(self.num_train_epochs is None or self.num_train_epochs > 0,
                f"num_train_epochs must be > 0, got {self.num_train_epochs!r}")
        require(self.max_steps is None or self.num_train_epochs is None, "set max_steps or num_train_epochs, not both")
        _check_min("warmup_steps", self.warmup_steps, 0)
        require(self.warmup_ratio is None or 0.0 <= self.warmup_ratio < 1.0,
               f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        require(self.warmup_steps is None or self.warmup_ratio is None, "set warmup_steps or warmup_ratio, not both")
        if self.lr_scheduler is not None:
            _check_choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _check_min("weight_decay", self.weight_decay, 0.0)
        _check_min("max_grad_norm", self.max_grad_norm, 0.0)
        _check_min("eval_interval", self.eval_interval, 0)
        _check_min("eval_batches", self.eval_batches, 1)
        _check_min("early_stopping_patience", self.early_stopping_patience, 1)
        require(self.early_stopping_patience is None or self.eval_interval > 0,
                "early_stopping_patience needs evaluations: set eval_interval > 0")
        require(self.dist_timeout_minutes > 0, f"dist_timeout_minutes must be > 0, got {self.dist_timeout_minutes!r}")


@dataclass
class LoggingConfig:
    """Where results go and how often the loop reports."""

    output_dir: str = _help("checkpoints, exported adapters, TensorBoard events (runs/<run_name>)", "outputs")
    run_name: Optional[str] = _help("TensorBoard run name; unset: the last part of output_dir")
    log_interval: int = _help("log loss, lr, grad norm and throughput every this many optimizer steps", 10)
    sample_prompt: Optional[str] = _help(
        "at the end, a greedy continuation (repetition penalty 1.2) of this prompt (rendered as the data's "
        "format renders a prompt: a user turn for chat) in sample.txt, summary.json and TensorBoard; '' none; "
        "unset: 'ROMEO:' on the embedded default data, none on yours (under ZeRO-3 every new token gathers the "
        "whole model)")

    def __post_init__(self) -> None:
        require(bool(self.output_dir), "output_dir must not be empty")
        _check_min("log_interval", self.log_interval, 1)


@dataclass
class CheckpointConfig:
    """Resumable checkpoints."""

    save_interval: int = _help("save a checkpoint every this many optimizer steps and at the end; 0: at the end",
                               500)
    save_total_limit: Optional[int] = _help(
        "keep the last this many checkpoints, and the one with the best eval loss; unset: keep all", 3)
    resume: Optional[str] = _help(
        "auto (the latest checkpoint in output_dir, if any) | a checkpoint folder; unset: an output_dir holding a "
        "run continues it (the same command run again picks up where it stopped; a finished run exits 0)")
    overwrite_output_dir: bool = _help("train in an output_dir that already holds a run, deleting its checkpoints, "
                                       "adapters and TensorBoard events", False)

    def __post_init__(self) -> None:
        _check_min("save_interval", self.save_interval, 0)
        _check_min("save_total_limit", self.save_total_limit, 1)
        require(not (self.resume and self.overwrite_output_dir), "set resume or overwrite_output_dir, not both")


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


# ------------------------------------------------------------------------------------------ aliases
# Users arrive with configs and habits from Hugging Face's Trainer/TRL, peft, LLaMA-Factory and axolotl:
# their names for our options are read as ours, in flags and YAML alike, so such a config needs renaming
# nowhere. Each alias is one field; where the other tool's value means something else, ``convert`` turns
# it into ours (``NOT_SET``: the alias sets nothing). Everything we write (run_config.yaml) uses our names.

NOT_SET = object()


def _when_true(ours: str) -> Callable[[Any, str], Any]:
    """A boolean switch of another tool (``bf16: true``): true sets ``ours``, false sets nothing."""
    def convert(value: Any, where: str) -> Any:
        return ours if _convert(value, bool, where) else NOT_SET
    return convert


def _resume_from_checkpoint(value: Any, where: str) -> Any:
    """HF's path or boolean: true resumes from the latest checkpoint (our auto), false resumes nothing."""
    if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
        return "auto" if _convert(value, bool, where) else None
    return value


def _lora_target(value: Any, where: str) -> Any:
    """LLaMA-Factory's ``all`` is every linear layer; a comma list reads as ours."""
    return "all-linear" if isinstance(value, str) and value.strip().lower() == "all" else value


def _val_size(value: Any, where: str) -> Any:
    """LLaMA-Factory's val_size and axolotl's val_set_size: a fraction below 1 is ours; from 1 up it counts
    rows, which eval_fraction cannot say: refused rather than read as a fraction."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value  # _convert names the bad value
    require(number < 1, f"{where}: {value!r} is a number of rows; eval_fraction holds out a fraction of the data: "
                        f"give a value in [0, 1) (rows / training rows)")
    return value


def _lr_scheduler_type(value: Any, where: str) -> Any:
    """HF's constant_with_warmup is our constant (ours always warms up); the other names are shared."""
    return "constant" if value == "constant_with_warmup" else value


class Alias(NamedTuple):
    """Another tool's name for ``field``; ``convert(value, where)`` reads that tool's value, ``note`` says how.
    ``switch``: a bare ``--name`` on the command line means true."""

    field: str
    convert: Optional[Callable[[Any, str], Any]] = None
    note: str = ""
    switch: bool = False


ALIASES: dict[str, Alias] = {
    # model (HF/TRL/LLaMA-Factory; axolotl)
    "model_name_or_path": Alias("model"),
    "base_model": Alias("model"),
    "bf16": Alias("dtype", _when_true("bf16"), "true: dtype bf16", switch=True),
    "fp16": Alias("dtype", _when_true("fp16"), "true: dtype fp16", switch=True),
    "gradient_checkpointing": Alias("activation_checkpointing"),
    # adapter (peft/LLaMA-Factory/axolotl)
    "lora_r": Alias("r"),
    "lora_rank": Alias("r"),
    "lora_alpha": Alias("alpha"),
    "lora_dropout": Alias("dropout"),
    "lora_target": Alias("target_modules", _lora_target, "all: all-linear"),
    "lora_target_modules": Alias("target_modules"),
    "lora_target_linear": Alias("target_modules", _when_true("all-linear"), "true: all-linear", switch=True),
    # data (LLaMA-Factory; TRL; axolotl)
    "dataset": Alias("data"),
    "eval_dataset": Alias("eval_data"),
    "cutoff_len": Alias("max_seq_length"),
    "max_length": Alias("max_seq_length"),
    "sequence_len": Alias("max_seq_length"),
    "sample_packing": Alias("packing"),
    "val_size": Alias("eval_fraction", _val_size, "a fraction; a row count is refused"),
    "val_set_size": Alias("eval_fraction", _val_size, "a fraction; a row count is refused"),
    # training (HF Trainer/TRL; axolotl)
    "per_device_train_batch_size": Alias("micro_batch_size"),
    "num_epochs": Alias("num_train_epochs"),
    "lr_scheduler_type": Alias("lr_scheduler", _lr_scheduler_type, "constant_with_warmup: constant"),
    "eval_steps": Alias("eval_interval"),
    # logging, checkpoints (HF Trainer; axolotl)
    "logging_steps": Alias("log_interval"),
    "save_steps": Alias("save_interval"),
    "resume_from_checkpoint": Alias("resume", _resume_from_checkpoint, "true: auto"),
    "auto_resume_from_checkpoints": Alias("resume", _when_true("auto"), "true: auto", switch=True),
}
assert all(a.field in FIELDS for a in ALIASES.values()), "an alias names no field"
assert not set(ALIASES) & {*FIELDS, CONFIG, DEEPSPEED, LOCAL_RANK}, "an alias shadows an option"


def aliases_of(name: str) -> list[tuple[str, str]]:
    """(alias, note) for each other name of field ``name``: ``--help`` and the option reference list them."""
    return [(alias, a.note) for alias, a in ALIASES.items() if a.field == name]


def _suggest(name: str, candidates: Sequence[str], show: Callable[[str], str]) -> str:
    """'; did you mean X?' with the closest known name, shown by ``show`` (an alias with its field), or ''."""
    close = difflib.get_close_matches(name, list(candidates), n=1)
    if not close:
        return ""
    field_of = f" (= {show(ALIASES[close[0]].field)})" if close[0] in ALIASES else ""
    return f"; did you mean {show(close[0])}{field_of}?"


@dataclass
class RunConfig:
    """Every setting of one training run, by section; ``to_dict``/``from_dict`` use the flat layout."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # the fields the user set (YAML or flags, by our names): defaults of a preset apply to the others only
    given: frozenset = field(default=frozenset(), repr=False, compare=False)

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


def _typed(values: Mapping[str, Any], source: str, flags: bool = False) -> dict[str, Any]:
    """{field: value} converted to the fields' types from one source (a YAML file, the command line when
    ``flags``): aliases read as their fields, unknown keys refused with the closest known name, one field
    under two names refused (which would win is a guess)."""
    typed: dict[str, Any] = {}
    named: dict[str, str] = {}
    for key, value in values.items():
        shown = f"--{key}" if flags else repr(key)
        where = shown if flags else f"{key} in {source}"
        name = key
        if key in ALIASES:
            alias = ALIASES[key]
            name = alias.field
            if alias.convert:
                value = alias.convert(value, where)
            if value is NOT_SET:
                continue
        elif key not in FIELDS:
            raise ConfigError(_unknown_key(key, value, source))
        if name in named:
            other = f"--{named[name]}" if flags else repr(named[name])
            raise ConfigError(f"{other} and {shown} both set {name}" + ("" if flags else f" in {source}")
                              + ": give one")
        named[name] = key
        typed[name] = _convert(value, FIELDS[name][1], where)
    return typed


def _unknown_key(key: str, value: Any, source: str) -> str:
    if key in SECTIONS and isinstance(value, Mapping):
        return (f"{source}: {key!r} is a section name, but the run config is flat: write its fields "
                f"({', '.join(list(value)[:3])}) at the top level")
    hint = _suggest(key, [*FIELDS, *ALIASES], repr)
    return f"unknown key {key!r} in {source}" + (hint or " (see --help)")


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
    if hint == Union[int, float]:  # a step or a fraction of the run: "300" is a step, "0.1" a fraction
        if isinstance(value, str):
            for kind in (int, float):
                try:
                    value = kind(value)
                    break
                except ValueError:
                    pass
        if isinstance(value, float) and value > 1 and value.is_integer():  # YAML's 1e3: a step, not a fraction
            return int(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected a step (integer) or a fraction of the run (float), got {value!r}")
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


# --help's first lines: the job's spellings, from a checkout and installed.
TRAIN_USAGE = ("usage: deepspeed [--num_gpus N] launch/train.py --deepspeed ds_configs/zero3.json [--config run.yaml] "
               "[--FIELD VALUE ...]\n"
               "   or: deepspeed --module ds_aslora.train ..., torchrun -m ds_aslora.train ...; one process: "
               "python -m ds_aslora.train ... or ds-aslora-train ...")


def help_text(usage: str = TRAIN_USAGE) -> str:
    """``--help``: the usage line(s), then every flag by section, with its help and default."""
    lines = [usage, "",
             "--config FILE: flat YAML {field: value}; flags given on the command line override it.",
             "Booleans: --flag / --flag false. Lists: --target_modules q_proj,v_proj.",
             "Other trainers' names (HF Trainer/TRL, peft, LLaMA-Factory, axolotl) are read as ours: the 'also' "
             "names below, in flags and YAML; one option under two names in one source is an error."]
    for section, cls in SECTIONS.items():
        lines += ["", f"{section}:"]
        for f in dataclasses.fields(cls):
            also = ", ".join(f"--{alias}" + (f" [{note}]" if note else "") for alias, note in aliases_of(f.name))
            also = f"; also {also}" if also else ""
            lines.append(f"  --{f.name} (default: {shown_default(f)}{also}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def shown_default(f: dataclasses.Field) -> Any:
    """A field's default as ``--help`` and the option reference show it (``unset`` for None)."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return "unset" if default is None else default


def _read_cli(argv: Sequence[str], usage: str) -> tuple[dict[str, str], Optional[str], Optional[str]]:
    """Split argv into ({field: raw string}, --config, --deepspeed); the last of a repeated flag wins."""
    options: dict[str, str] = {}
    special: dict[str, Optional[str]] = {CONFIG: None, DEEPSPEED: None, LOCAL_RANK: None}
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token in ("-h", "--help"):
            print(help_text(usage))
            raise SystemExit(0)
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: options are --name value or --name=value")
        name, has_value, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if name not in FIELDS and name not in ALIASES and name not in special:
            hint = _suggest(name, [*FIELDS, *ALIASES, *special], lambda n: f"--{n}")
            raise ConfigError(f"unknown option --{name}" + (hint or " (--help lists the options)"))
        if not has_value:
            nxt = argv[i] if i < len(argv) else None
            target = ALIASES[name].field if name in ALIASES else name
            if (name in ALIASES and ALIASES[name].switch) or (target in FIELDS and FIELDS[target][1] is bool):
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
    require(isinstance(values, dict), f"run config {path!r} must be a mapping of field: value, "
                                     f"got {type(values).__name__}")
    return values


def parse_run_config(argv: Optional[Sequence[str]] = None, *, require_deepspeed: bool = True,
                     usage: str = TRAIN_USAGE) -> tuple[RunConfig, Optional[str]]:
    """(RunConfig, DeepSpeed JSON path) from ``--config`` YAML and command-line overrides.

    ``--deepspeed FILE`` is required (on the command line or as the YAML key ``deepspeed``) unless
    ``require_deepspeed`` is false (data preparation needs none); ``--local_rank`` (DeepSpeed's
    launcher) is accepted and ignored. ``usage`` heads ``--help``.
    """
    options, config_path, ds_path = _read_cli(sys.argv[1:] if argv is None else argv, usage)
    values = load_yaml(config_path) if config_path else {}
    require(CONFIG not in values, f"run config {config_path!r}: 'config' cannot be nested")
    yaml_ds = values.pop(DEEPSPEED, None)
    ds_path = ds_path or yaml_ds
    typed = _typed(values, repr(config_path))
    typed.update(_typed(options, "the command line", flags=True))  # the command line wins, under any name
    run = RunConfig.from_dict(typed)
    run.given = frozenset(typed)
    require(bool(ds_path) or not require_deepspeed, "no DeepSpeed config: pass --deepspeed FILE (shipped: "
                                                    "ds_configs/zero2.json, ds_configs/zero3.json, "
                                                    "ds_configs/zero3_offload.json)")
    return run, str(ds_path) if ds_path else None

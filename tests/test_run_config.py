"""Run configuration: YAML + CLI parsing, one-line errors, derived numbers, the DeepSpeed config
the engine gets (run config vs JSON rule, scheduler replaced), the lr schedule, save and reload."""
import dataclasses
import json
import logging
import math
import os

import pytest

from ds_aslora import AdapterConfig
from ds_aslora.runtime.ds_config import auto_paths, load_ds_config
from ds_aslora.train.resolved import Derived, deepspeed_config, derive, lr_at, save_resolved
from ds_aslora.train.run_config import FIELDS, SECTIONS, ConfigError, RunConfig, parse_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO3 = os.path.join(ROOT, "ds_configs", "zero3.json")
DS = ["--deepspeed", ZERO3]


def parse(*argv):
    return parse_run_config([*argv, *DS])[0]


def message(excinfo):
    return str(excinfo.value)


# ---------------------------------------------------------------------------------------- parsing

def test_field_names_are_unique_across_sections():
    assert len(FIELDS) == sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values())
    assert SECTIONS["adapter"] is AdapterConfig
    assert all(f.metadata.get("help") for cls in SECTIONS.values() for f in dataclasses.fields(cls))


def test_cli_values_get_their_field_types():
    run, ds_path = parse_run_config([
        "--local_rank=3", "--learning_rate", "2e-4", "--micro_batch_size=2", "--target_modules", "q_proj, v_proj",
        "--packing", "--activation_checkpointing", "false", "--method", "aslora", "--merge_count", "3",
        "--resume", "auto", "--save_total_limit", "none", "--max-steps", "10", *DS])
    assert ds_path == ZERO3
    assert run.training.learning_rate == 2e-4 and run.training.micro_batch_size == 2
    assert run.training.max_steps == 10  # dashes accepted for underscores
    assert run.adapter == AdapterConfig(method="aslora", merge_count=3, target_modules=["q_proj", "v_proj"])
    assert run.data.packing is True and run.model.activation_checkpointing is False
    assert run.checkpoint.resume == "auto" and run.checkpoint.save_total_limit is None
    assert parse("--target_modules", "all-linear").adapter.target_modules == "all-linear"
    assert parse("--packing=false", "--train_on_prompt", "--seed", "5").data.packing is False
    assert parse("--train_on_prompt", "--seed", "5").data.train_on_prompt is True


def test_defaults():
    run = parse()
    assert run == RunConfig()
    assert (run.model.dtype, run.data.max_seq_length, run.data.truncation, run.data.train_on_prompt) == (
        "auto", 2048, "truncate", False)
    assert run.training.learning_rate is None  # unset: the DeepSpeed config's, else the default


def test_yaml_is_flat_and_the_command_line_overrides_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 2e-4\n"  # YAML reads this as a string; it still becomes a float
                    "target_modules: [q_proj, v_proj]\nmethod: sharelora\nshare: B\nmax_steps: 100\n"
                    f"packing: yes\ndeepspeed: {ZERO3}\n")
    run, ds_path = parse_run_config(["--config", str(path), "--max_steps", "7"])
    assert ds_path == ZERO3
    assert run.training.learning_rate == 2e-4 and run.training.max_steps == 7 and run.data.packing is True
    assert (run.adapter.method, run.adapter.share, run.adapter.scope) == ("sharelora", "B", "module")
    assert parse_run_config(["--config", str(path), "--deepspeed", "other.json"])[1] == "other.json"


@pytest.mark.parametrize("argv, expected", [
    (["--learing_rate", "1e-4"], "unknown option --learing_rate; did you mean --learning_rate?"),
    (["--target_module", "q_proj"], "unknown option --target_module; did you mean --target_modules?"),
    (["--zzz", "1"], "unknown option --zzz (--help lists the options)"),
    (["--max_steps", "ten"], "--max_steps: expected an integer, got 'ten'"),
    (["--learning_rate", "fast"], "--learning_rate: expected a number, got 'fast'"),
    (["--packing", "maybe"], "unexpected argument 'maybe': options are --name value or --name=value"),
    (["--packing=maybe"], "--packing: expected true or false, got 'maybe'"),
    (["--learning_rate"], "option --learning_rate needs a value"),
    (["--learning_rate", "--max_steps", "3"], "option --learning_rate needs a value"),
    (["--local_rank=x"], "--local_rank: expected an integer, got 'x'"),
    (["--dtype", "int8"], "dtype must be one of ['auto', 'bf16', 'fp16', 'fp32'], got 'int8'"),
    (["--attn_implementation", "flash"], "attn_implementation must be one of ['sdpa', 'eager', 'flash_attention_2', "
                                         "'flash_attention_3'], got 'flash'"),
    (["--warmup_steps", "3", "--warmup_ratio", "0.1"], "set warmup_steps or warmup_ratio, not both"),
    (["--eval_data", "e.jsonl", "--eval_fraction", "0.1"], "set eval_data or eval_fraction, not both"),
    (["--r", "0"], "AdapterConfig.r must be an integer >= 1, got 0"),
])
def test_bad_command_lines_fail_with_one_clear_line(argv, expected):
    with pytest.raises(ConfigError) as err:
        parse_run_config([*argv, *DS])
    assert message(err) == expected


def test_bad_yaml_files_fail_with_one_clear_line(tmp_path):
    def fails(text):
        path = tmp_path / "run.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            parse_run_config(["--config", str(path), *DS])
        return message(err).replace(str(path), "run.yaml")

    assert fails("learing_rate: 1.0e-4\n") == "unknown key 'learing_rate' in 'run.yaml'; did you mean 'learning_rate'?"
    assert fails("training:\n  learning_rate: 1.0e-4\n  max_steps: 3\n") == (
        "'run.yaml': 'training' is a section name, but the run config is flat: write its fields "
        "(learning_rate, max_steps) at the top level")
    assert fails("max_steps: 2.5\n") == "max_steps in 'run.yaml': expected an integer, got 2.5"
    assert fails("- a\n- b\n") == "run config 'run.yaml' must be a mapping of field: value, got list"
    assert fails("a: [\n").startswith("run config 'run.yaml' is not valid YAML:")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_run_config(["--config", str(tmp_path / "nope.yaml"), *DS])


def test_the_deepspeed_config_is_required_and_help_lists_every_flag(capsys):
    with pytest.raises(ConfigError, match="no DeepSpeed config: pass --deepspeed FILE"):
        parse_run_config(["--max_steps", "3"])
    with pytest.raises(SystemExit) as exit_:
        parse_run_config(["--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert all(f"--{name} (default: " in shown for name in FIELDS)


# ---------------------------------------------------------------------------------------- derive

def test_derived_numbers_from_the_run_config():
    run = parse("--micro_batch_size", "2", "--gradient_accumulation_steps", "4", "--max_steps", "1000",
                "--warmup_ratio", "0.05", "--output_dir", "outputs/exp1/")
    d = derive(run, world_size=8, on_gpu=True)
    assert (d.global_batch_size, d.max_steps, d.warmup_steps) == (64, 1000, 50)
    assert (d.learning_rate, d.weight_decay, d.max_grad_norm, d.lr_scheduler) == (2e-4, 0.0, 1.0, "cosine")
    assert (d.dtype, d.run_name) == ("bf16", "exp1")
    assert derive(parse("--max_steps", "101"), 1, on_gpu=False).warmup_steps == 4  # default ratio 0.03, rounded up
    assert derive(parse("--max_steps", "10"), 1, on_gpu=False).dtype == "fp32"


def test_deepspeed_json_values_are_used_when_the_run_config_leaves_them_unset():
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1}},
          "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 300, "warmup_num_steps": 20}},
          "bf16": {"enabled": True}}
    d = derive(parse(), 2, ds, on_gpu=False)
    assert d == Derived(world_size=2, micro_batch_size=4, gradient_accumulation_steps=2, global_batch_size=16,
                        max_steps=300, warmup_steps=20, learning_rate=1e-4, lr_scheduler="linear", weight_decay=0.1,
                        max_grad_norm=0.5, dtype="bf16", run_name="outputs")
    # the same values set in both agree
    assert derive(parse("--learning_rate", "1e-4", "--micro_batch_size", "4", "--dtype", "bf16"), 2, ds) == d


@pytest.mark.parametrize("argv, ds, expected", [
    (["--learning_rate", "2e-4"], {"optimizer": {"params": {"lr": 1e-4}}},
     "learning_rate=0.0002 (run config) contradicts optimizer.params.lr=0.0001 in ds_configs/zero3.json"),
    ([], {"optimizer": {"params": {"lr": 1e-4}}, "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3}}},
     "optimizer.params.lr=0.0001 in ds_configs/zero3.json contradicts scheduler.params.warmup_max_lr=0.001 in "
     "ds_configs/zero3.json"),
    (["--micro_batch_size", "2"], {"train_micro_batch_size_per_gpu": 1},
     "micro_batch_size=2 (run config) contradicts train_micro_batch_size_per_gpu=1 in ds_configs/zero3.json"),
    (["--max_grad_norm", "1.0"], {"gradient_clipping": 0.3},
     "max_grad_norm=1.0 (run config) contradicts gradient_clipping=0.3 in ds_configs/zero3.json"),
    (["--warmup_ratio", "0.1"], {"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 5}}},
     "warmup_steps=10 (warmup_ratio 0.1) (run config) contradicts scheduler.params.warmup_num_steps=5 in "
     "ds_configs/zero3.json"),
    (["--lr_scheduler", "linear"], {"scheduler": {"type": "WarmupCosineLR", "params": {}}},
     "lr_scheduler=linear (run config) contradicts scheduler.type=WarmupCosineLR in ds_configs/zero3.json "
     "(that is cosine)"),
    (["--dtype", "fp32"], {"bf16": {"enabled": True}},
     "dtype=fp32 (run config) contradicts bf16.enabled=true in ds_configs/zero3.json"),
    (["--dtype", "fp16"], {"fp16": {"enabled": False}},
     "dtype=fp16 (run config) contradicts fp16.enabled=false in ds_configs/zero3.json"),
    ([], {"train_batch_size": 64},
     "train_batch_size=64 in ds_configs/zero3.json is not micro_batch_size 1 x gradient_accumulation_steps 1 x "
     "world size 4 = 4"),
    ([], {"scheduler": {"type": "OneCycle", "params": {}}},
     "scheduler.type='OneCycle' in ds_configs/zero3.json is not supported: the training loop drives the learning "
     "rate (types it reproduces: ['WarmupCosineLR', 'WarmupDecayLR', 'WarmupLR'])"),
    ([], {"scheduler": {"type": "WarmupCosineLR", "params": {"cos_min_ratio": 0.1}}},
     "scheduler.params.cos_min_ratio=0.1 in ds_configs/zero3.json has no equivalent in the training loop's "
     "schedule (linear warmup from 0, decay to 0 at max_steps): remove it"),
    (["--warmup_steps", "200"], {}, "warmup_steps=200 exceeds max_steps=100"),
])
def test_run_config_and_deepspeed_json_setting_different_values_is_an_error(argv, ds, expected):
    with pytest.raises(ConfigError) as err:
        derive(parse("--max_steps", "100", *argv), 4, ds, ds_path="ds_configs/zero3.json", on_gpu=True)
    assert message(err) == expected


def test_max_steps_must_come_from_somewhere():
    with pytest.raises(ConfigError) as err:
        derive(parse(), 1, load_ds_config(ZERO3), ds_path="ds_configs/zero3.json", on_gpu=False)
    assert message(err) == ("max_steps is not set: pass --max_steps N or --num_train_epochs E (or set "
                            "scheduler.params.total_num_steps in ds_configs/zero3.json)")


def test_num_train_epochs_derives_the_steps_from_the_training_set():
    ds = load_ds_config(ZERO3)
    run = parse("--num_train_epochs", "2.5", "--micro_batch_size", "2", "--gradient_accumulation_steps", "3")
    d = derive(run, 2, ds, ds_path="ds_configs/zero3.json", on_gpu=False, train_sequences=100)
    assert (d.global_batch_size, d.max_steps) == (12, 21)  # ceil(2.5 x 100 / 12) = ceil(20.83)
    assert d.warmup_steps == 1  # the default warmup ratio, of the derived steps
    with pytest.raises(ConfigError, match="set max_steps or num_train_epochs, not both"):
        parse("--num_train_epochs", "1", "--max_steps", "5")
    with pytest.raises(ConfigError) as err:
        derive(run, 2, {**ds, "scheduler": {"type": "WarmupLR", "params": {"total_num_steps": 50}}},
               ds_path="ds.json", on_gpu=False, train_sequences=100)
    assert message(err) == ("num_train_epochs=2.5 (run config) contradicts scheduler.params.total_num_steps=50 in "
                            "ds.json: set one of them")


def test_dtype_auto_follows_an_explicit_deepspeed_setting_then_the_device():
    run = parse("--max_steps", "10")
    assert derive(run, 1, {"fp16": {"enabled": True}}, on_gpu=True).dtype == "fp16"
    assert derive(run, 1, {"bf16": {"enabled": True}}, on_gpu=False).dtype == "bf16"
    assert derive(run, 1, {"bf16": {"enabled": False}}, on_gpu=True).dtype == "fp32"
    assert derive(run, 1, {"bf16": {"enabled": "auto"}}, on_gpu=True).dtype == "bf16"
    assert derive(run, 1, {"bf16": {"enabled": "auto"}}, on_gpu=False).dtype == "fp32"
    with pytest.raises(ConfigError, match="bf16.enabled and fp16.enabled are both true"):
        derive(run, 1, {"bf16": {"enabled": True}, "fp16": {"enabled": True}})


# ---------------------------------------------------------------------------------------- DeepSpeed config

def test_shipped_config_is_filled_and_a_scheduler_replaced(caplog):
    run = parse("--learning_rate", "3e-4", "--micro_batch_size", "2", "--gradient_accumulation_steps", "8",
                "--max_steps", "500", "--warmup_steps", "25", "--weight_decay", "0.01", "--run_name", "r1")
    # the shipped configs have no scheduler (the loop drives the lr); a user's WarmupCosineLR is replaced.
    # A user's monitor sections with "auto" paths point into the run folder; DeepSpeed's tensorboard stays off.
    auto_paths_section = {"output_path": "auto", "job_name": "auto"}
    ds_json = {**load_ds_config(ZERO3), "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": "auto"}},
               "tensorboard": {"enabled": "auto", **auto_paths_section},
               "csv_monitor": {"enabled": True, **auto_paths_section}}
    d = derive(run, 4, ds_json, ds_path=ZERO3, on_gpu=True)
    with caplog.at_level(logging.INFO, logger="ds_aslora.train.resolved"):
        filled = deepspeed_config(ds_json, d, "out/runs", ds_path=ZERO3, hidden_size=64)
    assert auto_paths(filled) == [] and "scheduler" not in filled and "scheduler" not in load_ds_config(ZERO3)
    assert "DeepSpeed scheduler WarmupCosineLR in" in caplog.text and "is replaced" in caplog.text
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"],
            filled["train_batch_size"], filled["gradient_clipping"]) == (2, 8, 64, 1.0)
    assert filled["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01,
                                             "torch_adam": True}
    assert filled["bf16"] == {"enabled": True} and "fp16" not in filled
    assert filled["tensorboard"] == {"enabled": False, "output_path": "out/runs", "job_name": "r1"}
    assert filled["csv_monitor"] == {"enabled": True, "output_path": "out/runs", "job_name": "r1"}
    assert filled["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    with pytest.raises(ValueError, match="zero_optimization.reduce_bucket_size"):
        deepspeed_config(ds_json, d)  # no hidden size: ZeRO-3's bucket sizes cannot be filled


def test_effective_values_are_written_even_where_the_json_has_no_key():
    d = derive(parse("--max_steps", "10", "--max_grad_norm", "0.7", "--dtype", "fp16"), 1, {}, on_gpu=True)
    filled = deepspeed_config({"zero_optimization": {"stage": 2}}, d)
    assert filled == {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 1,
                      "gradient_accumulation_steps": 1, "train_batch_size": 1, "gradient_clipping": 0.7,
                      "fp16": {"enabled": True}}


# ---------------------------------------------------------------------------------------- schedule

def schedule(kind, warmup=4, total=12, lr=1e-3):
    return Derived(world_size=1, micro_batch_size=1, gradient_accumulation_steps=1, global_batch_size=1,
                   max_steps=total, warmup_steps=warmup, learning_rate=lr, lr_scheduler=kind, weight_decay=0.0,
                   max_grad_norm=1.0, dtype="fp32", run_name="r")


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_lr_warms_up_from_the_first_step_then_decays_to_zero(kind):
    d = schedule(kind)
    assert [lr_at(s, d) for s in range(1, 5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # step 1 is not 0
    after = [lr_at(s, d) for s in range(5, 13)]
    if kind == "constant":
        assert after == [1e-3] * 8
    else:
        assert after[0] == pytest.approx(1e-3) and after[-1] > 0  # every step trains, the last one too
        assert all(a > b for a, b in zip(after, after[1:], strict=False))
        middle = lr_at(9, d)  # progress (9 - 4 - 1) / (12 - 4) = 1/2
        assert middle == pytest.approx(5e-4)  # cosine and linear agree half way
        expected = 1e-3 * (0.5 * (1 + math.cos(math.pi / 8)) if kind == "cosine" else 0.875)
        assert lr_at(6, d) == pytest.approx(expected)
    for outside in (0, 13):
        with pytest.raises(ValueError, match="outside the schedule's 1..12"):
            lr_at(outside, d)


def test_no_warmup_starts_at_the_peak_as_hugging_face_schedules_do():
    d = schedule("linear", warmup=0, total=4)
    assert [lr_at(s, d) for s in range(1, 5)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


# ---------------------------------------------------------------------------------------- save, reload

def test_save_resolved_reloads_to_the_same_run_and_deepspeed_config(tmp_path):
    run = parse("--method", "aslora", "--r", "16", "--target_modules", "q_proj,v_proj", "--max_steps", "40",
                "--learning_rate", "1e-4", "--packing", "--data", "d.jsonl", "--resume", "auto")
    ds_json = load_ds_config(ZERO3)
    filled = deepspeed_config(ds_json, derive(run, 2, ds_json, on_gpu=False), None, hidden_size=32)
    save_resolved(run, filled, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["ds_config.json", "run_config.yaml"]
    text = (tmp_path / "out" / "run_config.yaml").read_text()
    assert text.startswith("# model\n") and "\n# adapter\nmethod: aslora\n" in text
    again, ds_path = parse_run_config(["--config", str(tmp_path / "out" / "run_config.yaml"),
                                       "--deepspeed", str(tmp_path / "out" / "ds_config.json")])
    assert again == run
    saved = load_ds_config(ds_path)
    assert saved == json.loads(json.dumps(filled))
    # the saved DeepSpeed config holds every value explicitly, and it agrees with the saved run config
    assert derive(again, 2, saved, on_gpu=False) == derive(run, 2, ds_json, on_gpu=False)


def test_dict_round_trip_for_checkpoints():
    run = parse("--method", "sharelora", "--share", "AB", "--eval_fraction", "0.1", "--dtype", "bf16")
    flat = run.to_dict()
    assert set(flat) == set(FIELDS) and flat["share"] == "AB"
    assert RunConfig.from_dict(flat) == run
    assert AdapterConfig.from_dict(run.adapter.to_dict()) == run.adapter
    with pytest.raises(ConfigError, match="unknown key 'sahre' in checkpoint; did you mean 'share'?"):
        RunConfig.from_dict({**flat, "sahre": "A"}, source="checkpoint")

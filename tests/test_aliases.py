"""Other trainers' names for our options (HF Trainer/TRL, peft, LLaMA-Factory, axolotl): read as ours in
flags and YAML, their values converted where they mean something else, two names in one source refused,
our names in everything written, hints and the option lists naming them."""
import pytest
import yaml

from ds_aslora.train.reference import option_reference
from ds_aslora.train.resolved import save_resolved
from ds_aslora.train.run_config import ALIASES, FIELDS, ConfigError, RunConfig, help_text, parse_run_config

DS = ["--deepspeed", "ds.json"]
DEFAULTS = RunConfig().to_dict()

# alias, its value on the command line, in YAML, the field it sets, the value the field gets
CASES = [
    ("model_name_or_path", "/models/m", "/models/m", "model", "/models/m"),
    ("base_model", "/models/m", "/models/m", "model", "/models/m"),
    ("bf16", "true", True, "dtype", "bf16"),
    ("fp16", "true", True, "dtype", "fp16"),
    ("gradient_checkpointing", "false", False, "activation_checkpointing", False),
    ("lora_r", "16", 16, "r", 16),
    ("lora_rank", "16", 16, "r", 16),
    ("lora_alpha", "32", 32, "alpha", 32.0),
    ("lora_dropout", "0.05", 0.05, "dropout", 0.05),
    ("lora_target", "q_proj, v_proj", "q_proj,v_proj", "target_modules", ["q_proj", "v_proj"]),
    ("lora_target_modules", "q_proj,v_proj", ["q_proj", "v_proj"], "target_modules", ["q_proj", "v_proj"]),
    ("lora_target_linear", "true", True, "target_modules", "all-linear"),
    ("dataset", "d.jsonl", "d.jsonl", "data", "d.jsonl"),
    ("eval_dataset", "e.jsonl", "e.jsonl", "eval_data", "e.jsonl"),
    ("cutoff_len", "512", 512, "max_seq_length", 512),
    ("max_length", "512", 512, "max_seq_length", 512),
    ("sequence_len", "512", 512, "max_seq_length", 512),
    ("sample_packing", "true", True, "packing", True),
    ("val_size", "0.1", 0.1, "eval_fraction", 0.1),
    ("val_set_size", "0.1", 0.1, "eval_fraction", 0.1),
    ("per_device_train_batch_size", "4", 4, "micro_batch_size", 4),
    ("num_epochs", "3", 3, "num_train_epochs", 3.0),
    ("lr_scheduler_type", "constant_with_warmup", "constant_with_warmup", "lr_scheduler", "constant"),
    ("eval_steps", "7", 7, "eval_interval", 7),
    ("logging_steps", "3", 3, "log_interval", 3),
    ("save_steps", "9", 9, "save_interval", 9),
    ("resume_from_checkpoint", "true", True, "resume", "auto"),
    ("auto_resume_from_checkpoints", "true", True, "resume", "auto"),
]
# A value of each field other than the alias's: the YAML holds it and the flag must replace it.
BEFORE = {"model": "/models/base", "dtype": "fp32", "activation_checkpointing": True, "r": 4, "alpha": 8,
          "dropout": 0.2, "target_modules": ["o_proj"], "data": "base.jsonl", "eval_data": "base-eval.jsonl",
          "max_seq_length": 128, "packing": False, "eval_fraction": 0.3, "micro_batch_size": 1,
          "num_train_epochs": 1, "lr_scheduler": "linear", "eval_interval": 5, "log_interval": 5,
          "save_interval": 5, "resume": "checkpoints/global_step5"}


def parse(*argv):
    return parse_run_config([*argv, *DS])[0]


def with_yaml(tmp_path, values, *argv):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return parse("--config", str(path), *argv)


def failure(call, *args):
    with pytest.raises(ConfigError) as err:
        call(*args)
    return str(err.value)


def test_every_alias_has_a_case_and_the_cases_would_notice_a_wrong_mapping():
    assert [case[0] for case in CASES] == list(ALIASES)
    for alias, _, _, name, expected in CASES:
        assert ALIASES[alias].field == name and BEFORE[name] != expected


@pytest.mark.parametrize("alias, flag, _, name, expected", CASES, ids=[c[0] for c in CASES])
def test_an_alias_flag_sets_its_field_over_the_yaml_value(tmp_path, alias, flag, _, name, expected):
    run = with_yaml(tmp_path, {name: BEFORE[name]}, f"--{alias}", flag)
    assert run.to_dict()[name] == expected


@pytest.mark.parametrize("alias, _, value, name, expected", CASES, ids=[c[0] for c in CASES])
def test_an_alias_yaml_key_sets_its_field(tmp_path, alias, _, value, name, expected):
    flat = with_yaml(tmp_path, {alias: value}).to_dict()
    assert flat[name] == expected
    # everything else as if the alias had not been given
    assert {k: v for k, v in flat.items() if k != name} == {k: v for k, v in DEFAULTS.items() if k != name}


def test_lora_target_all_is_every_linear_layer(tmp_path):
    assert with_yaml(tmp_path, {"target_modules": ["q_proj"]}, "--lora_target", "all").adapter.target_modules == (
        "all-linear")
    assert with_yaml(tmp_path, {"lora_target": "all", "r": 4}).adapter.target_modules == "all-linear"
    assert parse("--lora_target", "q_proj").adapter.target_modules == ["q_proj"]


def test_resume_from_checkpoint_true_is_auto_false_is_none_a_path_is_a_path(tmp_path):
    assert with_yaml(tmp_path, {"resume_from_checkpoint": True}).checkpoint.resume == "auto"
    assert with_yaml(tmp_path, {"resume_from_checkpoint": "out/checkpoints/global_step8"}).checkpoint.resume == (
        "out/checkpoints/global_step8")
    assert parse("--resume_from_checkpoint", "True").checkpoint.resume == "auto"
    # false on the command line takes back the file's resume
    assert with_yaml(tmp_path, {"resume": "auto"}, "--resume_from_checkpoint", "false").checkpoint.resume is None
    assert with_yaml(tmp_path, {"resume_from_checkpoint": False}).checkpoint.resume is None


def test_val_size_is_a_fraction_and_a_row_count_is_refused(tmp_path):
    assert parse("--val_size", "0.05").data.eval_fraction == 0.05
    assert with_yaml(tmp_path, {"val_size": 0.999}).data.eval_fraction == 0.999
    assert failure(parse, "--val_size", "200") == (
        "--val_size: '200' is a number of rows; eval_fraction holds out a fraction of the data: give a value in "
        "[0, 1) (rows / training rows)")
    assert failure(with_yaml, tmp_path, {"val_set_size": 1}).replace(str(tmp_path / "run.yaml"), "run.yaml") == (
        "val_set_size in 'run.yaml': 1 is a number of rows; eval_fraction holds out a fraction of the data: give a "
        "value in [0, 1) (rows / training rows)")
    assert failure(parse, "--val_size", "some") == "--val_size: expected a number, got 'some'"


def test_precision_switches(tmp_path):
    assert parse("--bf16", "--max_steps", "3").model.dtype == "bf16"  # a bare switch, as in HF
    assert parse("--fp16=true").model.dtype == "fp16"
    # HF configs say both: the false one sets nothing
    assert with_yaml(tmp_path, {"bf16": True, "fp16": False}).model.dtype == "bf16"
    assert with_yaml(tmp_path, {"dtype": "fp16"}, "--bf16", "false").model.dtype == "fp16"
    assert failure(parse, "--bf16=maybe") == "--bf16: expected true or false, got 'maybe'"


def test_lr_scheduler_type_shares_our_names_and_refuses_others():
    assert parse("--lr_scheduler_type", "linear").training.lr_scheduler == "linear"
    assert failure(parse, "--lr_scheduler_type", "polynomial") == (
        "lr_scheduler must be one of ['cosine', 'linear', 'constant'], got 'polynomial'")


def test_a_bad_value_names_the_alias_the_user_typed(tmp_path):
    assert failure(parse, "--lora_alpha", "big") == "--lora_alpha: expected a number, got 'big'"
    path = str(tmp_path / "run.yaml")
    assert failure(with_yaml, tmp_path, {"eval_steps": "often"}) == (
        f"eval_steps in {path!r}: expected an integer, got 'often'")


def test_one_option_under_two_names_in_one_source_is_an_error(tmp_path):
    assert failure(parse, "--r", "8", "--lora_r", "16") == "--r and --lora_r both set r: give one"
    assert failure(parse, "--lora_rank", "8", "--lora_r", "8") == "--lora_rank and --lora_r both set r: give one"
    assert failure(parse, "--fp16", "--bf16") == "--fp16 and --bf16 both set dtype: give one"
    path = str(tmp_path / "run.yaml")
    assert failure(with_yaml, tmp_path, {"r": 8, "lora_r": 16}) == f"'r' and 'lora_r' both set r in {path!r}: give one"
    assert failure(with_yaml, tmp_path, {"eval_steps": 5, "eval_interval": 5}) == (
        f"'eval_steps' and 'eval_interval' both set eval_interval in {path!r}: give one")
    # a repeated flag under one name stays "the last wins"
    assert parse("--lora_r", "8", "--lora_r", "16").adapter.r == 16


def test_a_flag_overrides_the_file_under_either_name(tmp_path):
    assert with_yaml(tmp_path, {"lora_r": 16}, "--r", "4").adapter.r == 4
    assert with_yaml(tmp_path, {"r": 16}, "--lora_r", "4").adapter.r == 4
    assert with_yaml(tmp_path, {"save_steps": 10}, "--save_interval", "20").checkpoint.save_interval == 20


def test_the_saved_run_config_uses_our_names_and_reloads(tmp_path):
    run = parse("--lora_r", "16", "--lora_target", "all", "--per_device_train_batch_size", "2", "--eval_steps", "7",
                "--save_steps", "9", "--logging_steps", "3", "--cutoff_len", "256", "--val_size", "0.1",
                "--lr_scheduler_type", "constant_with_warmup", "--resume_from_checkpoint", "true", "--bf16",
                "--dataset", "d.jsonl", "--model_name_or_path", "/models/m")
    save_resolved(run, {}, str(tmp_path / "out"))
    with open(tmp_path / "out" / "run_config.yaml") as f:
        saved = yaml.safe_load(f)
    assert set(saved) == set(FIELDS) and not set(saved) & set(ALIASES)
    assert (saved["r"], saved["target_modules"], saved["micro_batch_size"], saved["eval_interval"],
            saved["save_interval"], saved["log_interval"], saved["max_seq_length"], saved["eval_fraction"],
            saved["lr_scheduler"], saved["resume"], saved["dtype"], saved["data"], saved["model"]) == (
        16, "all-linear", 2, 7, 9, 3, 256, 0.1, "constant", "auto", "bf16", "d.jsonl", "/models/m")
    again = parse_run_config(["--config", str(tmp_path / "out" / "run_config.yaml"), *DS])[0]
    assert again == run


@pytest.mark.parametrize("argv, expected", [
    (["--eval_step", "5"], "unknown option --eval_step; did you mean --eval_steps (= --eval_interval)?"),
    (["--save_step", "5"], "unknown option --save_step; did you mean --save_steps (= --save_interval)?"),
    (["--logging_step", "5"], "unknown option --logging_step; did you mean --logging_steps (= --log_interval)?"),
    (["--per_device_batch_size", "2"],
     "unknown option --per_device_batch_size; did you mean --per_device_train_batch_size (= --micro_batch_size)?"),
    (["--lora_rnk", "8"], "unknown option --lora_rnk; did you mean --lora_rank (= --r)?"),
    (["--learing_rate", "1e-4"], "unknown option --learing_rate; did you mean --learning_rate?"),
])
def test_close_name_hints_consider_the_aliases(argv, expected):
    assert failure(parse, *argv) == expected


def test_lora_r_is_no_longer_mistaken_for_local_rank(tmp_path):
    assert parse("--lora_r", "32", "--local_rank=0").adapter.r == 32
    path = str(tmp_path / "run.yaml")
    assert failure(with_yaml, tmp_path, {"eval_step": 5}) == (
        f"unknown key 'eval_step' in {path!r}; did you mean 'eval_steps' (= 'eval_interval')?")


def test_help_and_the_option_reference_list_each_alias_beside_its_option(capsys):
    shown = help_text()
    assert "--r (default: 8; also --lora_r, --lora_rank): " in shown
    assert "--target_modules (default: all-linear; also --lora_target [all: all-linear], --lora_target_modules" in shown
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in option_reference().splitlines()
            if line.startswith("| `--")}
    for alias, a in ALIASES.items():
        assert f"--{alias}" in next(line for line in shown.splitlines() if line.startswith(f"  --{a.field} ("))
        assert f"`--{alias}`" in rows[f"`--{a.field}`"]
    assert rows["`--seed`"].strip() == ""
    with pytest.raises(SystemExit):
        parse("--help")
    assert "also --per_device_train_batch_size" in capsys.readouterr().out

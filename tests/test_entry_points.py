"""The commands a user types: console scripts from setup.cfg, ``python -m ds_aslora.train``, the launch/
shims from a checkout, and one job through ``deepspeed --module ds_aslora.train``."""
import configparser
import importlib
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys

import pytest
import yaml
from launcher import launch

from ds_aslora.train.run_config import FIELDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {"ds-aslora-train": "ds_aslora.train.job:main", "ds-aslora-prepare": "ds_aslora.train.prepare:main",
            "ds-aslora-plan": "ds_aslora.planning.cli:main", "ds-aslora-export": "ds_aslora.export.cli:main"}


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=")) for line in lines)


def test_each_console_script_names_a_function_callable_without_arguments():
    scripts = console_scripts()
    assert scripts == COMMANDS
    for target in scripts.values():
        module, _, name = target.partition(":")
        main = getattr(importlib.import_module(module), name)
        inspect.signature(main).bind()  # the generated script calls main() with nothing


def test_the_installed_package_has_the_commands_when_it_is_this_checkout():
    try:
        dist = importlib.metadata.distribution("ds-aslora")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("ds-aslora is not installed")
    url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    if os.path.realpath(url.removeprefix("file://")) != os.path.realpath(ROOT):
        pytest.skip(f"the installed ds-aslora is another checkout's ({url or 'not editable'})")
    installed = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")
                 if e.name.startswith("ds-aslora-")}
    assert installed == COMMANDS


def run(*argv, timeout=180):
    path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])  # this checkout, whatever is installed
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": path}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def test_python_m_ds_aslora_train_prints_every_option():
    done = run("-m", "ds_aslora.train", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: deepspeed [--num_gpus N] launch/train.py")
    assert "deepspeed --module ds_aslora.train" in done.stdout and "ds-aslora-train" in done.stdout
    assert all(f"--{name} (default: " in done.stdout for name in FIELDS)


@pytest.mark.parametrize("shim", ["plan", "export"])
def test_the_launch_shims_run_the_package_commands_under_their_own_name(shim, capsys):
    done = run(os.path.join("launch", f"{shim}.py"), "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python launch/{shim}.py ")
    module = importlib.import_module(f"ds_aslora.{'planning' if shim == 'plan' else 'export'}.cli")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: ds-aslora-{shim} ")


def test_prepare_help_names_its_own_command(capsys):
    from ds_aslora.train.prepare import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    shown = capsys.readouterr().out
    assert exit_.value.code == 0 and shown.startswith("usage: python launch/prepare.py")
    assert "ds-aslora-prepare" in shown
    assert "--deepspeed optional" in shown and "--max_seq_length (default: " in shown


@pytest.mark.slow
def test_deepspeed_module_runs_a_job_given_other_trainers_names(assets, tmp_path):
    out = tmp_path / "out"
    launch(assets, out, "--max_steps", "2", "--save_steps", "1", "--eval_interval", "0", "--lr_scheduler_type",
           "constant_with_warmup", ranks=1, stage=2, module=True)
    assert {"global_step1", "global_step2", "latest"} <= set(os.listdir(out / "checkpoints"))
    with open(out / "summary.json") as f:
        assert json.load(f)["steps"] == 2
    with open(out / "run_config.yaml") as f:
        saved = yaml.safe_load(f)
    assert (saved["save_interval"], saved["lr_scheduler"]) == (1, "constant") and "save_steps" not in saved

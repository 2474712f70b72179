"""Bad input gets one clear line on stderr and exit status 2, and the output directory is left
as it was: every case a user writes by hand (data, model, configs, checkpoints)."""
import json
import os
import subprocess
import sys

import pytest

from launcher import ROOT, launch

TRAIN_PY = os.path.join(ROOT, "launch", "train.py")


def snapshot(folder):
    """Every file under ``folder`` with its size and modification time (None: no folder)."""
    if not os.path.isdir(folder):
        return None
    return sorted((os.path.relpath(os.path.join(d, f), folder), os.stat(os.path.join(d, f)).st_size,
                   os.stat(os.path.join(d, f)).st_mtime_ns) for d, _, files in os.walk(folder) for f in files)


def job(assets, out, *args, stage=2, model=None, data=None):
    """One process (plain python), the tiny base unless ``model``: returns (status, error lines, stderr)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "DS_ASLORA_CACHE": str(assets["root"] / "cache")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    cmd = [sys.executable, TRAIN_PY, "--deepspeed", os.path.join(ROOT, "ds_configs", f"zero{stage}.json"),
           "--model", model or assets["base"], "--data", data or assets["train"], "--output_dir", str(out),
           "--max_steps", "2", "--max_seq_length", "64", "--eval_interval", "0", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    return done.returncode, errors, done.stderr


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def existing_run(assets):
    """An output directory holding a finished run (r=4, lora)."""
    out = assets["root"] / "existing"
    status, errors, stderr = job(assets, out, "--r", "4")
    assert status == 0, stderr[-3000:]
    return out


def bad_inputs(assets, tmp):
    """(name, extra args, job kwargs, the expected fragment of the one error line)."""
    no_weights = tmp / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((open(os.path.join(assets["base"], "config.json")).read()))
    small_vocab = tmp / "small_vocab"
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(assets["base"])
    config.vocab_size, config.pad_token_id, config.bos_token_id, config.eos_token_id = 100, None, None, None
    LlamaForCausalLM(config).save_pretrained(small_vocab)
    AutoTokenizer.from_pretrained(assets["base"]).save_pretrained(small_vocab)
    contradicting = tmp / "ds.json"
    ds = json.load(open(os.path.join(ROOT, "ds_configs", "zero2.json")))
    ds["optimizer"]["params"]["lr"] = 1e-4
    contradicting.write_text(json.dumps(ds))
    yaml_file = tmp / "run.yaml"
    yaml_file.write_text("learning_rate: 1e-3\nlearing_rate_warmup: 3\n")
    long_rows = write_jsonl(tmp / "long.jsonl", [{"text": "x" * 500}] * 4)
    return [
        ("missing data file", [], dict(data=str(tmp / "missing.jsonl")), "missing.jsonl' not found"),
        ("malformed jsonl", [], dict(data=os.path.join(ROOT, "tests", "assets", "data", "malformed.jsonl")),
         "malformed.jsonl, line 3: malformed JSON"),
        ("empty after filtering", [], dict(data=write_jsonl(tmp / "empty.jsonl", [{"text": ""}, {"text": ""}])),
         "no row has a token to train on"),
        ("unknown columns", [], dict(data=os.path.join(ROOT, "tests", "assets", "data", "unknown_columns.jsonl")),
         "no known columns, found ['answer', 'question']"),
        ("too long, refused", ["--truncation", "refuse"], dict(data=long_rows), "longer than max_seq_length"),
        ("absent target modules", ["--target_modules", "c_attn"], {}, "its nn.Linear modules are"),
        ("model without weights", [], dict(model=str(no_weights)), "has no weights"),
        ("model without config", [], dict(model=str(tmp)), "has no config.json"),
        ("tokenizer of another model", [], dict(model=str(small_vocab)), "do not belong together"),
        ("contradicting DeepSpeed config", ["--learning_rate", "1e-3", "--deepspeed", str(contradicting)], {},
         "learning_rate=0.001 (run config) contradicts optimizer.params.lr=0.0001"),
        ("unknown flag", ["--learing_rate", "1e-3"], {},
         "unknown option --learing_rate; did you mean --learning_rate?"),
        ("unknown yaml key", ["--config", str(yaml_file)], {}, "learing_rate_warmup"),
    ]


@pytest.mark.slow
def test_each_bad_input_is_one_clear_line_and_leaves_the_output_dir_untouched(assets, existing_run, tmp_path):
    for name, args, kwargs, fragment in bad_inputs(assets, tmp_path):
        # a new output dir stays absent; an existing run stays as it was even with --overwrite_output_dir:
        # bad input fails before anything is removed or written
        for out in (tmp_path / "fresh", existing_run):
            before = snapshot(out)
            extra = ["--overwrite_output_dir"] if out == existing_run else []
            status, errors, stderr = job(assets, out, *args, *extra, **kwargs)
            assert status == 2 and len(errors) == 1 and fragment in errors[0], (name, errors, stderr[-2000:])
            assert "Traceback" not in stderr, (name, stderr[-2000:])
            assert snapshot(out) == before, name


@pytest.mark.slow
def test_runs_that_do_not_fit_the_output_dir_or_checkpoint_are_refused(assets, existing_run, tmp_path):
    before = snapshot(existing_run)
    cases = [
        ([], "already holds a run", "pass --resume auto to continue it or --overwrite_output_dir"),
        (["--resume", "auto", "--r", "8"], "another adapter config", "r=4 there, 8 here"),
        (["--resume", "auto", "--r", "4", "--method", "sharelora"], "another adapter config", "method='lora' there"),
        (["--resume", str(tmp_path / "nowhere")], "no such checkpoint folder", "nowhere"),
    ]
    for args, fragment, detail in cases:
        status, errors, stderr = job(assets, existing_run, *args)
        assert status == 2 and len(errors) == 1 and fragment in errors[0] and detail in errors[0], (args, errors)
        assert "Traceback" not in stderr
    assert snapshot(existing_run) == before
    # a checkpoint of 2 ranks at ZeRO-2 on 1 rank: the partitioned optimizer state cannot be re-cut
    two = assets["root"] / "two-ranks"
    launch(assets, two, "--max_steps", "2", stage=2)
    before = snapshot(two)
    status, errors, _ = job(assets, two, "--resume", "auto", "--r", "4", "--alpha", "8", "--packing")
    assert status == 2 and "written by 2 ranks at ZeRO stage 2" in errors[0] and "onto 1 ranks" in errors[0], errors
    assert snapshot(two) == before


@pytest.mark.slow
def test_a_diverging_run_stops_with_the_step_and_rows_and_saves_nothing_poisoned(assets, tmp_path):
    out = tmp_path / "diverged"
    status, errors, stderr = job(assets, out, "--learning_rate", "1e38", "--max_steps", "20", "--save_interval", "1",
                                 "--warmup_steps", "0", "--log_interval", "1", "--dtype", "fp32")
    assert status == 3 and len(errors) == 1, stderr[-3000:]
    assert "non-finite loss at optimizer step" in errors[0] and "training rows [" in errors[0], errors
    bad_step = int(errors[0].split("optimizer step ")[1].split(" ")[0])
    saved = sorted(int(t[len("global_step"):]) for t in os.listdir(out / "checkpoints") if t.startswith("global_step"))
    assert saved and max(saved) == bad_step - 1  # every step before the bad one was saved; the bad one never

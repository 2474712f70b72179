"""Bad input gets one clear line on stderr and exit status 2, and the output directory is left
as it was: every case a user writes by hand (data, model, configs, checkpoints)."""
import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from launcher import FP16_ON_CPU, ROOT, job, launch


def snapshot(folder, exact=False):
    """Every file under ``folder`` with its size and modification time (None: no folder); ``exact``:
    also each file's bytes and each folder's modification time (nothing was even created and removed)."""
    if not os.path.isdir(folder):
        return None
    entries = []
    for d, _, files in os.walk(folder):
        if exact:
            entries.append((os.path.relpath(d, folder), os.stat(d).st_mtime_ns))
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest() if exact else None
            entries.append((os.path.relpath(path, folder), os.stat(path).st_size, os.stat(path).st_mtime_ns, digest))
    return sorted(entries)


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
    with_wandb = tmp / "wandb.json"
    with_wandb.write_text(json.dumps({**json.load(open(os.path.join(ROOT, "ds_configs", "zero2.json"))),
                                      "wandb": {"enabled": True}}))
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
        ("too long, refused", ["--truncation", "refuse"], dict(data=long_rows),
         "4 of 4 sequences in " + long_rows + " are longer than max_seq_length=64 (longest: 501 tokens); raise "
         "max_seq_length or set truncation=truncate"),
        ("absent target modules", ["--target_modules", "c_attn"], {}, "its nn.Linear modules are"),
        ("model without weights", [], dict(model=str(no_weights)), "has no weights"),
        ("model without config", [], dict(model=str(tmp)), "has no config.json"),
        ("tokenizer of another model", [], dict(model=str(small_vocab)), "do not belong together"),
        ("contradicting DeepSpeed config", ["--learning_rate", "1e-3", "--deepspeed", str(contradicting)], {},
         "learning_rate=0.001 (run config) contradicts optimizer.params.lr=0.0001"),
        ("unknown flag", ["--learing_rate", "1e-3"], {},
         "unknown option --learing_rate; did you mean --learning_rate?"),
        ("unknown yaml key", ["--config", str(yaml_file)], {}, "learing_rate_warmup"),
        *([("wandb enabled, not installed", ["--deepspeed", str(with_wandb)], {},
            f"wandb.enabled is true in {with_wandb} but 'wandb' is not installed (pip install wandb)")]
          if importlib.util.find_spec("wandb") is None else []),
        ("unreachable ASLoRA schedule", ["--method", "aslora", "--merge_start", "1", "--merge_interval", "3",
                                         "--merges_per_event", "1"], {},
         "ASLoRA cannot reach 1 B groups per module type by step 2: 0 merge events (merge_start=1, merge_interval=3, "
         "merge_end=2) x merges_per_event=1 = 0 merges, 3 needed; a wider window (merge_start, merge_end) would"),
    ]


@pytest.mark.slow
def test_each_bad_input_is_one_clear_line_and_leaves_the_output_dir_untouched(assets, existing_run, tmp_path):
    # a new output dir stays absent; an existing run stays as it was even with --overwrite_output_dir:
    # bad input fails before anything is removed or written. Every refused job is its own process with its
    # own output dir (a fresh one, or a copy of the finished run), so they run two at a time (a core each).
    def refused(index, case, existing):
        name, args, kwargs, fragment = case
        out = tmp_path / f"case{index}" / ("existing" if existing else "fresh")
        if existing:
            shutil.copytree(existing_run, out)
        before = snapshot(out)
        extra = ["--overwrite_output_dir"] if existing else []
        return job(assets, out, *args, *extra, **kwargs), before, snapshot(out)

    cases = [(i, case, existing) for i, case in enumerate(bad_inputs(assets, tmp_path)) for existing in (False, True)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(lambda c: refused(*c), cases))
    for (_, (name, _, _, fragment), existing), ((status, errors, stderr), before, after) in zip(cases, done,
                                                                                               strict=True):
        assert status == 2 and len(errors) == 1 and fragment in errors[0], (name, existing, errors, stderr[-2000:])
        assert "Traceback" not in stderr, (name, stderr[-2000:])
        assert after == before, (name, existing)


@pytest.mark.slow
def test_runs_that_do_not_fit_the_output_dir_or_checkpoint_are_refused(assets, existing_run, tmp_path):
    before = snapshot(existing_run)
    cases = [
        ([], "holds that run: pass --overwrite_output_dir", "another adapter config: r=4 there, 8 here"),
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
    # 1e30: weights blow up at once (torch AdamW refuses a step size past float32, as 1e38 / bias correction is)
    status, errors, stderr = job(assets, out, "--learning_rate", "1e30", "--max_steps", "20", "--save_interval", "1",
                                 "--warmup_steps", "0", "--log_interval", "1", "--dtype", "fp32")
    assert status == 3 and len(errors) == 1, stderr[-3000:]
    assert "non-finite loss at optimizer step" in errors[0] and "training rows [" in errors[0], errors
    bad_step = int(errors[0].split("optimizer step ")[1].split(" ")[0])
    saved = sorted(int(t[len("global_step"):]) for t in os.listdir(out / "checkpoints") if t.startswith("global_step"))
    assert saved and max(saved) == bad_step - 1  # every step before the bad one was saved; the bad one never


# launch/train.py with a finite loss whose gradient is NaN at the 3rd backward (an overflow inside the model).
NAN_GRADIENT_AT_STEP_3 = ["-c", f"""
import sys, torch
from deepspeed.runtime.engine import DeepSpeedEngine
class NanGrad(torch.autograd.Function):
    forward = staticmethod(lambda ctx, x: x.clone())
    backward = staticmethod(lambda ctx, g: g * float("nan"))
original, calls = DeepSpeedEngine.backward, []
def backward(self, loss, *args, **kwargs):
    calls.append(1)
    return original(self, NanGrad.apply(loss) if len(calls) == 3 else loss, *args, **kwargs)
DeepSpeedEngine.backward = backward
sys.path.insert(0, {ROOT!r})
from ds_aslora.train.job import main
sys.exit(main(sys.argv[1:]))
"""]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_a_nan_gradient_under_a_finite_loss_stops_the_run_and_saves_nothing_poisoned(assets, tmp_path, stage):
    out = tmp_path / "nan-grad"
    status, errors, stderr = job(assets, out, "--max_steps", "6", "--save_interval", "1", "--warmup_steps", "0",
                                 script=NAN_GRADIENT_AT_STEP_3, stage=stage)
    assert status == 3 and len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith("error: non-finite gradient norm at optimizer step 3 (epoch 0; training rows ["), errors
    saved = sorted(int(t[len("global_step"):]) for t in os.listdir(out / "checkpoints") if t.startswith("global_step"))
    assert saved == [1, 2]


@pytest.mark.slow
def test_too_long_sequences_are_truncated_with_a_count_the_user_sees(assets, tmp_path):
    rows = write_jsonl(tmp_path / "long.jsonl", [{"text": "x" * 500}] * 3 + [{"text": "short"}])
    status, errors, stderr, stdout = job(assets, tmp_path / "out", "--max_steps", "1", data=rows, stdout=True)
    assert status == 0 and not errors, stderr[-3000:]
    assert ("train: 3 of 4 sequences were longer than max_seq_length=64 (longest 501 tokens) and were truncated "
            "(--truncation refuse stops instead)") in stdout.splitlines(), stdout


@pytest.mark.slow
def test_a_checkpoint_of_another_base_model_is_refused_before_anything_is_written(assets, existing_run, tmp_path):
    from transformers import LlamaForCausalLM

    from ds_aslora.train.model_setup import byte_tokenizer, tiny_config

    other = tmp_path / "other"
    config = tiny_config()
    config.num_hidden_layers = 2
    LlamaForCausalLM(config).save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    before = snapshot(existing_run, exact=True)
    # max_steps 4: a run to continue (the existing one finished at step 2, with the other model: refused as such)
    status, errors, stderr = job(assets, existing_run, "--resume", "auto", "--r", "4", "--max_steps", "4",
                                 model=str(other))
    assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert errors[0] == (f"error: checkpoint 'global_step2' was trained on another base model: {assets['base']!r} "
                         f"there, {str(other)!r} here (num_hidden_layers=4 there, 2 here)"), errors
    assert snapshot(existing_run, exact=True) == before  # DeepSpeed's TensorBoard monitor never started


@pytest.mark.slow
def test_fp16_overflow_steps_are_skipped_counted_and_logged_not_fatal(assets, tmp_path):
    """A loss scale of 2**32 overflows fp16 gradients: DeepSpeed's loss scaler skips those updates
    and lowers the scale until they fit. The job goes on (no exit 3), says so per step and in its
    last lines, and a skipped step moves nothing (B stays at its zero init, the lr schedule waits)."""
    from safetensors.torch import load_file
    from test_train_job import scalars

    ds = json.load(open(os.path.join(ROOT, "ds_configs", "zero2.json")))
    ds["fp16"] = {"initial_scale_power": 32}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    out, steps = tmp_path / "fp16", 24
    status, errors, stderr, stdout = job(assets, out, "--dtype", "fp16", "--max_steps", str(steps), "--log_interval",
                                         "1", "--save_interval", "8", "--warmup_steps", "0", script=FP16_ON_CPU,
                                         ds=str(tmp_path / "ds.json"), stdout=True)
    assert status == 0 and not errors, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if "fp16 gradient overflow" in line]
    skipped_at = [int(line.split(":")[0].split()[1]) for line in lines]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    skipped = summary["skipped_steps"]
    assert summary["steps"] == steps and 8 < skipped < steps and len(lines) == skipped, (summary, lines)
    assert skipped_at[:8] == list(range(1, 9)) and lines[0].startswith(
        "step 1: fp16 gradient overflow; the loss scaler skipped this update (loss scale now "), lines
    assert (f"{skipped} of {steps} steps were skipped by the fp16 loss scaler (gradient overflow): the adapters were "
            f"updated {steps - skipped} times") in stdout.splitlines()
    counts, _ = scalars(str(out), "train/skipped_steps")
    assert counts[steps] == skipped and [counts[s] for s in range(1, 9)] == list(range(1, 9))
    norms, _ = scalars(str(out), "train/grad_norm")  # an overflowed (inf) norm is no gradient: not logged
    assert sorted(norms) == sorted(set(range(1, steps + 1)) - set(skipped_at)) and all(map(math.isfinite,
                                                                                        norms.values()))
    lrs, _ = scalars(str(out), "train/learning_rate")
    first_applied = min(norms)
    assert all(lrs[s] == lrs[1] for s in range(1, first_applied + 1)) and lrs[steps] < lrs[1]
    b = [k for k in load_file(str(out / "adapter" / "compact" / "adapter_model.safetensors")) if k.endswith("lora_B")]
    at_8 = load_file(str(out / "checkpoints" / "global_step8" / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(out / "adapter" / "compact" / "adapter_model.safetensors"))
    assert b and not any(at_8[k].any() for k in b) and all(final[k].any() for k in b)


@pytest.mark.slow
def test_bad_data_stops_every_rank_at_once_not_after_the_setup_wait(assets, tmp_path):
    # Rank 0 tokenises while the others wait (up to 4 hours, for a large set); its error must reach them.
    start = time.monotonic()
    done = launch(assets, tmp_path / "out", "--data", os.path.join(ROOT, "tests", "assets", "data", "malformed.jsonl"),
                  "--max_steps", "2", ranks=2, stage=2, check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert done.returncode == 2 and errors == [errors[0]] and "malformed.jsonl, line 3: malformed JSON" in errors[0]
    assert time.monotonic() - start < 240 and "Traceback" not in done.stderr

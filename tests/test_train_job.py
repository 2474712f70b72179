"""launch/train.py through the real DeepSpeed launcher on CPU ranks, as a user runs it.

A tiny Llama with a byte-level tokenizer saved as a Hugging Face folder, Shakespeare text as
jsonl: every method trains under ZeRO-2 and ZeRO-3, one rank with accumulation equals two
ranks, a resume reproduces the uninterrupted run across a merge event, the exports reproduce
the job's eval loss in peft and in transformers, and TensorBoard holds what was logged.
"""
import glob
import json
import math
import os
import shutil
import sys

import pytest
import torch
from launcher import ROOT, launch
from safetensors.torch import load_file

METHODS = {"lora": ["--method", "lora"], "shareA": ["--method", "sharelora", "--share", "A"],
           "shareAB": ["--method", "sharelora", "--share", "AB"],  # no per-layer tensor: the bank in the engine
           "aslora": ["--method", "aslora", "--merge_start", "2", "--merge_interval", "2", "--merge_end", "6",
                      "--target_groups", "2"]}


def scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = glob.glob(os.path.join(out, "runs", "*"))
    acc = EventAccumulator(run, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}, acc


_RUNS = {}


def trained_args(method):
    """6 steps, a checkpoint at step 4 and at the end (ASLoRA: merge events at 4 and 6, the step-4
    checkpoint saved after the first), each with an evaluation (as at step 0); one TensorBoard run name
    (a resumed job writes into it)."""
    # the sample: under ZeRO-3 a collective generate (synced_gpus)
    return [*METHODS[method], "--max_steps", "6", "--save_interval", "4", "--learning_rate", "1e-2", "--sample_prompt",
            "ROMEO:", "--run_name", "r"]


def trained(assets, stage, method):
    """Memoised: one job per (stage, method). Read-only: a test that trains on from it copies it."""
    key = (stage, method)
    if key not in _RUNS:
        out = assets["root"] / f"{method}-zero{stage}"
        launch(assets, out, *trained_args(method), stage=stage)
        _RUNS[key] = str(out)
    return _RUNS[key]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_and_held_out_loss_falls(assets, stage, method):
    out = trained(assets, stage, method)
    losses, _ = scalars(out, "eval/loss")
    assert set(losses) == {0, 4, 6} and losses[6] < losses[0] - 0.05, losses
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == 6 and summary["sample"].startswith("ROMEO:")
    for name in ("run_config.yaml", "ds_config.json", "sample.txt", "adapter/peft/adapter_model.safetensors",
                 "adapter/compact/adapter_model.safetensors", "checkpoints/global_step4/adapter/adapter_config.json",
                 "checkpoints/global_step6/adapter/adapter_config.json",
                 "adapter/best/peft/adapter_model.safetensors", "adapter/best/compact/tokenizer.json",
                 "trainer_log.jsonl"):
        assert os.path.isfile(os.path.join(out, name)), name


@pytest.mark.slow
def test_tensorboard_holds_the_scalars_texts_and_images(assets):
    out = trained(assets, 3, "aslora")
    _, acc = scalars(out, "eval/loss")
    tags = acc.Tags()
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "eval/loss",
                "eval/perplexity", "memory/peak_gib", "params/trainable", "aslora/live_B_groups/q_proj"):
        assert tag in tags["scalars"], tag
    groups = {e.step: e.value for e in acc.Scalars("aslora/live_B_groups/q_proj")}
    assert groups[1] == 4 and groups[4] == 3 and groups[6] == 2  # events at steps 4 and 6, down to 2 groups
    lrs = [e.value for e in acc.Scalars("train/learning_rate")]
    assert lrs[0] == pytest.approx(1e-2) and all(a > b > 0 for a, b in zip(lrs[1:], lrs[2:], strict=False))
    merges = acc.Tensors("aslora/merges/text_summary")
    assert [m.step for m in merges] == [4, 6] and "q_proj" in merges[0].tensor_proto.string_val[0].decode()
    images = [t for t in tags["images"] if t.startswith("aslora/distance/")]
    assert sorted(images) == sorted(f"aslora/distance/{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"))
    assert [e.step for e in acc.Images("aslora/distance/q_proj")] == [4, 6]
    assert "sample" in {t.split("/")[0] for t in tags["tensors"]}


def eval_loss(model, assets, micro=4, tokenizer_dir=None):
    """The job's eval loss (summed token cross-entropy / target tokens over the eval set), the data
    tokenised with the tokenizer in ``tokenizer_dir`` (default: the base model's)."""
    from transformers import AutoTokenizer

    from ds_aslora.train.batches import EvalBatches, model_inputs
    from ds_aslora.train.data import prepare_data
    from ds_aslora.train.run_config import DataConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or assets["base"])
    config = DataConfig(data=assets["train"], eval_data=assets["eval"], max_seq_length=64, packing=True)
    data = prepare_data(config, tokenizer, seed=42, cache_dir=str(assets["root"] / "cache" / "test"))
    total, count = 0.0, 0
    with torch.no_grad():
        for step in EvalBatches(data.eval, micro_batch_size=micro, world_size=1, rank=0, pad_id=tokenizer.pad_token_id):
            batch = step.micro_batches[0]
            total += float(model(**model_inputs(batch), num_items_in_batch=torch.tensor(1.0)).loss)
            count += int((batch["labels"][:, 1:] != -100).sum())
    return total / count


@pytest.mark.slow
def test_peft_and_merged_exports_reproduce_the_jobs_eval_loss(assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = trained(assets, 3, "aslora")
    losses, _ = scalars(out, "eval/loss")
    peft_dir = os.path.join(out, "adapter", "peft")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["base"]), peft_dir)
    # fp32 sums over a few thousand tokens: rounding far below 1e-5 relative; the data tokenised by the
    # tokenizer saved with the adapter, as a user serving it would
    assert eval_loss(peft_model.eval(), assets, tokenizer_dir=peft_dir) == pytest.approx(losses[6], rel=1e-5)
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    from export import main as export_main

    assert export_main([out, "--base", assets["base"]]) == 0
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged")).eval()
    assert eval_loss(merged, assets) == pytest.approx(losses[6], rel=1e-5)


@pytest.mark.slow
def test_one_rank_with_accumulation_equals_two_ranks(assets):
    # unpacked rows of different lengths: micro-batches hold different numbers of target tokens, so a
    # per-micro-batch mean loss would weight them differently on the two splits
    args = [*METHODS["aslora"], "--max_steps", "8", "--learning_rate", "1e-3", "--eval_interval", "0",
            "--packing", "false", "--max_seq_length", "256"]
    splits = {"w1ga2m2": (1, 2, 2), "w2ga1m2": (2, 1, 2), "w2ga2m1": (2, 2, 1)}  # global batch 4 each
    adapters = {}
    for name, (ranks, accumulation, micro) in splits.items():
        launch(assets, assets["root"] / name, *args, "--gradient_accumulation_steps", str(accumulation),
               "--micro_batch_size", str(micro), ranks=ranks, stage=2)
        adapters[name] = load_file(str(assets["root"] / name / "adapter" / "compact" / "adapter_model.safetensors"))
    a = adapters.pop("w1ga2m2")
    for name, b in adapters.items():  # 8 Adam steps of lr 1e-3: a split-dependent loss moves elements by ~lr
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=f"{name} {key}")


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_across_a_merge_event(assets, tmp_path):
    # the uninterrupted run: ASLoRA under ZeRO-3, checkpoints at step 4 (after the event at 4) and 6 (the event
    # at 6 after the resume); one run name: the resumed job writes into the crashed job's TensorBoard run, as in place
    full, resumed = trained(assets, 3, "aslora"), tmp_path / "resumed"
    shutil.copytree(full, resumed)
    # as after a crash during the save at step 6: its folder torn, ``latest`` still at step 4
    os.remove(resumed / "checkpoints" / "global_step6" / "ds_aslora.json")
    (resumed / "checkpoints" / "latest").write_text("global_step4")
    shutil.rmtree(resumed / "adapter")  # runs/ stays: the crashed run's events past step 4 must not show
    done = launch(assets, resumed, *trained_args("aslora"), "--resume", "auto", stage=3)
    assert "resumed from" in done.stdout and "at step 4" in done.stdout
    assert os.path.isdir(resumed / "checkpoints" / "global_step6.set-aside.0")  # the torn save, kept
    full_losses, acc = scalars(full, "train/loss")
    resumed_losses, _ = scalars(str(resumed), "train/loss")
    assert sorted(resumed_losses) == list(range(1, 7))  # steps 5-6 logged once: the crashed run's were purged
    assert [e.step for e in acc.Tensors("aslora/merges/text_summary")] == [4, 6]  # an event after the resume
    for step in (5, 6):  # fp32 on CPU, same ranks and data: exactly
        assert resumed_losses[step] == full_losses[step], step
    a = load_file(os.path.join(full, "adapter", "compact", "adapter_model.safetensors"))
    b = load_file(os.path.join(resumed, "adapter", "compact", "adapter_model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert math.isfinite(full_losses[6])


@pytest.mark.slow
def test_resuming_an_older_checkpoint_by_path_continues_that_line(assets, tmp_path):
    """Rolling back to step 4 of a run that saved up to step 6: the run reaches step 6 again, its
    save sets the abandoned step-6 folder aside, and ``latest`` follows the new line."""
    out = tmp_path / "rollback"
    shutil.copytree(trained(assets, 3, "lora"), out)
    done = launch(assets, out, *trained_args("lora"), "--resume", str(out / "checkpoints" / "global_step4"))
    assert "at step 4" in done.stdout
    assert (out / "checkpoints" / "latest").read_text() == "global_step6"
    assert os.path.isdir(out / "checkpoints" / "global_step6.set-aside.0")
    assert os.path.isfile(out / "checkpoints" / "global_step6" / "ds_aslora.json")


@pytest.mark.slow
def test_a_job_after_launch_prepare_reads_the_cache_and_tokenises_nothing(assets, tmp_path):
    import subprocess

    from launcher import COMMON

    cache = ["--data_cache_dir", str(tmp_path / "prepared")]
    data = ["--model", assets["base"], "--data", assets["train"], "--eval_data", assets["eval"], *COMMON, *cache]
    prepare = [sys.executable, os.path.join(ROOT, "launch", "prepare.py"), *data]
    first = subprocess.run(prepare, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0 and first.stdout.startswith("prepared "), first.stdout + first.stderr
    second = subprocess.run(prepare, capture_output=True, text=True, cwd=ROOT)
    assert second.returncode == 0 and second.stdout.startswith("already prepared: "), second.stdout
    done = launch(assets, tmp_path / "out", "--max_steps", "1", *cache)
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("data: ")]
    assert line == f"data: read the prepared cache {second.stdout.split(': ', 1)[1].strip()} (nothing tokenised)"
    longer = subprocess.run([*prepare, "--max_seq_length", "96"], capture_output=True, text=True, cwd=ROOT)
    name = os.path.basename(second.stdout.split(": ", 1)[1].strip())
    assert longer.stdout.splitlines()[0] == f"no cached set had this key; the nearest cached set, {name}, differs " \
        "in: option max_seq_length", longer.stdout
    missing = subprocess.run([*prepare, "--data", str(tmp_path / "none.jsonl")], capture_output=True, text=True,
                             cwd=ROOT)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: data file {str(tmp_path / 'none.jsonl')!r} not found"]


@pytest.mark.slow
@pytest.mark.parametrize("steps, ranks", [(3, 1), (7, 2)])
def test_aslora_reaches_its_target_in_runs_of_any_length_and_a_resume_keeps_the_schedule(assets, tmp_path, steps,
                                                                                        ranks):
    """The default window (10% to 80% of the run) with target_groups 2 of 4 layers: 2 merges per module type,
    spread over however many steps the run has; resumed with more steps, the run keeps its schedule."""
    out = tmp_path / "out"
    args = ["--method", "aslora", "--target_groups", "2", "--save_interval", str(steps)]
    first = launch(assets, out, *args, "--max_steps", str(steps), ranks=ranks)
    (line,) = [x for x in first.stdout.splitlines() if x.startswith("ASLoRA schedule: ")]
    assert line.startswith("ASLoRA schedule: 2 merge events from step ") and (
        "(1 merge per module type at each, 14 in all), ending at 2 B groups per module type, " in line)
    summary = json.load(open(out / "summary.json"))
    assert set(summary["live_B_groups"].values()) == {2}
    again = launch(assets, out, *args, "--max_steps", str(steps + 4), "--resume", "auto", ranks=ranks)
    assert line in again.stdout.splitlines()  # the schedule it started with, not one for the longer run
    assert set(json.load(open(out / "summary.json"))["live_B_groups"].values()) == {2}

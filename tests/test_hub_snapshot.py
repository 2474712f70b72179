"""What a hub id downloads: ``launch/prepare.py`` the tokenizer alone, the job the weights it loads;
and what the other ranks of a node then find in the cache (the first rank downloaded)."""
import os
from fnmatch import fnmatch
from types import SimpleNamespace

import huggingface_hub
import pytest

from ds_aslora.train.model_setup import resolve_model_path

REPO = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
        "special_tokens_map.json", "chat_template.jinja", "model.safetensors.index.json",
        "model-00001-of-00030.safetensors", "pytorch_model-00001-of-00030.bin", "original/consolidated.00.pth"]
BIN_ONLY = ["config.json", "tokenizer.json", "pytorch_model.bin"]


@pytest.fixture(params=[REPO, BIN_ONLY], ids=["safetensors", "bin-only"])
def hub(monkeypatch, tmp_path, request):
    """A hub repo and huggingface_hub's cache in tmp_path: a download writes the files the patterns let
    through; a cached read refuses a snapshot with any of them missing (IncompleteSnapshotError)."""
    repo = request.param
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: SimpleNamespace(
        model_info=lambda _: SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in repo])))
    cache = tmp_path / "snapshot"

    def snapshot_download(repo_id, local_files_only=False, ignore_patterns=None, allow_patterns=None):
        wanted = [f for f in repo if (allow_patterns is None or any(fnmatch(f, p) for p in allow_patterns))
                  and not any(fnmatch(f, p) for p in ignore_patterns or [])]
        missing = [f for f in wanted if not (cache / f).exists()]
        if local_files_only and missing:
            raise RuntimeError(f"IncompleteSnapshotError: {len(missing)} file(s) are missing")
        for f in missing:
            (cache / f).parent.mkdir(parents=True, exist_ok=True)
            (cache / f).write_text("")
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repo, cache


def files(cache):
    return sorted(os.path.relpath(os.path.join(d, f), cache) for d, _, names in os.walk(cache) for f in names)


def test_prepare_downloads_the_tokenizer_and_config_but_no_weights(hub):
    repo, cache = hub
    assert resolve_model_path("meta-llama/Llama-2-70b-hf", tokenizer_only=True) == str(cache)
    assert files(cache) == sorted(f for f in repo if not f.endswith((".safetensors", ".bin", ".pth")))
    assert resolve_model_path("meta-llama/Llama-2-70b-hf", download=False, tokenizer_only=True) == str(cache)


def test_the_first_rank_downloads_one_weight_format_and_the_others_find_it_in_the_cache(hub):
    repo, cache = hub
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        resolve_model_path("meta-llama/Llama-2-70b-hf", download=False)  # before the first rank's download
    resolve_model_path("meta-llama/Llama-2-70b-hf")
    weights = [f for f in files(cache) if f.endswith((".safetensors", ".bin", ".pth"))]
    assert weights == (["model-00001-of-00030.safetensors"] if repo is REPO else ["pytorch_model.bin"])
    assert resolve_model_path("meta-llama/Llama-2-70b-hf", download=False) == str(cache)

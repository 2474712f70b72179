"""What a hub id downloads: ``launch/prepare.py`` the tokenizer alone, the job the weights it loads."""
from fnmatch import fnmatch
from types import SimpleNamespace

import huggingface_hub
import pytest

from ds_aslora.train.model_setup import resolve_model_path

REPO = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
        "special_tokens_map.json", "chat_template.jinja", "model.safetensors.index.json",
        "model-00001-of-00030.safetensors", "pytorch_model-00001-of-00030.bin", "original/consolidated.00.pth"]


@pytest.fixture
def hub(monkeypatch):
    """The hub's two calls, recorded; the 'download' keeps the files the patterns let through."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: SimpleNamespace(
        model_info=lambda repo: SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in REPO])))
    fetched = []

    def snapshot_download(repo_id, local_files_only, ignore_patterns=None, allow_patterns=None):
        fetched.extend(f for f in REPO if (allow_patterns is None or any(fnmatch(f, p) for p in allow_patterns))
                       and not any(fnmatch(f, p) for p in ignore_patterns or []))
        return f"/hub/{repo_id}"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return fetched


def test_prepare_downloads_the_tokenizer_and_config_but_no_weights(hub):
    assert resolve_model_path("meta-llama/Llama-2-70b-hf", tokenizer_only=True) == "/hub/meta-llama/Llama-2-70b-hf"
    assert sorted(hub) == sorted(f for f in REPO if not f.endswith((".safetensors", ".bin", ".pth")))


def test_the_job_downloads_the_safetensors_weights_only(hub):
    resolve_model_path("meta-llama/Llama-2-70b-hf")
    assert "model-00001-of-00030.safetensors" in hub and not any(f.endswith((".bin", ".pth")) for f in hub)

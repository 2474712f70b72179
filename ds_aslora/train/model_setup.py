"""The base model and its tokenizer, as the job loads them: a local folder, a Hugging Face
hub id (through huggingface_hub's cache), the embedded default (SmolLM2-135M-Instruct,
converted once into the cache) or ``tiny`` (a small random Llama with a byte-level tokenizer,
for smoke tests). Under ZeRO-3 the model is partitioned while it loads
(``ds_aslora.runtime.base_model.load_base_model``)."""
from __future__ import annotations

import os
import re
from typing import Any, Optional

import torch
from torch import nn

from ..runtime.base_model import load_base_model

TINY = "tiny"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def byte_tokenizer() -> Any:
    """A byte-level tokenizer built in memory (no files, no hub): 256 byte tokens + bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(vocab_size: int = 259) -> Any:
    """A 4-layer Llama sized for the byte tokenizer (ids 256-258: bos, eos, pad)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True, bos_token_id=256, eos_token_id=257, pad_token_id=258)


# owner/name, as the hub spells repository ids; a path that exists locally always wins
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# weights in other formats than the one transformers loads, skipped when the repository has safetensors
NOT_NEEDED_WITH_SAFETENSORS = ["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot", "original/*"]
# What a tokenizer (slow, fast, tiktoken, remote code) and the model's config load from.
TOKENIZER_FILES = ["*.json", "*.model", "*.jinja", "*.txt", "*.tiktoken", "*.py", "*.vocab"]


def is_hub_id(model: Optional[str]) -> bool:
    """A Hugging Face model id (``org/name``) rather than a local folder, ``tiny`` or the default."""
    return model is not None and not os.path.exists(model) and bool(HUB_ID.match(model))


def hub_snapshot(repo_id: str, download: bool, tokenizer_only: bool = False) -> str:
    """The local folder of ``repo_id`` in huggingface_hub's cache, downloaded first when ``download``
    (and the hub is not switched off with HF_HUB_OFFLINE in the launch environment: huggingface_hub
    reads it when imported); FileNotFoundError in one line otherwise. ``tokenizer_only``: the
    tokenizer's and config files, no weights (``launch/prepare.py`` on a login node)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import constants as hub

    download = download and not hub.HF_HUB_OFFLINE
    ignore = None
    if download and not tokenizer_only:
        try:
            files = [s.rfilename for s in HfApi().model_info(repo_id).siblings or []]
            ignore = NOT_NEEDED_WITH_SAFETENSORS if any(f.endswith(".safetensors") for f in files) else None
        except Exception:  # noqa: BLE001 - no listing (no network, gated): snapshot_download decides, cache included
            pass
    allow = TOKENIZER_FILES if tokenizer_only else None
    try:
        if download:
            return snapshot_download(repo_id, ignore_patterns=ignore, allow_patterns=allow)
        if not tokenizer_only:  # the first rank skipped the other weight formats of a repo with safetensors
            try:                # (huggingface_hub refuses a cached snapshot with files missing, unless told)
                folder = snapshot_download(repo_id, local_files_only=True, ignore_patterns=NOT_NEEDED_WITH_SAFETENSORS)
                if any(f.endswith(".safetensors") for f in os.listdir(folder)):
                    return folder
            except Exception:  # noqa: BLE001 - a repo without safetensors: its whole snapshot, below
                pass
        return snapshot_download(repo_id, local_files_only=True, allow_patterns=allow)
    except Exception as err:  # noqa: BLE001 - the hub's errors (offline, unknown id, gated, HTTP) have no common base
        why = " ".join(str(err).split())[:300]
        where = ("it is not in the local Hugging Face cache and downloads are off (HF_HUB_OFFLINE=1, or a rank "
                 "other than each node's first)") if not download else "it could not be downloaded"
        gated = ("; a gated model: request access on its hub page and set HF_TOKEN on every node (or "
                 "huggingface-cli login)" if type(err).__name__ == "GatedRepoError" or " 401 " in f" {why} " else "")
        raise FileNotFoundError(f"model {repo_id!r} is not a local folder and {where}: {type(err).__name__}: {why}"
                                f"{gated}. Pass a local Hugging Face folder, or download it first "
                                f"(huggingface-cli download {repo_id})") from None


def resolve_model_path(model: Optional[str], download: bool = True, tokenizer_only: bool = False) -> str:
    """``None``: the embedded default, converted once per machine (the cache build is locked,
    so local ranks wait for one build). A hub id: its snapshot in huggingface_hub's cache
    (``download``: fetched first; each node's first rank downloads, the others then read the
    cache; ``tokenizer_only``: without its weights). Otherwise the given folder or ``tiny``."""
    if is_hub_id(model):
        return hub_snapshot(model, download, tokenizer_only)
    if model is not None:
        return model
    from .assets import default_model_dir

    return default_model_dir()


def check_model_folder(path: str) -> None:
    """A clear error before transformers' own, for the common mistakes."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} not found (pass a local Hugging Face folder, a hub id "
                                f"org/name, 'tiny', or nothing for the embedded default)")
    files = os.listdir(path)
    if "config.json" not in files:
        raise FileNotFoundError(f"model folder {path!r} has no config.json")
    if not any(f.endswith((".safetensors", ".bin")) or f.endswith(".index.json") for f in files):
        raise FileNotFoundError(f"model folder {path!r} has no weights (*.safetensors or *.bin)")


# attn_implementation -> (transformers' availability check, the pip distribution that provides it)
FLASH_ATTENTION = {"flash_attention_2": ("is_flash_attn_2_available", "flash-attn"),
                   "flash_attention_3": ("is_flash_attn_3_available", "flash-attn-3")}


def check_attention(attn_implementation: str, dtype: str) -> None:
    """Flash attention's needs, before the model loads: transformers finds a missing kernel only
    then, and an fp32 model only at the first forward (after a 70B load)."""
    import transformers.utils

    if attn_implementation not in FLASH_ATTENTION:
        return
    check, distribution = FLASH_ATTENTION[attn_implementation]
    if dtype == "fp32":
        raise ValueError(f"attn_implementation {attn_implementation} runs in bf16 or fp16, not dtype fp32")
    if not torch.cuda.is_available():
        raise ValueError(f"attn_implementation {attn_implementation} needs CUDA GPUs; use sdpa")
    if not getattr(transformers.utils, check)():
        raise ValueError(f"attn_implementation {attn_implementation} needs a version of the {distribution} package "
                         f"that transformers supports on every node (pip install {distribution}), or use sdpa")


def load_tokenizer(model: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a resolved model path (or ``tiny``) with a pad token, without the weights:
    the data is prepared with it before the model loads."""
    from .data import ensure_pad_token

    if model == TINY:
        tokenizer = byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    ensure_pad_token(tokenizer)
    return tokenizer


def load_model(model: str, tokenizer: Any, ds_config: dict, dtype: str, *, seed: int,
               trust_remote_code: bool = False, attn_implementation: str = "sdpa") -> tuple[nn.Module, Optional[Any]]:
    """``(model, keep_alive)``: a frozen causal LM (partitioned under ZeRO-3; hold ``keep_alive``
    for the run) that ``tokenizer`` belongs to. A folder is expected to have passed
    ``check_model_folder``."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    torch_dtype = DTYPES[dtype]
    if model == TINY:
        keep_alive = HfDeepSpeedConfig(ds_config) if ds_config.get("zero_optimization", {}).get("stage") == 3 else None
        torch.manual_seed(seed)  # every rank builds the same weights
        base = AutoModelForCausalLM.from_config(tiny_config(len(byte_tokenizer())), dtype=torch_dtype,
                                                attn_implementation=attn_implementation)
        base.requires_grad_(False)
    else:
        base, keep_alive = load_base_model(model, ds_config, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                           attn_implementation=attn_implementation)
    check_vocabulary(base, tokenizer, model)
    return base, keep_alive


def check_vocabulary(model: nn.Module, tokenizer: Any, source: str) -> None:
    """A tokenizer with ids the embedding table does not have would index out of range mid-run."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"the tokenizer of {source!r} has {len(tokenizer)} tokens but the model's embedding table "
                         f"has {rows} rows: they do not belong together")


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant recomputation: exact with shared adapter tensors (deepspeed-notes E3)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False

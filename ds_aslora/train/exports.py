"""What the job leaves for serving: every exported adapter with its tokenizer and the chat template
it was trained with, the best checkpoint's adapter in ``adapter/best/``, and the vLLM command.

A model trained on chat rows through the fallback chat template (its tokenizer had none) must be
prompted the same way at inference: the template is saved in the adapter's tokenizer files, so
``AutoTokenizer.from_pretrained(adapter_dir).apply_chat_template`` renders what training saw.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from typing import Any, Optional

from ..export.merged import write_peft
from .render import standalone_fallback_template

# vLLM's --max-lora-rank accepts these values only (vllm.config.lora.MaxLoRARanks); its default is 16.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
BEST = "best"


def serving_tokenizer(tokenizer: Any, fmt: str) -> Any:
    """The tokenizer as training used it: with the fallback chat template when chat rows were rendered
    through it (the caller's tokenizer is left as it is)."""
    if fmt != "chat" or tokenizer.chat_template:
        return tokenizer
    saved = copy.deepcopy(tokenizer)
    saved.chat_template = standalone_fallback_template(tokenizer)
    return saved


def save_tokenizer(tokenizer: Any, *folders: str) -> None:
    """Tokenizer files (and chat template) beside each adapter folder."""
    for folder in folders:
        tokenizer.save_pretrained(folder)


def export_best(checkpoint_adapter: str, base_config: Any, out_dir: str, tokenizer: Any,
                base_model_name_or_path: Optional[str]) -> None:
    """``out_dir/{compact,peft}`` from a checkpoint's compact adapter (rank 0). Built beside and then
    swapped in, so an interrupted export leaves the previous ``best`` whole."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{BEST}.", dir=parent)
    try:
        shutil.copytree(checkpoint_adapter, os.path.join(staging, "compact"))
        with tempfile.TemporaryDirectory() as config_dir:  # the base's shape, for the tie map's meta model
            base_config.save_pretrained(config_dir)
            write_peft(os.path.join(staging, "compact"), config_dir, os.path.join(staging, "peft"),
                       base_model_name_or_path=base_model_name_or_path)
        save_tokenizer(tokenizer, os.path.join(staging, "compact"), os.path.join(staging, "peft"))
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{BEST}.old.", dir=parent)
            os.replace(out_dir, os.path.join(old, BEST))
        os.replace(staging, out_dir)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def vllm_rank(r: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds rank ``r``."""
    fits = [rank for rank in VLLM_LORA_RANKS if rank >= r]
    if not fits:
        raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, this adapter has r={r}")
    return fits[0]


def vllm_command(base_model: str, peft_dir: str, r: int, name: str = "adapter") -> str:
    """The command that serves the peft export with vLLM's LoRA support."""
    return (f"vllm serve {base_model} --enable-lora --lora-modules {name}={peft_dir} "
            f"--max-lora-rank {vllm_rank(r)}")

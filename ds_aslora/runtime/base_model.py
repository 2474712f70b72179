"""Load the frozen base model so that a 13B-70B model never materialises on one host.

Under ZeRO-3 the model is built inside ``zero.Init`` by transformers itself; that happens
only while an ``HfDeepSpeedConfig`` object is alive (transformers keeps a weak reference,
deepspeed-notes §7), so the returned handle must be kept for the whole run.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn


def load_base_model(path: str, ds_config: dict, dtype: torch.dtype = torch.bfloat16,
                    trust_remote_code: bool = False, attn_implementation: str = "sdpa"
                    ) -> tuple[nn.Module, Optional[Any]]:
    """``(model, keep_alive)``: a frozen causal LM, partitioned at construction under
    ZeRO-3 (``keep_alive`` is the HfDeepSpeedConfig to hold), whole otherwise (None)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} not found (no hub access at run time: "
                                f"pass a local folder with config.json and weights)")
    keep_alive = None
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        keep_alive = HfDeepSpeedConfig(ds_config)
    # no device_map: ZeRO places it; code shipped with a checkpoint runs only when the user says so
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 attn_implementation=attn_implementation)
    model.requires_grad_(False)
    return model, keep_alive

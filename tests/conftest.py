"""Tiny decoder models built from configs on CPU: no hub, no downloads."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU DeepSpeed with gloo, no GPU needed
# This process computes the single-process references on tiny models, like every rank and job the tests start
# (OMP_NUM_THREADS=1), with one thread: a second one speeds nothing up at these sizes, and where the cores are
# busy two OpenMP threads per small matmul stall each other (a 0.1 s reference took 15 s on 2 loaded cores).
torch.set_num_threads(1)

from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**SMALL, **overrides}))
    return model.eval()


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: torch.nn.Module, seed: int = 3) -> None:
    """Give every trainable adapter tensor (B included) non-zero values, so tests see them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture
def llama():
    return tiny_model("llama")


def adam_atol(lr: float, steps: int) -> float:
    """Tolerance for adapter weights after ``steps`` Adam-type steps of learning rate ``lr``
    computed two exact ways (other ranks, stages, reduction orders) in fp32.

    Adam normalises each gradient, so one step moves an element by about ``lr`` whatever the
    gradient's size; float32 rounding (~1e-7 relative) in the gradients, amplified by that
    normalisation where a gradient is tiny, perturbs the moves by far less than 1e-3 of them.
    A real defect (a missed or doubled step, a wrong scale, a wrong merge) moves elements by
    O(lr). So 1e-3 of the largest total movement separates the two on any machine."""
    return 1e-3 * lr * steps


# fp32 mean cross-entropy over a few hundred logits: rounding of ~1e-7 per operation.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A saved tiny base model + tokenizer, and train/eval jsonl files of Shakespeare."""
    from transformers import LlamaForCausalLM

    from ds_aslora.train.assets import shakespeare_paths, text_rows
    from ds_aslora.train.model_setup import byte_tokenizer, tiny_config

    root = tmp_path_factory.mktemp("job")
    base = str(root / "base")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(base)
    byte_tokenizer().save_pretrained(base)
    train_txt, heldout_txt = shakespeare_paths()
    for name, path, chars in (("train", train_txt, 12000), ("eval", heldout_txt, 3000)):
        with open(path) as f:
            rows = text_rows(f.read()[:chars], chars_per_row=30)  # a line or two: ~30-60 tokens, packed 1-2 a block
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": row}) + "\n" for row in rows)
    return {"base": base, "train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "root": root}


def logits_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One forward and backward with the ids as labels: the logits and every trainable gradient."""
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

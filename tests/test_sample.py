"""The end-of-run sample: its prompt rendered as the data's format renders a prompt (the training
rows' own prefix), and the KV-cached greedy generation equal to a greedy loop without cache."""
import pytest
import torch
from conftest import tiny_model
from test_render import TOKENIZERS

from ds_aslora import AdapterConfig, inject_adapters
from ds_aslora.train.loop import SAMPLE_REPETITION_PENALTY, generate
from ds_aslora.train.model_setup import byte_tokenizer
from ds_aslora.train.render import Renderer

ROWS = {"text": {"text": "to be or not"}, "alpaca": {"instruction": "to be or not", "output": "that"},
        "prompt_completion": {"prompt": "to be or not", "completion": "that"},
        "chat": {"messages": [{"role": "user", "content": "to be or not"}, {"role": "assistant", "content": "that"}]}}


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("name", ["words, ChatML", "bytes, fallback template"])
def test_the_sample_prompt_is_what_a_training_row_puts_before_its_response(fmt, name):
    renderer = Renderer(TOKENIZERS[name](), fmt, train_on_prompt=False)
    ids, mask = renderer(ROWS[fmt], 0)
    prompt = renderer.prompt("to be or not")
    if fmt == "text":
        assert ids[:len(prompt)] == prompt and len(ids) == len(prompt) + 1  # + EOS
    else:
        assert prompt == ids[:mask.index(True)]  # everything up to the first trained token


class FakeEngine:
    """What generate() uses of a DeepSpeed engine (ZeRO-2, one rank)."""

    def __init__(self, module):
        self.module, self.device = module, torch.device("cpu")

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()

    def zero_optimization_stage(self):
        return 2


def test_cached_greedy_generation_equals_the_uncached_loop():
    """Greedy with CTRL's repetition penalty: a seen token's logit divided by it (multiplied when negative)."""
    tok = byte_tokenizer()
    model = inject_adapters(tiny_model(vocab_size=259), AdapterConfig(method="aslora", target_modules=["q_proj"]))
    prompt = Renderer(tok, "text", train_on_prompt=False).prompt("ROMEO:\n")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(20):
            logits = model(ids, use_cache=False).logits[0, -1]
            seen = ids[0].unique()
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / SAMPLE_REPETITION_PENALTY,
                                       logits[seen] * SAMPLE_REPETITION_PENALTY)
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
            if int(ids[0, -1]) == tok.eos_token_id:
                break
    assert generate(FakeEngine(model), tok, prompt, max_new_tokens=20) == tok.decode(ids[0], skip_special_tokens=True)

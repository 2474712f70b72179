"""Rendering rows into token ids and a trainable mask: text, alpaca, prompt/completion and chat.

Chat is rendered with the tokenizer's chat template (``FALLBACK_CHAT_TEMPLATE`` when it has none);
the loss is on the assistant turns, the template's end-of-turn text included. Each conversation is
rendered once and encoded once; its replies are located through the offset mapping (see
``Renderer._chat``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n")
# For tokenizers without a chat template: role headers, EOS after each assistant reply.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|assistant|>\\n' }}{% endif %}")


def standalone_fallback_template(tokenizer: Any) -> str:
    """``FALLBACK_CHAT_TEMPLATE`` as saved with an adapter: training puts the tokenizer's default prefix
    (BOS for Llama) before the rendered text, which ``apply_chat_template`` does not, so the saved
    template writes it itself and renders exactly the ids training saw."""
    prefix = _default_prefix(tokenizer)
    if prefix and prefix == [tokenizer.bos_token_id]:
        return "{{ bos_token }}" + FALLBACK_CHAT_TEMPLATE
    return FALLBACK_CHAT_TEMPLATE


def _messages(row: Mapping[str, Any], index: int) -> list[dict[str, str]]:
    """OpenAI ``messages`` or ShareGPT ``conversations`` as [{role, content}]."""
    if row.get("messages") is not None:
        turns, role_key, content_key, roles = row["messages"], "role", "content", None
    else:
        turns, role_key, content_key, roles = row.get("conversations"), "from", "value", SHAREGPT_ROLES
    out = []
    for turn in turns or []:
        if not isinstance(turn, Mapping):
            raise ValueError(f"row {index}: each turn must be an object with {role_key!r} and {content_key!r}, "
                             f"got {type(turn).__name__} {turn!r:.40}")
        role, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(role, str):
            raise ValueError(f"row {index}: a turn without a {role_key!r} (got {role!r})")
        if roles is not None:
            if role not in roles:
                raise ValueError(f"row {index}: unknown ShareGPT role {role!r} (known: {list(roles)})")
            role = roles[role]
        if content is not None and not isinstance(content, str):
            raise ValueError(f"row {index}: message content must be text, got {type(content).__name__}")
        out.append({"role": role, "content": content or ""})
    return out


def _default_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before a text by default (BOS for Llama, nothing for Qwen)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Renderer:
    """Rows -> (input_ids, trainable mask), for one tokenizer and format (bench/quality.py renders its
    test prompts with it, so scoring sees exactly what training saw). Rows are encoded in batches:
    a fast tokenizer encodes a batch in one call, in parallel."""

    def __init__(self, tokenizer: Any, fmt: str, train_on_prompt: bool):
        self.tok, self.fmt, self.train_on_prompt = tokenizer, fmt, train_on_prompt
        self.eos = tokenizer.eos_token_id
        if self.eos is None and not (fmt == "chat" and tokenizer.chat_template):
            raise ValueError("the tokenizer has no eos token to end responses with")
        self.prefix = _default_prefix(tokenizer)
        self.template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
        self.offsets = bool(getattr(tokenizer, "is_fast", False))  # offset mappings locate chat turns
        self._render: Optional[Callable[..., str]] = None  # built on first use, in each worker process

    def __getstate__(self) -> dict:  # to worker processes: the compiled template does not pickle
        return {**self.__dict__, "_render": None}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []

    def __call__(self, row: Mapping[str, Any], index: int) -> tuple[list[int], list[bool]]:
        return self.batch([row], [index])[0]

    def batch(self, rows: Sequence[Mapping[str, Any]], indices: Sequence[int]) -> list[tuple[list[int], list[bool]]]:
        if self.fmt == "text":
            return [(ids, [True] * len(ids)) for ids in
                    (self.prefix + body + [self.eos] for body in self.encode_batch([r["text"] or "" for r in rows]))]
        if self.fmt == "alpaca":
            prompts = []
            for row in rows:
                fields = {k: row.get(k) or "" for k in ("instruction", "input")}
                prompts.append((ALPACA_PROMPT_WITH_INPUT if fields["input"] else ALPACA_PROMPT).format(**fields))
            return self._prompt_completion(prompts, [row["output"] or "" for row in rows])
        if self.fmt == "prompt_completion":
            return self._prompt_completion([row["prompt"] or "" for row in rows],
                                           [row["completion"] or "" for row in rows])
        return self._chat([_messages(row, index) for row, index in zip(rows, indices, strict=True)], indices)

    def prompt(self, text: str) -> list[int]:
        """``text`` as this format renders a prompt, up to where the response starts (a sample's input)."""
        if self.fmt == "chat":
            prefix = self.prefix if self.template is FALLBACK_CHAT_TEMPLATE else []
            return prefix + self.encode(self.render([{"role": "user", "content": text}], generation_prompt=True))
        if self.fmt == "alpaca":
            text = ALPACA_PROMPT.format(instruction=text, input="")
        return self.prefix + self.encode(text)

    def _prompt_completion(self, prompts: list[str], completions: list[str]) -> list[tuple[list[int], list[bool]]]:
        """The prompt, then the completion and EOS: the loss on the completion (and EOS)."""
        out = []
        for prompt, response in zip(self.encode_batch(prompts), self.encode_batch(completions), strict=True):
            prompt_ids, response = self.prefix + prompt, response + [self.eos]
            out.append((prompt_ids + response, [self.train_on_prompt] * len(prompt_ids) + [True] * len(response)))
        return out

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=generation_prompt)

    def _fast_render(self) -> Callable[[list[dict[str, str]], bool], str]:
        """``render`` without ``apply_chat_template``'s per-call overhead (message normalisation,
        argument checks: more than the template itself on short turns): the compiled template
        called as transformers calls it, on our plain {role, content} dicts. Used only when it
        renders a probe conversation exactly as ``render`` does; otherwise ``render`` itself."""
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.template)
            kwargs = dict(self.tok.special_tokens_map)

            def fast(messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
                return compiled.render(messages=messages, tools=None, documents=None,
                                       add_generation_prompt=generation_prompt, **kwargs)

            probe = [{"role": "user", "content": " a b "}, {"role": "assistant", "content": "c\n"},
                     {"role": "user", "content": "d"}]
            if all(fast(probe[:k], g) == self.render(probe[:k], g) for k, g in ((1, True), (2, False), (3, True))):
                return fast
        except Exception:  # another transformers, or a template that refuses the probe: the public path
            pass
        return self.render

    def _spans(self, messages: list[dict[str, str]], index: int) -> tuple[str, list[tuple[str, str]]]:
        """The whole conversation rendered once, and per assistant reply the renderings that
        bound it: the conversation up to turn i with the generation prompt is where reply i
        starts; up to and including turn i is where it ends (the template's end-of-turn
        included). Rendering is text only: nothing here is encoded."""
        if self._render is None:
            self._render = self._fast_render()
        render = self._render
        full = render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or self.train_on_prompt:
                continue
            start_text = render(messages[:i], True) if i else ""
            end_text = render(messages[:i + 1])
            if not (end_text.startswith(start_text) and full.startswith(end_text)):
                raise ValueError(
                    f"row {index}: the chat template does not render turn by turn (the conversation up to turn "
                    f"{i} is not a prefix of the whole one), so assistant tokens cannot be located; "
                    "use a template without history-dependent rendering or set train_on_prompt")
            spans.append((start_text, end_text))
        return full, spans

    def _chat(self, conversations: list[list[dict[str, str]]],
              indices: Sequence[int]) -> list[tuple[list[int], list[bool]]]:
        """One render and one encode per conversation: each reply's token span comes from the
        offset mapping of the whole conversation's tokens. A boundary that falls inside a token
        (or a tokenizer without offsets) is found as before, by encoding the text up to it: the
        common prefix of its tokens with the conversation's, so a token that straddles a
        boundary is never split. A conversation that ends with a reply ends with EOS (added if
        the template does not put it there)."""
        rendered = [self._spans(messages, index) for messages, index in zip(conversations, indices, strict=True)]
        prefix = self.prefix if self.template is FALLBACK_CHAT_TEMPLATE else []
        fulls = [full for full, _ in rendered]
        if self.offsets and fulls:
            encoded = self.tok(fulls, add_special_tokens=False, return_offsets_mapping=True)
            all_ids, all_offsets = encoded["input_ids"], encoded["offset_mapping"]
        else:
            all_ids, all_offsets = [self.encode(full) for full in fulls], [None] * len(fulls)
        out = []
        for messages, (full, spans), body, offsets in zip(conversations, rendered, all_ids, all_offsets, strict=True):
            if not messages:
                out.append(([], []))
                continue
            ids = prefix + list(body)
            mask = [self.train_on_prompt] * len(ids)
            bounds = _Boundaries(body, offsets, self.encode)
            for start_text, end_text in spans:
                start, end = len(prefix) + bounds.token(start_text), len(prefix) + bounds.token(end_text)
                mask[start:end] = [True] * (end - start)
            if (messages[-1]["role"] == "assistant" and self.eos is not None
                    and not full.rstrip().endswith(self.tok.eos_token)):
                ids, mask = ids + [self.eos], mask + [True]
            out.append((ids, mask))
        return out


class _Boundaries:
    """Token index of a text boundary in one encoded conversation: how many of its leading tokens
    the text up to the boundary holds."""

    def __init__(self, ids: Sequence[int], offsets: Optional[Sequence[tuple[int, int]]], encode: Any):
        self.ids, self.encode = ids, encode
        if offsets is not None:
            self.starts = np.fromiter((s for s, _ in offsets), np.int64, len(offsets))
            self.ends = np.fromiter((e for _, e in offsets), np.int64, len(offsets))
        else:
            self.starts = self.ends = None

    def token(self, prefix_text: str) -> int:
        char = len(prefix_text)
        if char == 0:
            return 0
        if self.ends is not None:
            k = int(np.searchsorted(self.ends, char, side="right"))  # tokens ending at or before the boundary
            clean = (bool((self.ends[:k] <= char).all()) and bool((self.starts[k:] >= char).all())
                     and (k == 0 or self.ends[k - 1] == char or k == len(self.ids) or self.starts[k] == char))
            if clean:
                return k
        return _common_prefix(self.encode(prefix_text), self.ids)

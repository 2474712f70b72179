"""Data: loading local files, format detection, label masks (hand-checked), truncation, caching,
packing, and the deterministic global batches with their token counts. Tokenizers are built
here (a word-level fast one, sentencepiece ones trained on a few KB): no hub."""
import hashlib
import io
import json
import os
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import sentencepiece as spm
import tokenizers
import torch
from tokenizers import models, pre_tokenizers, processors
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast
from transformers.models.bert_generation import BertGenerationTokenizer

from ds_aslora.train import data as D
from ds_aslora.train.batches import EvalBatches, GlobalBatches, collate
from ds_aslora.train.data import (
    IGNORE_INDEX,
    content_digest,
    detect_format,
    ensure_pad_token,
    load_data,
    prepare_data,
    tokenize,
    tokenizer_fingerprint,
)
from ds_aslora.train.render import Renderer
from ds_aslora.train.run_config import DataConfig

datasets.disable_progress_bars()
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "data")
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = ("system user assistant be brief hi hello there bye ok name the animal dog what runs fox it barks in "
         "forest say <| |> quick brown jumps over lazy a short line sleeps and away into old").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
X = IGNORE_INDEX


def asset(name):
    return os.path.join(ASSETS, name)


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """load_dataset's default cache in the test's folder, not the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_default"))


def word_tokenizer(chat_template=None, eos="</s>"):
    """Fast tokenizer, one token per word (hand-checkable), BOS added, no pad token."""
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    model = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    model.add_special_tokens(SPECIAL)
    tok = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token=eos, unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


def ids(tok, words):
    return tok.convert_tokens_to_ids(words.split())


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A sentencepiece BPE model with byte fallback, as Llama's, trained on corpus.txt."""
    folder = tmp_path_factory.mktemp("sp")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(input=asset("corpus.txt"), model_writer=buffer, vocab_size=320, model_type="bpe",
                                   byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    return folder


@pytest.fixture(scope="module", params=["llama", "sentencepiece"])
def sp_tokenizer(request, sp_model):
    """Llama's tokenizer converted from tokenizer.model, and a pure-sentencepiece (python) one."""
    if request.param == "llama":
        return LlamaTokenizer.from_pretrained(str(sp_model), add_bos_token=True), True
    return BertGenerationTokenizer(vocab_file=str(sp_model / "tokenizer.model")), False  # adds no BOS


def trained(row):
    return [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != X]


# ---------------------------------------------------------------------------------------- loading

@pytest.mark.parametrize("name, fmt", [("text.jsonl", "text"), ("alpaca.jsonl", "alpaca"), ("alpaca.csv", "alpaca"),
                                       ("chat_openai.jsonl", "chat"), ("chat_sharegpt.json", "chat")])
def test_local_files_load_and_formats_are_detected(name, fmt, tmp_path):
    dataset = load_data(asset(name), cache_dir=str(tmp_path))
    assert len(dataset) in (3, 4) and detect_format(dataset.column_names) == fmt


def test_parquet_and_save_to_disk_folders_load(tmp_path):
    rows = load_data(asset("alpaca.jsonl"), cache_dir=str(tmp_path / "hf"))
    rows.to_parquet(str(tmp_path / "a.parquet"))
    rows.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": rows, "test": rows.select([0])}).save_to_disk(str(tmp_path / "dict"))
    for path in ("a.parquet", "saved", "dict"):
        assert load_data(str(tmp_path / path), cache_dir=str(tmp_path / "hf"))["output"][:] == rows["output"][:]


def test_missing_malformed_and_unknown_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_data(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match=r"malformed.jsonl, line 3: malformed JSON \(Expecting ',' delimiter"):
        load_data(asset("malformed.jsonl"))
    lines = open(asset("malformed.jsonl")).read()
    (tmp_path / "lines.json").write_text(lines)  # JSON lines under a .json name: datasets fails, we name the line
    with pytest.raises(ValueError, match="lines.json, line 3: malformed JSON"):
        load_data(str(tmp_path / "lines.json"), cache_dir=str(tmp_path / "hf"))
    (tmp_path / "array.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="array.jsonl, line 2: expected a JSON object, got list"):
        load_data(str(tmp_path / "array.jsonl"))
    (tmp_path / "rows.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        load_data(str(tmp_path / "rows.txt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a datasets save_to_disk folder"):
        load_data(str(tmp_path / "folder"))


def test_unknown_columns_list_what_was_found_and_what_is_accepted(tmp_path):
    dataset = load_data(asset("unknown_columns.jsonl"), cache_dir=str(tmp_path))
    with pytest.raises(ValueError) as err:
        detect_format(dataset.column_names, source="unknown_columns.jsonl")
    assert str(err.value) == (
        "unknown_columns.jsonl: no known columns, found ['answer', 'question']; accepted: chat: messages or "
        "conversations; alpaca: instruction+output; prompt_completion: prompt+completion; text: text (alpaca: input "
        "optional)")
    with pytest.raises(ValueError, match=r"format 'chat' needs columns messages or conversations; found \['text'\]"):
        detect_format(["text"], "chat", "x")
    assert detect_format(["text", "messages"]) == "chat"  # precedence: chat, alpaca, text
    assert detect_format(["text", "messages"], "text") == "text"  # forced


# ---------------------------------------------------------------------------------------- labels

def test_text_rows_train_on_every_token_but_the_first_and_end_with_eos():
    tok = word_tokenizer()
    out, stats = tokenize(datasets.Dataset.from_list([{"text": "hello there"}]), tok, "auto", 16)
    assert out[0]["input_ids"] == ids(tok, "<s> hello there </s>")
    assert out[0]["labels"] == [X] + ids(tok, "hello there </s>")
    assert (out[0]["n_targets"], stats.target_tokens) == (3, 3)


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_alpaca_labels_cover_the_output_and_eos_only(train_on_prompt):
    tok = word_tokenizer()
    rows = datasets.Dataset.from_list([{"instruction": "say hello", "input": "", "output": "hello there"}])
    out, _ = tokenize(rows, tok, "alpaca", 64, train_on_prompt)
    row = out[0]
    # BOS + 26 prompt tokens (counted by hand: "Below is an instruction ... ### Response :"), then the output.
    assert len(row["input_ids"]) == 30 and row["input_ids"][0] == tok.bos_token_id
    assert row["input_ids"][-3:] == ids(tok, "hello there </s>")
    if train_on_prompt:
        assert row["labels"] == [X] + row["input_ids"][1:] and row["n_targets"] == 29
    else:
        assert row["labels"] == [X] * 27 + ids(tok, "hello there </s>") and row["n_targets"] == 3


def test_alpaca_input_selects_the_prompt_with_an_input_section():
    tok = word_tokenizer()
    rows = datasets.Dataset.from_list([{"instruction": "name the animal", "input": "it barks", "output": "the dog"}])
    out, _ = tokenize(rows, tok, "alpaca", 128)
    row = out[0]
    # BOS + 41 prompt tokens, counted by hand: "Below ... context ." 18, "Write ... request ." 9,
    # "### Instruction : name the animal" 6, "### Input : it barks" 5, "### Response :" 3.
    assert len(row["input_ids"]) == 45 and row["labels"] == [X] * 42 + ids(tok, "the dog </s>")
    assert row["input_ids"][31:34] == ids(tok, "name the animal") and row["input_ids"][37:39] == ids(tok, "it barks")


@pytest.mark.parametrize("eos, appended", [("<|im_end|>", ""), ("</s>", " </s>")])
def test_chat_template_masks_everything_but_assistant_turns(eos, appended):
    """ChatML: the assistant turns with their <|im_end|> are targets; system, user and the assistant
    header are not. EOS is added at the end only when the template's replies do not contain it."""
    tok = word_tokenizer(CHATML, eos=eos)
    out, _ = tokenize(load_data(asset("chat_openai.jsonl")), tok, "auto", 64)
    row = out[0]
    prompt1 = "<|im_start|> system be brief <|im_end|> <|im_start|> user hi <|im_end|> <|im_start|> assistant"
    reply1 = "hello there <|im_end|>"
    prompt2 = "<|im_start|> user bye <|im_end|> <|im_start|> assistant"
    reply2 = "ok <|im_end|>" + appended
    assert row["input_ids"] == ids(tok, " ".join([prompt1, reply1, prompt2, reply2]))
    n1, n2 = len(prompt1.split()), len(prompt2.split())
    assert row["labels"] == ([X] * n1 + ids(tok, reply1) + [X] * n2 + ids(tok, reply2))
    assert row["n_targets"] == len((reply1 + " " + reply2).split())


def test_sharegpt_conversations_equal_openai_messages():
    tok = word_tokenizer(CHATML)
    openai, _ = tokenize(load_data(asset("chat_openai.jsonl")), tok, "auto", 64)
    sharegpt, _ = tokenize(load_data(asset("chat_sharegpt.json")), tok, "auto", 64)
    assert openai[:] == sharegpt[:]
    bad = datasets.Dataset.from_list([{"conversations": [{"from": "tool", "value": "x"}]}])
    with pytest.raises(ValueError, match=r"^data: row 0: unknown ShareGPT role 'tool'"):
        tokenize(bad, tok, "auto", 64)
    no_role = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "x"}, {"content": "y"}]}])
    with pytest.raises(ValueError, match=r"^data: row 0: a turn without a 'role' \(got None\)"):
        tokenize(no_role, tok, "auto", 64)
    strings = datasets.Dataset.from_list([{"messages": ["hello", "hi"]}])
    with pytest.raises(ValueError, match=r"^data: row 0: each turn must be an object with 'role' and 'content', got"):
        tokenize(strings, tok, "chat", 64)


def test_fallback_template_without_chat_template():
    tok = word_tokenizer()  # no chat_template: role headers, EOS after each reply, the tokenizer's BOS first
    rows = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "name the animal"},
                                                     {"role": "assistant", "content": "the dog"}]}])
    out, _ = tokenize(rows, tok, "chat", 64)
    assert out[0]["input_ids"] == ids(tok, "<s> <| user |> name the animal <| assistant |> the dog </s>")
    assert out[0]["labels"] == [X] * 10 + ids(tok, "the dog </s>")


def test_history_dependent_template_is_refused():
    template = "{{ messages | length }}" + CHATML  # the rendering of turn 1 changes when turn 2 is added
    rows = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "ok"}]}])
    with pytest.raises(ValueError, match="^data: row 0: the chat template does not render turn by turn"):
        tokenize(rows, word_tokenizer(template), "chat", 64)
    out, _ = tokenize(rows, word_tokenizer(template), "chat", 64, train_on_prompt=True)  # no spans needed
    assert out[0]["n_targets"] == len(out[0]["input_ids"]) - 1


def test_sentencepiece_tokenizers_mask_prompts(sp_tokenizer):
    """Both a Llama tokenizer converted from tokenizer.model and a pure-sentencepiece one: the trained
    tokens are exactly the response and EOS (alpaca), the assistant replies (chat, fallback template)."""
    sp_tokenizer, adds_bos = sp_tokenizer
    eos = sp_tokenizer.eos_token_id
    rows = datasets.Dataset.from_list([{"instruction": "say hello", "input": "", "output": "the fox runs"}])
    out, _ = tokenize(rows, sp_tokenizer, "alpaca", 512)
    assert trained(out[0]) == sp_tokenizer.encode("the fox runs", add_special_tokens=False) + [eos]
    assert (out[0]["input_ids"][0] == sp_tokenizer.bos_token_id) == adds_bos  # BOS exactly when the tokenizer adds it
    chat, _ = tokenize(load_data(asset("chat_openai.jsonl")), sp_tokenizer, "chat", 512)
    replies = sp_tokenizer.decode(trained(chat[0]))
    assert replies.replace(" ", "") == "hellothere</s>ok</s>"
    assert chat[0]["labels"][-1] == eos and chat[0]["n_targets"] == len(trained(chat[0]))


def test_ensure_pad_token():
    tok = word_tokenizer()
    assert tok.pad_token is None
    assert ensure_pad_token(tok) == tok.eos_token_id and tok.pad_token == "</s>"
    no_eos = word_tokenizer()
    no_eos.eos_token = None
    assert ensure_pad_token(no_eos) == no_eos.unk_token_id
    none = word_tokenizer()
    none.eos_token, none.unk_token = None, None
    with pytest.raises(ValueError, match="no pad, eos or unk token"):
        ensure_pad_token(none)


# ---------------------------------------------------------------------------------------- length, cache, pack

def test_truncation_counts_and_refusal_names_count_and_longest():
    tok = word_tokenizer()
    rows = load_data(asset("text.jsonl"))  # 11, 5, 14 and 4 tokens with BOS and EOS
    out, stats = tokenize(rows, tok, "text", 6)
    assert [len(r) for r in out["input_ids"][:]] == [6, 5, 6, 4]
    assert (stats.rows, stats.kept, stats.truncated, stats.longest) == (4, 4, 2, 14)
    with pytest.raises(ValueError) as err:
        tokenize(rows, tok, "text", 6, truncation="refuse", source="text.jsonl")
    assert str(err.value) == ("2 of 4 sequences in text.jsonl are longer than max_seq_length=6 (longest: 14 tokens); "
                              "raise max_seq_length or set truncation=truncate")


def test_rows_without_targets_are_dropped_and_none_left_is_an_error():
    tok = word_tokenizer(CHATML)
    no_reply = {"messages": [{"role": "user", "content": "hi"}]}
    reply = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    out, stats = tokenize(datasets.Dataset.from_list([no_reply, reply]), tok, "chat", 64)
    assert len(out) == 1 and (stats.rows, stats.kept) == (2, 1) and trained(out[0]) == ids(tok, "ok <|im_end|> </s>")
    with pytest.raises(ValueError, match="data: no row has a token to train on"):
        tokenize(datasets.Dataset.from_list([no_reply]), tok, "chat", 64)
    long_prompt = {"instruction": "hi " * 50, "input": "", "output": "ok"}  # the output falls past the limit
    with pytest.raises(ValueError, match="no row has a token to train on"):
        tokenize(datasets.Dataset.from_list([long_prompt]), tok, "alpaca", 32)


def test_a_second_tokenize_reads_the_cache(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    calls = []
    real = Renderer.batch
    monkeypatch.setattr(Renderer, "batch", lambda self, rows, idx: calls.extend(idx) or real(self, rows, idx))
    first, _ = tokenize(load_data(asset("alpaca.jsonl"), cache), word_tokenizer(), "auto", 64, cache_dir=cache)
    assert len(calls) == 3
    # A restart: the file loaded again, a new tokenizer object built the same way.
    again, stats = tokenize(load_data(asset("alpaca.jsonl"), cache), word_tokenizer(), "auto", 64, cache_dir=cache)
    assert len(calls) == 3 and again[:] == first[:] and stats.kept == 3
    assert again.cache_files == first.cache_files and again.cache_files[0]["filename"].startswith(cache)
    tokenize(load_data(asset("alpaca.jsonl"), cache), word_tokenizer(), "auto", 64, True, cache_dir=cache)
    tokenize(load_data(asset("alpaca.jsonl"), cache), word_tokenizer(CHATML), "auto", 64, cache_dir=cache)
    assert len(calls) == 9  # another setting, another tokenizer: tokenised again


def test_workers_give_the_rows_one_process_gives(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "ROWS_PER_WORKER", 2)  # 8 rows: two processes really start
    rows = datasets.Dataset.from_list(load_data(asset("chat_openai.jsonl")).to_list() * 8)
    tok = word_tokenizer(CHATML)
    one, _ = tokenize(rows, tok, "chat", 64, num_proc=1)
    two, _ = tokenize(rows, tok, "chat", 64, num_proc=2, cache_dir=str(tmp_path))
    assert len(two.cache_files) == 2 and one[:] == two[:]


def test_prepare_data_split_eval_file_and_packing(tmp_path):
    tok = word_tokenizer()
    cache = str(tmp_path / "cache")
    config = DataConfig(data=asset("text.jsonl"), eval_fraction=0.25, max_seq_length=8)
    a = prepare_data(config, tok, seed=1, cache_dir=cache)
    b = prepare_data(config, tok, seed=1, cache_dir=cache)
    assert (len(a.train), len(a.eval), a.format) == (3, 1, "text") and a.eval[:] == b.eval[:]
    assert (a.from_cache, b.from_cache, a.cache) == (False, True, b.cache)
    assert a.stats["train"].truncated + a.stats["eval"].truncated == 2 and a.stats == b.stats
    separate = prepare_data(DataConfig(data=asset("alpaca.jsonl"), eval_data=asset("alpaca.csv")), tok, seed=1,
                            cache_dir=cache)
    assert separate.eval["input_ids"][:] == separate.train["input_ids"][:]  # the same rows as CSV
    packed = prepare_data(DataConfig(data=asset("text.jsonl"), packing=True, max_seq_length=8), tok, seed=1,
                          cache_dir=cache)
    # 11, 5, 14 and 4 tokens: two cut to 8 (truncation), then whole samples in blocks of 8: 8 | 8 | 5 | 4
    assert sorted(packed.train["sample_lengths"][:]) == [[4], [5], [8], [8]]
    assert packed.stats["train"].truncated == 2
    with pytest.raises(ValueError, match="no training data"):
        prepare_data(DataConfig(), tok, seed=1, cache_dir=None)


def test_the_prepared_cache_key_sees_every_option_and_the_file(tmp_path):
    tok = word_tokenizer()
    cache = str(tmp_path / "cache")
    data = tmp_path / "text.jsonl"
    data.write_text(open(asset("text.jsonl")).read())
    base = DataConfig(data=str(data), max_seq_length=8)
    first = prepare_data(base, tok, seed=1, cache_dir=cache)
    workers = DataConfig(data=str(data), max_seq_length=8, preprocessing_num_workers=3)
    assert prepare_data(workers, tok, seed=1, cache_dir=cache).from_cache  # the workers change nothing
    for other in (DataConfig(data=str(data), max_seq_length=9), DataConfig(data=str(data), max_seq_length=8,
                                                                           packing=True)):
        assert not prepare_data(other, tok, seed=1, cache_dir=cache).from_cache
    assert not prepare_data(base, word_tokenizer(CHATML), seed=1, cache_dir=cache).from_cache
    data.write_text(open(asset("text.jsonl")).read() + '{"text": "a short line"}\n')  # new content
    again = prepare_data(base, tok, seed=1, cache_dir=cache)
    assert not again.from_cache and len(again.train) == len(first.train) + 1


def test_the_cache_is_found_from_another_mount_and_tokenizer_folder_and_a_miss_names_what_differs(tmp_path):
    # prepare.py on a login node reads /mnt/shared/... and a hub snapshot; the job reads /shared/... and
    # a copy of the tokenizer: the same files (size, mtime) and the same tokenizer are the same key.
    cache = str(tmp_path / "cache")
    for mount in ("login", "compute"):
        os.makedirs(tmp_path / mount / "data")
        shutil.copy2(asset("text.jsonl"), tmp_path / mount / "data" / "train.jsonl")  # keeps the mtime
        word_tokenizer(CHATML).save_pretrained(str(tmp_path / mount / "tokenizer"))
    def prepare(mount, **options):
        tok = AutoTokenizer.from_pretrained(str(tmp_path / mount / "tokenizer"))
        return prepare_data(DataConfig(data=str(tmp_path / mount / "data" / "train.jsonl"), **options), tok, seed=1,
                            cache_dir=cache)
    first = prepare("login", max_seq_length=8)
    assert not first.from_cache and first.miss is None  # an empty cache: nothing to compare with
    again = prepare("compute", max_seq_length=8)
    assert again.from_cache and again.cache == first.cache and again.train[:] == first.train[:]
    other = prepare("compute", max_seq_length=9)
    assert not other.from_cache and other.miss == f"the nearest cached set, {os.path.basename(first.cache)}, " \
        "differs in: option max_seq_length"
    assert {first.train.features[c].feature.dtype for c in ("input_ids", "labels")} == {"int32"}  # 4 B a token
    # a shuffled copy stamped with the same time (cp -p, rsync -a, one-second mtimes): same name, size and
    # mtime, other rows
    lines = open(asset("text.jsonl")).read().splitlines(keepends=True)
    shuffled = tmp_path / "compute" / "data" / "train.jsonl"
    shuffled.write_text("".join(lines[::-1]))
    stat = os.stat(tmp_path / "login" / "data" / "train.jsonl")
    os.utime(shuffled, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    reordered = prepare("compute", max_seq_length=8)
    assert not reordered.from_cache and reordered.miss.endswith("differs in: data files")
    leftovers = [e for e in os.listdir(cache) if ".tmp-" in e or ".work" in e]
    assert leftovers == []


def test_a_sentencepiece_tokenizer_has_one_fingerprint_wherever_it_was_loaded_from(sp_model, tmp_path):
    shutil.copytree(sp_model, tmp_path / "copy")
    here, there = (LlamaTokenizer.from_pretrained(str(p), add_bos_token=True) for p in (sp_model, tmp_path / "copy"))
    assert here.vocab_file != there.vocab_file and tokenizer_fingerprint(here) == tokenizer_fingerprint(there)
    assert tokenizer_fingerprint(here) != tokenizer_fingerprint(LlamaTokenizer.from_pretrained(str(sp_model)))


def test_the_training_content_digest_follows_the_rows_not_the_file(tmp_path):
    # A resumed run compares this digest: a copy of the data on another disk (another path and mtime,
    # another cache folder) is the same stream; one changed token is not.
    tok = word_tokenizer()
    text = open(asset("text.jsonl")).read()
    copies = []
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text(text)
        copies.append(prepare_data(DataConfig(data=str(tmp_path / name), max_seq_length=8), tok, seed=1,
                                   cache_dir=str(tmp_path / name.replace(".jsonl", "-cache"))))
    a, b = copies
    assert a.cache != b.cache and a.train_digest() == b.train_digest()
    reread = prepare_data(DataConfig(data=str(tmp_path / "a.jsonl"), max_seq_length=8), tok, seed=1,
                          cache_dir=str(tmp_path / "a-cache"))
    assert reread.from_cache and reread.digest == a.train_digest() == content_digest(reread.train)  # kept, exact
    (tmp_path / "c.jsonl").write_text(text.replace("fox", "dog", 1))
    other = prepare_data(DataConfig(data=str(tmp_path / "c.jsonl"), max_seq_length=8), tok, seed=1, cache_dir=None)
    assert len(other.train) == len(a.train) and other.train_digest() != a.train_digest()


def test_a_large_json_array_is_loaded_with_a_warning_and_json_lines_without(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(D, "JSON_ARRAY_WARN_BYTES", 10)  # datasets reads a .json array whole: past 1 GB, say so
    rows = [{"text": "the quick brown fox"}, {"text": "a lazy dog"}]
    (tmp_path / "array.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING"):
        assert len(load_data(str(tmp_path / "lines.json"))) == 2 and not caplog.records
        assert len(load_data(str(tmp_path / "array.json"))) == 2
    (record,) = caplog.records
    assert record.getMessage().endswith("is read whole into memory (datasets streams JSON lines only); convert it "
                                        "to .jsonl for a bounded load")


def test_a_jsonl_file_is_checked_once_per_content(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    checked = []
    real = D._check_json_lines
    monkeypatch.setattr(D, "_check_json_lines", lambda path: checked.append(path) or real(path))
    data = tmp_path / "text.jsonl"
    data.write_text(open(asset("text.jsonl")).read())
    load_data(str(data), cache)
    load_data(str(data), cache)
    assert len(checked) == 1
    data.write_text(open(asset("malformed.jsonl")).read())
    with pytest.raises(ValueError, match=r"line \d+: malformed JSON"):  # new content: checked again
        load_data(str(data), cache)


def test_several_files_and_prompt_completion(tmp_path):
    tok = word_tokenizer()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.parquet"
    a.write_text('{"prompt": "say hello", "completion": "hello there"}\n')
    datasets.Dataset.from_list([{"prompt": "name the animal", "completion": "the dog", "extra": 1}]).to_parquet(str(b))
    data = prepare_data(DataConfig(data=f"{a},{b}"), tok, seed=1, cache_dir=None)
    assert data.format == "prompt_completion" and len(data.train) == 2
    row = data.train[0]
    assert row["input_ids"] == ids(tok, "<s> say hello hello there </s>")
    assert row["labels"] == [X, X, X] + ids(tok, "hello there </s>")
    c = tmp_path / "c.jsonl"
    c.write_text('{"text": "hello"}\n')
    with pytest.raises(ValueError, match=r"the files have different formats \(prompt_completion, text\)"):
        prepare_data(DataConfig(data=f"{a},{c}"), tok, seed=1, cache_dir=None)


# ---------------------------------------------------------------------------------------- batches

def numbered_rows(n=10):
    """Rows of varied length whose first token is their row number; every other label masked."""
    rows = []
    for i in range(n):
        length = 2 + i % 5
        input_ids = [100 + i] + list(range(1, length))
        labels = [X] + [t if t % 2 else X for t in input_ids[1:]]
        rows.append({"input_ids": input_ids, "labels": labels, "length": length,
                     "n_targets": sum(label != X for label in labels[1:])})
    return datasets.Dataset.from_list(rows)


def step_rows(batches, step):
    """Global batch rows of a step, in [micro-step, rank, row] order, and the counted targets."""
    per_rank = [b.batch(step) for b in batches]
    accum = len(per_rank[0].micro_batches)
    rows, counted = [], 0
    for a in range(accum):
        for rank_batch in per_rank:
            mb = rank_batch.micro_batches[a]
            rows += mb["input_ids"][:, 0].tolist()
            counted += int((mb["labels"][:, 1:] != X).sum())
    assert len({b.global_target_tokens for b in per_rank}) == 1  # every rank computes the same count
    return rows, counted, per_rank[0].global_target_tokens


def split(data, world, accum, micro=2):
    return [GlobalBatches(data, micro_batch_size=micro, gradient_accumulation_steps=accum, world_size=world, rank=r,
                          seed=7, pad_id=0) for r in range(world)]


def test_global_batches_do_not_depend_on_the_split_over_ranks_and_micro_steps():
    data = numbered_rows()
    for step in range(8):  # 4 rows per step over 10 rows: global batches straddle epochs too
        rows_1, counted_1, tokens_1 = step_rows(split(data, 1, 2), step)
        rows_2, counted_2, tokens_2 = step_rows(split(data, 2, 1), step)
        assert rows_1 == rows_2 and tokens_1 == tokens_2 == counted_1 == counted_2
    for step in range(3):  # 8 rows per step: [micro-step, rank, row] order, whatever the split
        splits = [step_rows(split(data, world, 4 // world), step) for world in (1, 2, 4)]
        assert splits[0] == splits[1] == splits[2]
    stream = [r - 100 for step in range(5) for r in step_rows(split(data, 1, 2), step)[0]]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # reshuffled each epoch
    assert split(data, 1, 2)[0].batch(5).epoch == 2


def test_resuming_at_step_k_yields_what_an_uninterrupted_run_yields():
    kwargs = dict(micro_batch_size=3, gradient_accumulation_steps=2, world_size=2, rank=1, seed=3, pad_id=0)
    uninterrupted = iter(GlobalBatches(numbered_rows(), **kwargs))
    reference = [next(uninterrupted) for _ in range(6)]
    resumed = iter(GlobalBatches(numbered_rows(), start_step=4, **kwargs))
    for expected in reference[4:]:
        got = next(resumed)
        assert got.step == expected.step and got.global_target_tokens == expected.global_target_tokens
        for x, y in zip(got.micro_batches, expected.micro_batches, strict=True):
            assert all(torch.equal(x[k], y[k]) for k in x)
    other_seed = GlobalBatches(numbered_rows(), **{**kwargs, "seed": 4})
    assert not torch.equal(other_seed.batch(0).micro_batches[0]["input_ids"],
                           reference[0].micro_batches[0]["input_ids"])


def test_collate_pads_right_with_masked_labels():
    batch = collate({"input_ids": [[5, 6, 7], [8]], "labels": [[X, 6, 7], [X]]}, pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[X, 6, 7], [X, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_eval_batches_give_every_rank_the_same_number_of_batches():
    data = numbered_rows(5)
    ranks = [list(EvalBatches(data, micro_batch_size=1, world_size=2, rank=r, pad_id=0)) for r in range(2)]
    assert [len(r) for r in ranks] == [3, 3]
    seen = [b.micro_batches[0]["input_ids"][0, 0].item() - 100 for step in zip(*ranks, strict=True) for b in step]
    assert seen == [0, 1, 2, 3, 4, 0]  # the last slot repeats row 0 ...
    assert (ranks[1][2].micro_batches[0]["labels"] == X).all()  # ... with nothing to predict
    total = sum(step.global_target_tokens for step in ranks[0])
    assert total == int(np.asarray(data["n_targets"][:]).sum())
    assert len(EvalBatches(data, micro_batch_size=1, world_size=2, rank=0, pad_id=0, max_batches=2)) == 2


def _digest_as_first_defined(dataset, batch_size=65_536):
    """content_digest as released: a window of rows read whole (memory grew with the window). Caches
    and checkpoints keep digests, so the streaming one must hash exactly the same bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(sorted(dataset.column_names)).encode())
    for batch in dataset.with_format("arrow").iter(batch_size=batch_size):
        for name in sorted(batch.column_names):
            column = batch.column(name).combine_chunks()
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                h.update(np.asarray(pc.list_value_length(column), dtype=np.int64).tobytes())
                column = pc.list_flatten(column)
            h.update(np.asarray(column).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("window, chunk", [(65_536, 4_096), (7, 3), (6, 3), (5, 8)])
def test_the_streamed_content_digest_hashes_the_bytes_it_always_did(window, chunk):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, size=5_000)
    rows = datasets.Dataset.from_dict({
        "input_ids": [rng.integers(0, 50_000, size=k).astype(np.int32).tolist() for k in lengths],
        "labels": [rng.integers(-100, 50_000, size=k).astype(np.int32).tolist() for k in lengths],
        "length": lengths.astype(np.int64)})
    wide = rows.cast(datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                        "labels": datasets.Sequence(datasets.Value("int64")),
                                        "length": datasets.Value("int64")}))
    assert rows.features["input_ids"].feature.dtype == "int32"  # as datasets stores token ids
    for dataset, reference in ((rows, wide), (rows.shuffle(seed=0).select(range(4_321)),
                                              wide.shuffle(seed=0).select(range(4_321)))):  # an indices mapping too
        # integers hash as int64 whatever their stored width: as first defined, on the int64 rows
        assert content_digest(dataset, window, chunk) == content_digest(reference, window, chunk) \
            == _digest_as_first_defined(reference, window)
    assert content_digest(rows, window, chunk) != content_digest(rows.select(range(4_999)), window, chunk)

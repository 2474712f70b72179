"""Shipped DeepSpeed configs: every "auto" is filled, and each trains on real ranks."""
import glob
import os

import pytest
from conftest import tiny_model, tokens
from multirank import run_ranks

from ds_aslora import AdapterConfig, inject_adapters
from ds_aslora.runtime.ds_config import (
    MONITORS,
    auto_paths,
    auto_values,
    fill_auto,
    load_ds_config,
    without_monitors,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))


def cpu_run_values(world):
    return auto_values(micro_batch=2, grad_accum=2, world_size=world, lr=1e-3, clip=1.0, hidden_size=32)


def test_all_three_configs_ship():
    assert [os.path.basename(p) for p in SHIPPED] == ["zero2.json", "zero3.json", "zero3_offload.json"]


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_auto_is_filled(path):
    config = load_ds_config(path)
    assert auto_paths(config)  # the shipped files really are templates
    filled = fill_auto(config, cpu_run_values(2))
    assert auto_paths(filled) == [] and filled["train_batch_size"] == 8
    assert auto_paths(config)  # the input is not modified


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_no_shipped_config_starts_a_deepspeed_monitor(path):
    """The job logs every metric itself (TensorBoard, trainer_log.jsonl, and the monitors a user
    enables): DeepSpeed's own tensorboard monitor would write a second loss curve into the run folder."""
    config = load_ds_config(path)
    assert not set(MONITORS) & set(config)
    assert without_monitors({**config, "tensorboard": {"enabled": True}, "wandb": {"enabled": True}}) == config


def test_unfillable_auto_and_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="fp16.enabled"):
        fill_auto({"fp16": {"enabled": "auto"}}, cpu_run_values(1))
    with pytest.raises(FileNotFoundError, match="ds_configs"):
        load_ds_config(str(tmp_path / "zero9.json"))
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_ds_config(str(tmp_path / "bad.json"))


def shipped_worker(rank, path):
    import deepspeed.comm as dist

    from ds_aslora.runtime.engine import initialize

    config = fill_auto(load_ds_config(path), cpu_run_values(dist.get_world_size()))
    # CPU test machine: torch's AdamW instead of the JIT-built fused / CPU Adam kernels.
    config["optimizer"]["params"]["torch_adam"] = True
    config["zero_force_ds_cpu_optimizer"] = False
    for offload in ("offload_optimizer", "offload_param"):
        config["zero_optimization"].get(offload, {})["pin_memory"] = False
    model = inject_adapters(tiny_model(), AdapterConfig(method="aslora", r=4))
    engine, bank = initialize(model, config)
    ids = tokens(batch=2, length=8)
    losses = []
    for _ in range(8):  # four optimizer steps of two micro-batches; DS's WarmupCosineLR gives lr 0 to the first two
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        bank.reduce()
        engine.step()
        bank.step()
        losses.append(loss.item())
    return losses, engine.global_steps


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_config_trains_on_two_ranks(path):
    (losses, steps), _ = run_ranks(shipped_worker, 2, path)
    assert steps == 4 and losses[-1] < losses[0]

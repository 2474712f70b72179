"""ZeRO-3: the base model is partitioned while loading, adapters inject on the partitioned
model, and it computes what the whole model computes."""
import pytest
import torch
from conftest import tiny_model, tokens
from multirank import run_ranks
from test_zero_parity import ds_config

from ds_aslora import AdapterConfig, inject_adapters


def load_worker(rank, path):
    import deepspeed.comm as dist

    from ds_aslora.runtime.base_model import load_base_model
    from ds_aslora.runtime.engine import initialize

    config = ds_config(3, 1, dist.get_world_size())
    model, keep_alive = load_base_model(path, config, dtype=torch.float32)
    q = model.model.layers[0].self_attn.q_proj.weight
    partitioned = (q.numel(), q.ds_numel, q.ds_tensor.numel())
    inject_adapters(model, AdapterConfig(method="aslora", r=4))
    engine, bank = initialize(model, config)
    engine.eval()
    with torch.no_grad():
        logits = engine(tokens()).logits
    return partitioned, logits


@pytest.mark.slow
def test_partitioned_load_then_inject_gives_the_whole_models_logits(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    expected = model(tokens()).logits
    for (numel, ds_numel, local), logits in run_ranks(load_worker, 2, str(tmp_path)):
        assert numel == 0 and ds_numel == 32 * 32 and local == 32 * 32 // 2
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_missing_model_directory_is_a_clear_error(tmp_path):
    from ds_aslora.runtime.base_model import load_base_model

    with pytest.raises(FileNotFoundError, match="no hub access"):
        load_base_model(str(tmp_path / "nope"), {})

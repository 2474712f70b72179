"""ZeRO-3's post-step re-gather of persistent parameters: one all-gather per dtype
(ds_aslora.runtime.zero3_gather), bit-identical to DeepSpeed's one all-gather per parameter.

Shapes are odd on purpose (intermediate 45, r=3) so that partitions carry padding on 2 ranks.
"""
import pytest
import torch
from conftest import randomize_adapters, tiny_model, tokens
from multirank import run_ranks, train_steps

from ds_aslora import AdapterConfig, inject_adapters

STEPS, MICRO, LR = 3, 2, 1e-2
SHAPE = dict(hidden_size=40, intermediate_size=45, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# precision: (DeepSpeed bf16, frozen base dtype); "mixed" leaves a bf16 base with fp32 adapters (two dtypes);
# "offload": fp32 with the parameter partitions offloaded to the CPU (offload_param)
PRECISIONS = {"fp32": (False, torch.float32), "bf16": (True, torch.float32), "mixed": (False, torch.bfloat16),
              "offload": (False, torch.float32)}
DTYPES = {"fp32": {torch.float32}, "bf16": {torch.bfloat16}, "mixed": {torch.float32, torch.bfloat16},
          "offload": {torch.float32}}


def ds_config(bf16, world, offload=False, fp16=False):
    # 512: every adapter tensor and norm is persistent, no base projection is
    zero = {"stage": 3, "stage3_param_persistence_threshold": 512}
    if offload:
        zero["offload_param"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "train_batch_size": MICRO * world, "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01, "torch_adam": True}},
            "bf16": {"enabled": bf16}, "fp16": {"enabled": fp16, "initial_scale_power": 8},
            "steps_per_print": 10 ** 9}


def bits(t):
    return t.detach().contiguous().view(-1).view(torch.uint8).clone()


def train(method, precision, coalesced):
    """(installed, post-step all-gathers per step, persistent dtypes, losses, bits of every
    persistent working tensor and fp32 master) of one ZeRO-3 run."""
    import deepspeed.comm as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from ds_aslora.runtime.comm_audit import audit_collectives
    from ds_aslora.runtime.engine import initialize
    from ds_aslora.runtime.zero3_gather import is_coalesced, restore_persistent_gather

    bf16, base_dtype = PRECISIONS[precision]
    model = inject_adapters(tiny_model(**SHAPE).to(base_dtype),
                            AdapterConfig(method=method, r=3, alpha=6, target_modules="all-linear"))
    randomize_adapters(model)  # non-zero B, so every gathered tensor carries values from step 1
    world = dist.get_world_size()
    engine, bank = initialize(model, ds_config(bf16, world, offload=precision == "offload"))
    opt = engine.optimizer
    installed = is_coalesced(opt)
    if not coalesced:
        restore_persistent_gather(opt)
    post_step, gathers = opt._post_step, []

    def audited(*args, **kwargs):
        with audit_collectives() as record:
            out = post_step(*args, **kwargs)
        gathers.append(record.count(op="all_gather_into_tensor") + record.count(op="all_gather"))
        return out

    opt._post_step = audited
    losses = train_steps(engine, range(STEPS), lambda s: tokens(batch=world * MICRO, length=10, seed=100 + s), MICRO,
                         bank=bank)
    persistent = opt.persistent_parameters
    names = {id(p): n for n, p in engine.module.named_parameters()}
    state = {f"lp:{names[id(p)]}": bits(p) for p in persistent}  # working copies as re-gathered
    state.update({f"fp32:{n}": bits(safe_get_full_fp32_param(p)) for n, p in engine.module.named_parameters()
                  if p.requires_grad})
    return installed, gathers, {p.ds_tensor.dtype for p in persistent}, losses, state


def worker(rank, method, precision):
    return [train(method, precision, coalesced) for coalesced in (True, False)]


@pytest.mark.slow
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("method", ["aslora", "lora"])
def test_post_step_gather_is_one_collective_per_dtype_and_bit_identical(method, precision):
    for fast, plain in run_ranks(worker, 2, method, precision):
        installed, gathers, dtypes, losses, state = fast
        _, plain_gathers, _, plain_losses, plain_state = plain
        assert installed
        assert dtypes == DTYPES[precision]
        assert gathers == [len(dtypes)] * STEPS
        n_persistent = sum(1 for k in state if k.startswith("lp:"))
        assert plain_gathers == [n_persistent] * STEPS and n_persistent > 10  # DeepSpeed: one per parameter
        assert losses == plain_losses
        assert state.keys() == plain_state.keys()
        assert [k for k in state if not torch.equal(state[k], plain_state[k])] == []


def single_rank_worker(rank):
    return train("aslora", "fp32", coalesced=True)[:2]


@pytest.mark.slow
def test_a_single_rank_keeps_deepspeeds_path():
    installed, gathers = run_ranks(single_rank_worker, 1)[0]
    assert not installed and gathers == [0] * STEPS


def test_other_optimizers_are_left_alone():
    from ds_aslora.runtime.zero3_gather import coalesce_persistent_gather

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    assert coalesce_persistent_gather(opt) is False and "_post_step" not in vars(opt)


def overflow_worker(rank):
    """ZeRO-3 fp16 ASLoRA with a tie: a step the loss scaler skips must leave the representative's
    B whole, because the tied layer reads it outside the representative's module."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from ds_aslora.adapters.inject import adapter_layers
    from ds_aslora.runtime.engine import initialize

    # DeepSpeed refuses fp16 on CPUs without native fp16 kernels; torch's portable ones compute it
    type(get_accelerator()).is_fp16_supported = lambda self: True
    model = inject_adapters(tiny_model(**SHAPE), AdapterConfig(method="aslora", r=3, alpha=6, target_modules="q_proj"))
    randomize_adapters(model)
    layers = [layer for _, layer in adapter_layers(model)]
    layers[0].tie_to(layers[1])  # as a merge leaves it: the lower layer reads the upper one's B
    world = dist.get_world_size()
    engine, bank = initialize(model, ds_config(False, world, fp16=True))
    opt, batch = engine.optimizer, lambda s: tokens(batch=world * MICRO, length=10, seed=100 + s)
    train_steps(engine, range(1), batch, MICRO, bank=bank)
    opt.cur_scale = 2.0 ** 60  # the next scaled gradients overflow fp16: DeepSpeed skips the step
    skipped = engine.skipped_steps
    train_steps(engine, range(1, 2), batch, MICRO, bank=bank)
    released = [p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in opt.persistent_parameters]
    losses = train_steps(engine, range(2, 4), batch, MICRO, bank=bank)  # the tied layer reads B again
    return engine.skipped_steps - skipped, any(released), losses


@pytest.mark.slow
def test_a_skipped_fp16_step_leaves_the_persistent_bs_whole_for_tied_layers():
    for skipped, released, losses in run_ranks(overflow_worker, 2):
        assert skipped >= 1 and not released  # hysteresis 2: the scale falls slowly, later steps skip too
        assert all(torch.isfinite(torch.tensor(losses)))

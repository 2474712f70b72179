"""The replicated bank trains like the engine's own parameters: equal on every rank however
the ranks were seeded, unscaled under fp16, with the configured optimizer, and never out of
step with the engine's accumulation boundary."""
import pytest
import torch
from conftest import tiny_model, tokens
from multirank import run_ranks
from test_zero_parity import ds_config

from ds_aslora import AdapterConfig, inject_adapters
from ds_aslora.adapters.bank import SharedBank
from ds_aslora.runtime.bank_optim import Lion, bank_optimizer
from ds_aslora.runtime.replicated_bank import ReplicatedBank


def seeded_per_rank(rank, stage):
    """Like accelerate's device-specific seeding: adapters drawn from ``seed + rank``."""
    import deepspeed.comm as dist

    from ds_aslora.runtime.engine import initialize

    model = tiny_model(seed=0)
    torch.manual_seed(1000 + rank)
    inject_adapters(model, AdapterConfig(method="aslora", r=4, target_modules=["q_proj", "v_proj"]))
    drawn = {k: v.detach().clone() for k, v in model.shared_bank.named_parameters()}
    engine, bank = initialize(model, ds_config(stage, 1, dist.get_world_size()))
    after_init = {k: bank.bank.get(k).detach().clone() for k in bank.bank.keys()}
    for step in range(3):
        ids = tokens(batch=2, length=8, seed=50 + step + 10 * rank)  # each rank its own data
        engine.backward(engine(ids, labels=ids).loss)
        bank.reduce()
        engine.step()
        bank.step()
    after_steps = {k: bank.bank.get(k).detach().clone() for k in bank.bank.keys()}
    moments = {k: v["exp_avg"].clone() for k, v in zip(bank.bank.keys(), bank.optimizer.state.values(), strict=True)}
    return drawn, after_init, after_steps, moments


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_bank_is_equal_on_every_rank_however_ranks_were_seeded(stage):
    (drawn0, init0, steps0, mom0), (drawn1, init1, steps1, mom1) = run_ranks(seeded_per_rank, 2, stage)
    assert not torch.equal(drawn0["A_q_proj"], drawn1["A_q_proj"])  # the ranks really drew different A
    for key in init0:
        assert torch.equal(init0[key], drawn0[key]) and torch.equal(init1[key], init0[key]), key  # rank 0's
        assert torch.equal(steps1[key], steps0[key]) and not torch.equal(steps0[key], init0[key]), key
        assert torch.equal(mom1[key], mom0[key]), key


class FakeEngine:
    """What ReplicatedBank reads from a DeepSpeed engine, with a settable fp16 loss scale."""

    def __init__(self, scale=None):
        self.global_steps, self.device, self.scale = 0, "cpu", scale
        self.optimizer = type("Opt", (), {"cur_scale": scale})()
        self.boundary = True

    def fp16_enabled(self):
        return self.scale is not None

    def is_gradient_accumulation_boundary(self):
        return self.boundary

    def get_lr(self):
        return [0.1]

    def was_step_applied(self):
        return True

    def step(self):
        self.global_steps += 1


def one_bank_step(scale, optimizer_config, max_norm=0.5):
    """One boundary step on a bank whose A got gradient g * scale (what engine.backward leaves)."""
    bank = SharedBank(AdapterConfig(method="sharelora"))
    bank.add("A_q_proj", (2, 3), zeros=False, device=torch.device("cpu"), dtype=torch.float32, user="q")
    A = bank.get("A_q_proj")
    with torch.no_grad():
        A.copy_(torch.arange(6.0).view(2, 3))
    engine = FakeEngine(scale)
    replicated = ReplicatedBank(bank, engine, bank_optimizer([A], optimizer_config), max_norm=max_norm)
    A.grad = torch.tensor([[3.0, -1.0, 0.5], [2.0, 0.0, -4.0]]) * (scale or 1.0)
    replicated.reduce()
    engine.step()
    replicated.step()
    return A.detach().clone(), replicated.grad_norm


@pytest.mark.parametrize("optimizer", [{"type": "SGD", "params": {"lr": 0.1}},
                                       {"type": "AdamW", "params": {"lr": 0.1, "weight_decay": 0.01}}])
def test_fp16_bank_update_equals_fp32_whatever_the_loss_scale(optimizer):
    want, want_norm = one_bank_step(None, optimizer)
    for scale in (2.0 ** 16, 1024.0):
        got, norm = one_bank_step(scale, optimizer)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert norm == pytest.approx(want_norm, rel=1e-6) and want_norm == pytest.approx(5.5, rel=1e-6)


def test_a_bank_only_fp16_overflow_skips_the_bank_and_lowers_the_engines_loss_scale():
    class Scaler:  # DeepSpeed's DynamicLossScaler interface: update_scale(overflow) lowers the scale
        dynamic, overflows = True, []

        def update_scale(self, overflow):
            self.overflows.append(overflow)

    bank = SharedBank(AdapterConfig(method="sharelora"))
    bank.add("A_q_proj", (2, 3), zeros=False, device=torch.device("cpu"), dtype=torch.float32, user="q")
    A = bank.get("A_q_proj")
    before = A.detach().clone()
    engine = FakeEngine(2.0 ** 16)
    engine.optimizer.loss_scaler = scaler = Scaler()
    replicated = ReplicatedBank(bank, engine, bank_optimizer([A], {"type": "AdamW", "params": {"lr": 0.1}}))
    A.grad = torch.full((2, 3), float("inf"))  # the engine's own gradients were finite: it stepped
    replicated.reduce()
    engine.step()
    replicated.step()
    assert torch.equal(A.detach(), before) and replicated.nonfinite_skips == 1
    assert scaler.overflows == [True]


def test_bank_follows_the_configured_optimizer():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert type(bank_optimizer(p, {"type": "AdamW", "params": {"lr": 1, "torch_adam": True}})) is torch.optim.AdamW
    # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false (engine._configure_basic_optimizer)
    assert type(bank_optimizer(p, {"type": "Adam", "params": {}})) is torch.optim.AdamW
    adam = bank_optimizer(p, {"type": "Adam", "params": {"adam_w_mode": False, "weight_decay": 0.1,
                                                         "betas": [0.8, 0.9]}})
    assert type(adam) is torch.optim.Adam and adam.defaults["betas"] == (0.8, 0.9)
    sgd = bank_optimizer(p, {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}})
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9
    assert type(bank_optimizer(p, {"type": "Lion", "params": {"betas": [0.9, 0.99]}})) is Lion
    assert type(bank_optimizer(p, {"type": "Adagrad", "params": {}})) is torch.optim.Adagrad
    with pytest.raises(ValueError, match="'Lamb' cannot train the replicated shared bank"):
        bank_optimizer(p, {"type": "Lamb", "params": {}})
    with pytest.raises(ValueError, match="unknown optimizer type 'Sophia'"):
        bank_optimizer(p, {"type": "Sophia", "params": {}})
    with pytest.raises(ValueError, match=r"\['momentum'\] are not parameters of AdamW"):
        bank_optimizer(p, {"type": "AdamW", "params": {"momentum": 0.9}})
    with pytest.raises(ValueError, match="no optimizer.type"):
        bank_optimizer(p, None)


def test_lion_matches_its_update_rule():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    grads = [torch.tensor([0.3, -0.2, 0.0]), torch.tensor([-1.0, -0.1, 0.2])]
    want, m = p.detach().clone(), torch.zeros(3)
    for g in grads:
        p.grad = g
        opt.step()
        want = want * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
    torch.testing.assert_close(p.detach(), want)


def test_step_without_reduce_at_the_boundary_is_an_error():
    bank = SharedBank(AdapterConfig(method="sharelora"))
    bank.add("A_q_proj", (2, 3), zeros=False, device=torch.device("cpu"), dtype=torch.float32, user="q")
    engine = FakeEngine()
    replicated = ReplicatedBank(bank, engine, bank_optimizer(list(bank.parameters()), {"type": "SGD"}))
    engine.step()  # the engine stepped, but reduce() never ran (e.g. called after engine.step())
    with pytest.raises(RuntimeError, match=r"bank.reduce\(\) did not run at its accumulation boundary"):
        replicated.step()
    engine.boundary = False  # a micro-step inside the accumulation window: nothing to check
    replicated.reduce()
    replicated.step()


def test_unmanaged_gradient_accumulation_is_refused():
    from ds_aslora.runtime.engine import initialize

    model = inject_adapters(tiny_model(), AdapterConfig(method="sharelora", r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="managed_gradient_accumulation=false is not supported"):
        initialize(model, {**ds_config(2, 1, 1), "managed_gradient_accumulation": False})


@pytest.mark.parametrize("optimizer", [{"type": "SGD", "params": {"lr": 0.5, "momentum": 0.9}},
                                       {"type": "Lion", "params": {"lr": 0.5, "weight_decay": 0.1}},
                                       {"type": "Adam", "params": {"adam_w_mode": False, "weight_decay": 0.1}}])
def test_bank_update_is_the_configured_optimizers_update(optimizer):
    got, _ = one_bank_step(None, optimizer, max_norm=0.0)
    A = torch.nn.Parameter(torch.arange(6.0).view(2, 3))
    A.grad = torch.tensor([[3.0, -1.0, 0.5], [2.0, 0.0, -4.0]])
    cls = {"SGD": torch.optim.SGD, "Lion": Lion, "Adam": torch.optim.Adam}[optimizer["type"]]
    params = {k: v for k, v in optimizer["params"].items() if k != "adam_w_mode"}
    cls([A], **{**params, "lr": 0.1}).step()  # the engine's lr at the boundary (FakeEngine: 0.1)
    torch.testing.assert_close(got, A.detach(), rtol=0, atol=0)
    assert not torch.equal(got, one_bank_step(None, {"type": "AdamW", "params": {}}, max_norm=0.0)[0])

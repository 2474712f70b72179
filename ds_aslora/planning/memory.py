"""Per-GPU memory of LoRA, ShareLoRA and ASLoRA training under DeepSpeed ZeRO, without weights.

Every figure comes from a model built on the meta device (``count.build_on_meta``), so tensor
sizes are exact and the model-state rows are exact byte counts for this residency policy
(what ``ds_aslora.runtime.engine.initialize`` sets up):

- Per-layer adapter tensors (``lora_A``/``lora_B`` registered on ``AdapterLinear``) are DeepSpeed
  engine parameters: a working copy in the training dtype; an fp32 master and two fp32 Adam
  moments, partitioned over the data-parallel world at stages 1-3 (whole at stage 0); gradients
  in the working dtype, partitioned at stages 2-3. ZeRO-3 partitions the working copy too, except
  persistent tensors, kept whole on every GPU: every per-layer B under ASLoRA (its re-ties need
  it) and any tensor of at most ``stage3_param_persistence_threshold`` elements (DeepSpeed's own
  rule; 1e5 when unset). For ASLoRA the engine raises the threshold to the largest per-layer B,
  so frozen base tensors up to that size become persistent too.
- The SharedBank lives outside ZeRO, replicated: fp32 value, gradient and two Adam moments,
  16 bytes per parameter on every GPU, whatever the world size.
- Frozen base weights are in the working dtype: whole at stages 0-2, partitioned at ZeRO-3
  (persistent ones whole).
- Offload (ZeRO-3 with ``offload_optimizer`` and ``offload_param`` on cpu, as
  ``ds_configs/zero3_offload.json``): fp32 master, moments, gradient partitions and the
  partitions of non-persistent parameters are in host RAM.

Two DeepSpeed internals the policy does not name get rows of their own, because DeepSpeed's
estimators count them and a GPU must hold them: the fp32 gradient partition its optimizer step
builds (kept pinned on the host under offload), and ZeRO-3's buffer for gathered parameters.
Partition sizes follow DeepSpeed: ZeRO-3 pads each tensor to a multiple of the world size,
stages 1-2 pad the flat group to a multiple of twice the world size.

Activations are an estimate; ``activation_bytes`` documents how it is made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Optional

from torch import nn

from ..adapters.count import count_after_merges, count_trainable
from ..adapters.inject import adapter_config
from ..merging.schedule import final_groups, owners_by_type, param_counts
from .activations import ATTENTIONS, ActivationEstimate, activation_bytes
from .inventory import (
    Inventory,
    TensorInfo,
    bucket_size,
    effective_persistence_threshold,
    engine_numel,
    inventory,
    is_persistent,
)

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
SHARED_MODES = ("replicated", "engine")


def _ceil_div(n: int, k: int) -> int:
    return -(-n // k)


# ----------------------------------------------------------------------------------------------
# The per-GPU table


@dataclass(frozen=True)
class TrainSetup:
    """The run a plan is for. ``offload`` is ZeRO-3's optimizer + parameter offload to cpu."""

    zero_stage: int = 3
    nodes: int = 1
    gpus_per_node: int = 8
    dtype: str = "bf16"
    offload: bool = False
    micro_batch: int = 1
    seq_len: int = 4096
    persistence_threshold: Optional[int] = None  # None: DeepSpeed's default, 1e5
    shared_mode: str = "replicated"
    attention: str = "sdpa"
    reduce_bucket_size: Optional[int] = None  # None: the shipped configs' "auto" (runtime.ds_config)
    overlap_comm: bool = True

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {list(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.offload and self.zero_stage != 3:
            raise ValueError("offload is modelled for ZeRO-3 (ds_configs/zero3_offload.json) only")
        for name in ("nodes", "gpus_per_node", "micro_batch", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.shared_mode not in SHARED_MODES:
            raise ValueError(f"shared_mode must be one of {list(SHARED_MODES)}, got {self.shared_mode!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {list(ATTENTIONS)}, got {self.attention!r}")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    gpu: int   # bytes on each GPU
    host: int  # bytes of host RAM per GPU process (x gpus_per_node per node)
    note: str = ""


MODEL_STATE_ROWS = ("frozen", "adapter_working", "adapter_resident", "adapter_grads", "adapter_master",
                    "adapter_moments", "adapter_fp32_grad", "bank")


@dataclass
class MemoryPlan:
    setup: TrainSetup
    inventory: Inventory
    threshold: int                  # persistence threshold in effect (ZeRO-3)
    resident_adapter_numel: int     # per-layer adapter elements whole on every GPU (ZeRO-3)
    persistent_frozen_numel: int    # frozen elements whole on every GPU (ZeRO-3)
    activations: ActivationEstimate
    rows: list[Row] = field(default_factory=list)

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    @property
    def model_states(self) -> tuple[int, int]:
        """(GPU, host) bytes of weights, gradients and optimizer state."""
        rows = [self.row(k) for k in MODEL_STATE_ROWS]
        return sum(r.gpu for r in rows), sum(r.host for r in rows)

    def peak_gpu(self, checkpointing: bool) -> int:
        """Model states + ZeRO-3 gather buffer + gradient buckets + activations: an estimate of the peak per GPU."""
        act = self.row("activations_ckpt" if checkpointing else "activations")
        return self.model_states[0] + self.row("zero3_gather").gpu + self.row("zero_buckets").gpu + act.gpu


def _engine_and_bank(inv: Inventory, setup: TrainSetup) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """(engine parameters, replicated bank tensors) for the setup's shared_mode."""
    engine, bank = list(inv.adapters), list(inv.bank)
    if setup.shared_mode == "engine":  # the bank registered in the engine: ordinary engine parameters
        return engine + bank, []
    if not engine and bank:
        raise ValueError("no per-layer adapter parameters to hand to DeepSpeed (sharelora share=AB keeps every "
                         "trainable tensor in the shared bank): plan it with shared_mode='engine'")
    return engine, bank


def _model_state_rows(inv: Inventory, setup: TrainSetup, *, exact: bool = True, persist: bool = True):
    """Rows of weights, gradients and optimizer state, in bytes per GPU and per host process.

    ``exact=False, persist=False`` gives the figures DeepSpeed's estimators compute (fractions:
    no padding, no persistent tensor); the placement rules are the same code."""
    W, d, stage, off = setup.world, setup.dtype_bytes, setup.zero_stage, setup.offload
    engine, bank = _engine_and_bank(inv, setup)
    n_engine = sum(t.numel for t in engine)
    threshold = effective_persistence_threshold(inv, setup.persistence_threshold)
    persistent = [t for t in engine if is_persistent(t, inv.method, threshold)] if stage == 3 and persist else []
    frozen_pers = [t for t in inv.frozen if t.numel <= threshold] if stage == 3 and persist else []
    n_pers, n_frozen_pers = sum(t.numel for t in persistent), sum(t.numel for t in frozen_pers)

    def shard(tensors: list[TensorInfo]):
        """ZeRO-3: one 1/W partition per tensor, each padded to a multiple of W."""
        if not exact:
            return Fraction(sum(t.numel for t in tensors), W)
        return sum(_ceil_div(t.numel, W) for t in tensors)

    if stage == 3:
        part = shard(engine)
    elif stage in (1, 2):  # one flat group, padded to a multiple of 2 x world
        part = 2 * _ceil_div(n_engine, 2 * W) if exact else Fraction(n_engine, W)
    else:
        part = n_engine

    def where(nbytes, offloaded: bool = True):
        return (0, nbytes) if off and offloaded else (nbytes, 0)

    rows: list[Row] = []
    if stage == 3:
        pers_shards = shard(frozen_pers)
        gpu, host = where(d * (shard(inv.frozen) - pers_shards))
        rows.append(Row("frozen", "frozen base weights", d * (n_frozen_pers + pers_shards) + gpu, host,
                        f"1/{W} partitions; {n_frozen_pers:,} persistent elements (<= {threshold:,}) whole"))
        pers_part = shard(persistent)
        gpu, host = where(d * (part - pers_part))
        rows.append(Row("adapter_working", "adapter working copy (partitions)", d * pers_part + gpu, host,
                        f"1/{W} of every engine adapter tensor"))
        rows.append(Row("adapter_resident", "ZeRO-3 resident (persistent) adapters", d * n_pers, 0,
                        f"{n_pers:,} elements whole on every GPU"))
    else:
        rows.append(Row("frozen", "frozen base weights", d * inv.frozen_numel, 0, "whole on every GPU"))
        rows.append(Row("adapter_working", "adapter working copy", d * n_engine, 0, "whole on every GPU"))
        rows.append(Row("adapter_resident", "ZeRO-3 resident (persistent) adapters", 0, 0, "ZeRO-3 only"))
    grads = part if stage >= 2 else n_engine
    rows.append(Row("adapter_grads", "adapter gradients", *where(d * grads),
                    f"{setup.dtype}, " + (f"1/{W} partition" if stage >= 2 else "whole")))
    opt = part if stage >= 1 else n_engine
    master = 0 if stage == 0 and d == 4 else 4 * opt  # fp32 at stage 0: the working copy is the master
    rows.append(Row("adapter_master", "adapter fp32 master", *where(master),
                    "the fp32 working copy itself" if master == 0 and n_engine else
                    (f"1/{W} partition" if stage else "whole")))
    rows.append(Row("adapter_moments", "adapter Adam moments (2 x fp32)", *where(8 * opt),
                    f"1/{W} partition" if stage else "whole"))
    rows.append(Row("adapter_fp32_grad", "adapter fp32 grad partition (DS step)", *where(4 * part if stage else 0),
                    "DeepSpeed-internal: pinned host buffer" if off else
                    ("DeepSpeed-internal: built at each optimizer step" if stage else "none at stage 0")))
    n_bank = sum(t.numel for t in bank)
    rows.append(Row("bank", "replicated shared bank (16 B/param)", 16 * n_bank, 0,
                    f"{n_bank:,} params: fp32 value, grad, 2 Adam moments" if n_bank else "nothing shared"))
    return rows, threshold, n_pers, n_frozen_pers


def _bucket_row(model: nn.Module, inv: Inventory, setup: TrainSetup) -> Row:
    """DeepSpeed's contiguous gradient buckets: ZeRO-1/2 keep one reduce buffer (two with
    overlap_comm; fp32 at ZeRO-1, which stages an fp32 accumulator), ZeRO-3 one."""
    if setup.zero_stage == 0:
        return Row("zero_buckets", "ZeRO gradient buckets", 0, 0, "none at stage 0")
    engine = engine_numel(inv, setup.shared_mode)
    bucket = setup.reduce_bucket_size or bucket_size(model.config.hidden_size, engine)
    count = 1 if setup.zero_stage == 3 else 1 + setup.overlap_comm
    nbytes = 4 if setup.zero_stage == 1 else setup.dtype_bytes
    return Row("zero_buckets", "ZeRO gradient buckets", count * bucket * nbytes, 0,
               f"{count} x reduce_bucket_size {bucket:,}")


def memory_plan(model: nn.Module, setup: TrainSetup) -> MemoryPlan:
    """Per-GPU memory table of training ``model`` (adapters injected; meta device is fine)."""
    inv = inventory(model)
    rows, threshold, n_pers, n_frozen_pers = _model_state_rows(inv, setup)
    d = setup.dtype_bytes
    gather = 2 * d * inv.largest_module_params if setup.zero_stage == 3 else 0
    rows.append(Row("zero3_gather", "ZeRO-3 gather buffer (DS: 2 x largest module)", gather, 0,
                    f"largest module: {inv.largest_module_params:,} params" if gather else "ZeRO-3 only"))
    rows.append(_bucket_row(model, inv, setup))
    act = activation_bytes(model, dtype_bytes=d, micro_batch=setup.micro_batch, seq_len=setup.seq_len,
                           attention=setup.attention, shared_mode=setup.shared_mode,
                           siblings=setup.zero_stage != 3)  # runtime.engine: no sibling reuse under ZeRO-3
    rows.append(Row("activations", "activations, no checkpointing (est.)", act.no_checkpointing, 0,
                    f"{act.formula} formula"))
    rows.append(Row("activations_ckpt", "activations, checkpointing (est.)", act.checkpointing, 0,
                    "non-reentrant, one segment per decoder layer"))
    return MemoryPlan(setup, inv, threshold, n_pers, n_frozen_pers, act, rows)


# ----------------------------------------------------------------------------------------------
# Agreement with DeepSpeed's own estimators


@dataclass(frozen=True)
class EstimatorCheck:
    what: str
    ours: int
    deepspeed: int
    note: str

    @property
    def agrees(self) -> bool:
        return self.ours == self.deepspeed


def deepspeed_estimator_checks(inv: Inventory, setup: TrainSetup) -> list[EstimatorCheck]:
    """Our rows against ``estimate_zero{2,3}_model_states_mem_needs`` (the functions behind
    DeepSpeed's ``*_all_cold`` printers), term by term.

    Those estimators assume every parameter is trainable and 16-bit, so they get the frozen
    count for the weight share and the engine adapter count for optimizer state, no buffer
    factor, and their sums are taken apart:

    - ZeRO-3 with ``cpu_offload`` of the optimizer only: GPU = 4·largest + 2P/W (16-bit
      partitions); host per node = 16P/nodes, i.e. 16 B/param/W per GPU (fp32 master 4 +
      moments 8 + fp32 gradient 4). The same share sits on the GPU without offload.
    - ZeRO-2 with ``cpu_offload``: GPU = 2P (whole 16-bit weights); without: GPU = 2P + 18P/W,
      18 = 16-bit grad 2 + fp32 grad 4 + fp32 master 4 + moments 8 (DeepSpeed's own comment).

    Ours come from the same row code with DeepSpeed's padding and ZeRO-3 persistence turned
    off, which is all the plan's rows add. Empty for fp32 (the estimators assume 16-bit) and
    stage 0 (no estimator).
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if setup.dtype_bytes != 2 or setup.zero_stage == 0:
        return []
    nodes, gpn = setup.nodes, setup.gpus_per_node
    hw = dict(num_gpus_per_node=gpn, num_nodes=nodes, additional_buffer_factor=1)
    engine, _ = _engine_and_bank(inv, setup)
    n, frozen = sum(t.numel for t in engine), inv.frozen_numel
    # ZeRO-1 differs from ZeRO-2 only in keeping 16-bit gradients whole; DeepSpeed has no ZeRO-1 estimator
    cmp_setup = replace(setup, zero_stage=2) if setup.zero_stage == 1 else setup
    rows = {r.key: r for r in _model_state_rows(inv, cmp_setup, exact=False, persist=False)[0]}

    def total(*keys: str) -> Fraction:
        return sum((Fraction(rows[k].gpu) + Fraction(rows[k].host) for k in keys), Fraction(0))

    checks = []
    if setup.zero_stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(frozen, 0, cpu_offload=True, cpu_offload_params=False,
                                                          zero_init=True, **hw)
        checks.append(EstimatorCheck("frozen 16-bit weights per GPU (partitioned)", math.floor(total("frozen")), gpu,
                                     "the row adds persistent tensors whole, and padding"))
        cpu, _, _ = estimate_zero3_model_states_mem_needs(n, 0, cpu_offload=True, cpu_offload_params=False,
                                                          zero_init=True, **hw)
        checks.append(EstimatorCheck(
            "adapter fp32 master + moments + fp32 grad per node", math.floor(gpn * total(
                "adapter_master", "adapter_moments", "adapter_fp32_grad")), cpu,
            "DeepSpeed's offloaded-optimizer host figure; gpus_per_node x our rows"))
    else:
        _, gpu = estimate_zero2_model_states_mem_needs(frozen, cpu_offload=True, **hw)
        checks.append(EstimatorCheck("frozen 16-bit weights per GPU (whole)", math.floor(total("frozen")), gpu,
                                     "stages 0-2 keep them whole"))
        _, gpu_off = estimate_zero2_model_states_mem_needs(n, cpu_offload=True, **hw)
        checks.append(EstimatorCheck("adapter 16-bit working copy per GPU (whole)",
                                     math.floor(total("adapter_working")), gpu_off, "stages 0-2 keep it whole"))
        _, gpu_on = estimate_zero2_model_states_mem_needs(n, cpu_offload=False, **hw)
        checks.append(EstimatorCheck(
            "adapter grads + fp32 grad + master + moments per GPU", math.floor(total(
                "adapter_grads", "adapter_fp32_grad", "adapter_master", "adapter_moments")), gpu_on - 2 * n,
            "ZeRO-2 placement; ZeRO-1 keeps the 16-bit gradients whole" if setup.zero_stage == 1
            else "the rows add DeepSpeed's padding"))
    return checks


# ----------------------------------------------------------------------------------------------
# Counts


def schedule_merges(model: nn.Module) -> int:
    """Merges per module type at the end of ASLoRA's schedule: its target (merge_count,
    target_groups, target_ratio, or down to one group), which a run always reaches (the job
    refuses a schedule that cannot)."""
    owners = owners_by_type(model)
    final = final_groups(adapter_config(model), owners, param_counts(model))
    return max((n - final[m] for m, n in owners.items()), default=0)


def trainable_counts(model: nn.Module) -> tuple[int, Optional[int]]:
    """Exact trainable parameters now and, for ASLoRA, once its merge schedule is done."""
    now = count_trainable(model)
    if adapter_config(model).method != "aslora":
        return now, None
    return now, count_after_merges(model, schedule_merges(model))


def format_bytes(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


__all__ = ["TrainSetup", "MemoryPlan", "Row", "EstimatorCheck", "memory_plan", "deepspeed_estimator_checks",
           "trainable_counts", "schedule_merges", "format_bytes", "DTYPE_BYTES"]

"""ZeRO-3: re-gather the persistent parameters after a step in one collective per dtype.

DeepSpeed 0.19's ZeRO-3 optimizer releases every parameter at the start of ``step()`` and
re-gathers the *persistent* ones (whole on every rank: numel under
``stage3_param_persistence_threshold``) in ``_post_step`` with
``persistent_parameters[0].all_gather(persistent_parameters)``, whose
``Init._allgather_params_coalesced`` launches one all-gather per parameter. Adapters are small
and persistent (ASLoRA's B must be, ``distributed.zero3_residency``), so an all-linear job pays
hundreds of tiny collectives per step where the frozen base pays one per norm.

``coalesce_persistent_gather(optimizer)`` wraps ``_post_step`` of that one optimizer instance
(no global patch): it first gathers the persistent parameters itself, one
``all_gather_into_tensor`` of their concatenated local partitions (``ds_tensor``) per process
group and dtype, gives each parameter its rows, marks it ``AVAILABLE``, then calls DeepSpeed's
own ``_post_step``, whose gather skips parameters that are not ``NOT_AVAILABLE``. The values are
copies of the same partitions, laid out as DeepSpeed lays them (rank r holds elements
``[r*ds_tensor.ds_numel, (r+1)*ds_tensor.ds_numel)``, the last one zero-padded), so the result
is bit-identical. DeepSpeed's path stays wherever the layout could differ (another DeepSpeed
minor version, NVMe offload, quantized weights, hpZ secondary partitions, one rank).
Partitions offloaded to CPU (``offload_param: cpu``) are concatenated there and moved to the
accelerator, as DeepSpeed moves each one; a bucket holds at most ``BUCKET_BYTES`` of partitions,
so the transient copy stays small at 70B.

``keep_persistent_resident(optimizer)`` (every ZeRO-3 optimizer with persistent parameters)
re-gathers them when a ``step()`` returned without ``_post_step``: on an fp16 overflow DeepSpeed
releases every parameter and returns early, and ASLoRA's tied layers read their representative's
B outside its module, where no hook fetches it.
"""
from __future__ import annotations

from typing import Any, Optional

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.utils import log_dist

SUPPORTED_DEEPSPEED = (0, 19)  # the layout below was read from 0.19's partition_parameters.py
BUCKET_BYTES = 256 * 2**20  # local partitions per collective (the gathered buffer is world x this)


def _unsupported(optimizer: Any) -> Optional[str]:
    """Why DeepSpeed's own post-step gather must stay, or None. Checked once: the layout of
    the persistent set is fixed at ``deepspeed.initialize``."""
    version = tuple(int(v) for v in deepspeed.__version__.split(".")[:2])
    if version != SUPPORTED_DEEPSPEED:
        return f"DeepSpeed {deepspeed.__version__} (layout checked for {SUPPORTED_DEEPSPEED})"
    if getattr(optimizer, "swap_optimizer", False):
        return "NVMe optimizer swapping"
    device = torch.device(get_accelerator().current_device_name())  # where DeepSpeed gathers them
    for p in optimizer.persistent_parameters:
        part = p.ds_tensor
        if part is None or getattr(part, "final_location", None) == OffloadDeviceEnum.nvme:
            return "NVMe parameter offload"
        if part.device not in (device, torch.device("cpu")):
            return f"partitions on {part.device}, not {device} or the CPU"
        if hasattr(part, "ds_quant_scale"):
            return "quantized weights"
        if p.ds_secondary_tensor is not None or p.ds_zero_param_process_group is not None:
            return "hpZ secondary partitions"
        world = dist.get_world_size(group=p.ds_process_group)
        if world == 1:
            return "a single rank (nothing to gather)"
        if part.dim() != 1 or part.numel() != part.ds_numel or not 0 <= world * part.ds_numel - p.ds_numel < world:
            return f"unexpected partition layout of a {tuple(p.ds_shape)} parameter"
    return None


@torch.no_grad()
def gather_persistent(params: list) -> int:
    """All-gather the ``NOT_AVAILABLE`` parameters of ``params`` (DeepSpeed ZeRO-3 parameters,
    same list and order on every rank) with one collective per (process group, dtype, device).
    Returns the number of collectives."""
    device = torch.device(get_accelerator().current_device_name())
    by_kind: dict[tuple, list] = {}
    for p in params:
        if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
            by_kind.setdefault((id(p.ds_process_group), p.ds_tensor.dtype), []).append(p)
    buckets = []
    for ps in by_kind.values():  # split by size, in list order: the same buckets on every rank
        bucket, size = [], 0
        for p in ps:
            nbytes = p.ds_tensor.numel() * p.ds_tensor.element_size()
            if bucket and size + nbytes > BUCKET_BYTES:
                buckets.append(bucket)
                bucket, size = [], 0
            bucket.append(p)
            size += nbytes
        buckets.append(bucket)
    launched = []
    for ps in buckets:
        group = ps[0].ds_process_group
        local = torch.cat([p.ds_tensor.to(device, non_blocking=True) for p in ps])  # CPU-offloaded: moved
        out = torch.empty(dist.get_world_size(group=group) * local.numel(), dtype=local.dtype, device=device)
        # allgather_fn: all_gather_into_tensor, or DeepSpeed's list all_gather where torch lacks it
        launched.append((ps, out, dist.allgather_fn(out, local, group=group, async_op=True)))
    for ps, out, handle in launched:
        handle.wait()
        # out is [rank][parameter][its partition]: a parameter is its partition from every rank,
        # in rank order, less the padding at the end (as in DeepSpeed's per-parameter buffer).
        rows = out.view(dist.get_world_size(group=ps[0].ds_process_group), -1)
        for p, part in zip(ps, rows.split([p.ds_tensor.ds_numel for p in ps], dim=1), strict=True):
            p.data = part.reshape(-1).narrow(0, 0, p.ds_numel).view(p.ds_shape)
            p.ds_status = ZeroParamStatus.AVAILABLE
    return len(launched)


def coalesce_persistent_gather(optimizer: Any) -> bool:
    """Make this ZeRO-3 optimizer re-gather its persistent parameters after each step in one
    collective per dtype (see the module docstring). Returns whether it was installed; does
    nothing on other optimizers (ZeRO 0-2) or when the layout is not the one mirrored here."""
    if not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3) or not optimizer.persistent_parameters:
        return False
    if is_coalesced(optimizer):
        return True
    reason = _unsupported(optimizer)
    if reason is not None:
        log_dist(f"ZeRO-3: persistent parameters keep DeepSpeed's per-parameter post-step gather ({reason})",
                 ranks=[0])
        return False
    original = optimizer._post_step

    def _post_step(*args, **kwargs):
        gather_persistent(optimizer.persistent_parameters)
        return original(*args, **kwargs)

    _post_step.coalesced_persistent_gather = True
    optimizer._post_step = _post_step
    log_dist(f"ZeRO-3: the {len(optimizer.persistent_parameters)} persistent parameters are re-gathered after each "
             f"step in one all-gather per dtype", ranks=[0])
    return True


def keep_persistent_resident(optimizer: Any) -> None:
    """After every ``step()`` of this ZeRO-3 optimizer its persistent parameters are whole, also
    when the step was skipped (fp16 overflow: no ``_post_step``). The condition is the same on
    every rank (the overflow is agreed), so every rank takes the same collective path."""
    if not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3) or not optimizer.persistent_parameters:
        return
    original = optimizer.step

    def step(*args, **kwargs):
        result = original(*args, **kwargs)
        persistent = optimizer.persistent_parameters
        if any(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in persistent):
            if is_coalesced(optimizer):
                gather_persistent(persistent)
            else:
                persistent[0].all_gather(persistent)
        return result

    optimizer.step = step


def is_coalesced(optimizer: Any) -> bool:
    return getattr(vars(optimizer).get("_post_step"), "coalesced_persistent_gather", False)


def restore_persistent_gather(optimizer: Any) -> None:
    """Undo ``coalesce_persistent_gather``: DeepSpeed's own per-parameter gather again."""
    if is_coalesced(optimizer):
        del optimizer._post_step

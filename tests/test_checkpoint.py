"""Save after a merge, resume in a fresh job: the run continues exactly as if uninterrupted.

Each phase is its own set of processes (a fresh job). The checkpoint holds DeepSpeed's
state, the replicated bank with its AdamW state and the merge coordinator's state (tie
map, running-mean slices, history); a damaged or foreign checkpoint fails clearly.
"""
import os
import shutil

import pytest
import torch
from conftest import LOSS_RTOL, adam_atol
from multirank import run_ranks
from test_merge_coordinator import LR, STEPS, adapted, ds_config, end_state, raw_adjacent, train

SAVE_AT = 5  # one step after the first merge event (step 4); some cases save at the event itself


def job(rank, stage, ga, ckpt_dir, phase, save_at=SAVE_AT):
    """``first``: steps 1 to ``save_at``, then a checkpoint; ``resume``: from it to the end. The
    uninterrupted run they must add up to is test_merge_coordinator's ``raw_adjacent``."""
    import deepspeed.comm as dist

    from ds_aslora.merging.coordinator import MergeCoordinator
    from ds_aslora.runtime.checkpoint import load_checkpoint, save_checkpoint
    from ds_aslora.runtime.engine import initialize

    world = dist.get_world_size()
    engine, bank = initialize(adapted("raw-adjacent"), ds_config(stage, world, ga))
    merger = MergeCoordinator(engine)
    if phase == "resume":
        extra = load_checkpoint(engine, ckpt_dir, bank=bank, merger=merger)
        assert extra == {"data_position": save_at} and engine.global_steps == save_at
        steps = range(save_at + 1, STEPS + 1)
    else:
        steps = range(1, save_at + 1)
    losses = train(engine, bank, merger, world, steps, ga)
    if phase == "first":
        save_checkpoint(engine, ckpt_dir, bank=bank, merger=merger, client_state={"data_position": save_at})
    return end_state(engine, bank, merger, losses)


def full(stage, world):
    """Rank 0's (losses, state, history) of the uninterrupted 8-step run (ga 1), shared with
    test_merge_coordinator (which checks that run against the single-process reference)."""
    return raw_adjacent(stage, world)[0][2]


class Saved:
    """The first phase's checkpoints, each saved once per module by (stage, world, ga, save_at): the
    job is deterministic (seeded model and data), so it is the checkpoint each test would save. Every
    test gets its own copy of the folder (several tear, replace or add files in it)."""

    def __init__(self, root):
        self.root, self.folders = root, {}

    def copy(self, dest, stage=2, world=2, ga=1, save_at=SAVE_AT):
        key = (stage, world, ga, save_at)
        if key not in self.folders:
            self.folders[key] = str(self.root / "stage{}-world{}-ga{}-step{}".format(*key))
            run_ranks(job, world, stage, ga, self.folders[key], "first", save_at)
        shutil.copytree(self.folders[key], dest)
        return str(dest)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return Saved(tmp_path_factory.mktemp("saved"))


@pytest.mark.slow
@pytest.mark.parametrize("stage, world, resume_world, ga, save_at", [(3, 2, 2, 1, 4), (3, 2, 2, 1, 5), (2, 2, 2, 1, 4),
                                                                     (1, 4, 4, 1, 5), (0, 2, 1, 1, 5)])
def test_resume_after_a_merge_continues_the_uninterrupted_run(checkpoints, tmp_path, stage, world, resume_world, ga,
                                                              save_at):
    assert ga == 1  # the uninterrupted run's
    full_losses, full_weights, full_history = full(stage, world)
    ckpt = checkpoints.copy(tmp_path / "ckpt", stage, world, ga, save_at)
    # stage 0 holds no partitioned state: the running-mean slices are re-cut for another world size
    resume_ga = ga * world // resume_world
    for losses, weights, history in run_ranks(job, resume_world, stage, resume_ga, ckpt, "resume", save_at):
        assert [h[:4] for h in history] == [h[:4] for h in full_history] and len(history) == 9
        # distances after the resume come from the restored (and, on 1 rank, re-cut) running means
        torch.testing.assert_close(torch.tensor([h[4] for h in history], dtype=torch.float64),
                                   torch.tensor([h[4] for h in full_history], dtype=torch.float64),
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(full_losses[save_at:]), rtol=LOSS_RTOL, atol=0)
        for name, value in full_weights.items():  # bank tensors; per-layer value, exp_avg, exp_avg_sq
            torch.testing.assert_close(weights[name], value, rtol=0, atol=adam_atol(LR, STEPS), msg=name)


def refuse(rank, ckpt_dirs, stage, save_again=False):
    """Load ``ckpt_dirs[rank]`` (ranks may see different folders) or, with ``save_again``,
    load it and save under the same tag. Returns the error every rank raised."""
    import deepspeed.comm as dist

    from ds_aslora.merging.coordinator import MergeCoordinator
    from ds_aslora.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from ds_aslora.runtime.engine import initialize

    engine, bank = initialize(adapted("raw-adjacent"), ds_config(stage, dist.get_world_size()))
    merger = MergeCoordinator(engine)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(engine, ckpt_dirs[rank], bank=bank, merger=merger)
        if save_again:
            save_checkpoint(engine, ckpt_dirs[rank], bank=bank, merger=merger)
    return str(info.value)


def crash_while_saving(rank, ckpt_dir):
    """Resume, train one step, then rank 1 dies in the middle of the next save: after
    rank 0 wrote the model states, before the ZeRO optimizer partitions are complete."""
    import deepspeed.comm as dist

    from ds_aslora.merging.coordinator import MergeCoordinator
    from ds_aslora.runtime.checkpoint import load_checkpoint, save_checkpoint
    from ds_aslora.runtime.engine import initialize

    engine, bank = initialize(adapted("raw-adjacent"), ds_config(2, dist.get_world_size()))
    merger = MergeCoordinator(engine)
    load_checkpoint(engine, ckpt_dir, bank=bank, merger=merger)
    train(engine, bank, merger, dist.get_world_size(), [SAVE_AT + 1])
    if rank == 1:
        def boom(*args, **kwargs):
            raise OSError("simulated crash while writing the checkpoint")
        engine._save_zero_checkpoint = boom
    save_checkpoint(engine, ckpt_dir, bank=bank, merger=merger)


@pytest.mark.slow
def test_bad_checkpoints_fail_clearly_on_every_rank_and_a_crashed_save_keeps_the_last_good_one(checkpoints, tmp_path):
    ckpt = checkpoints.copy(tmp_path / "ckpt")
    (message,) = run_ranks(refuse, 1, [ckpt], 2)
    assert "written by 2 ranks at ZeRO stage 2" in message and "onto 1 ranks" in message
    (message,) = run_ranks(refuse, 1, [str(tmp_path / "nothing")], 2)
    assert "FileNotFoundError" in message and "latest" in message
    # only rank 1 sees a checkpoint without its running means: both ranks fail alike, no hang
    torn = str(tmp_path / "torn")
    shutil.copytree(ckpt, torn)
    os.remove(os.path.join(torn, f"global_step{SAVE_AT}", "merge_means_rank00001.pt"))
    messages = run_ranks(refuse, 2, [ckpt, torn], 2)
    assert messages[0] == messages[1] and messages[0].startswith("rank 1:") and "merge_means_rank00001" in messages[0]
    messages = run_ranks(refuse, 2, [ckpt, ckpt], 2, True)  # saving over the tag ``latest`` names
    assert messages[0] == messages[1] and "never overwritten in place" in messages[0]

    with pytest.raises(Exception, match="simulated crash"):
        run_ranks(crash_while_saving, 2, ckpt)
    torn_files = os.listdir(os.path.join(ckpt, f"global_step{SAVE_AT + 1}"))
    assert "mp_rank_00_model_states.pt" in torn_files and "ds_aslora.json" not in torn_files
    assert open(os.path.join(ckpt, "latest")).read() == f"global_step{SAVE_AT}"
    full_losses, *_ = full(2, 2)
    losses, *_ = run_ranks(job, 2, 2, 1, ckpt, "resume")[0]  # asserts it resumes at SAVE_AT
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(full_losses[SAVE_AT:]), rtol=LOSS_RTOL, atol=0)


def resume_save_again(rank, ckpt_dir):
    """Resume from ``latest`` after a crash tore the next save, train, save that step again."""
    import deepspeed.comm as dist

    from ds_aslora.merging.coordinator import MergeCoordinator
    from ds_aslora.runtime.checkpoint import load_checkpoint, save_checkpoint
    from ds_aslora.runtime.engine import initialize

    engine, bank = initialize(adapted("raw-adjacent"), ds_config(2, dist.get_world_size()))
    merger = MergeCoordinator(engine)
    load_checkpoint(engine, ckpt_dir, bank=bank, merger=merger)
    train(engine, bank, merger, dist.get_world_size(), [SAVE_AT + 1])
    return save_checkpoint(engine, ckpt_dir, bank=bank, merger=merger)


@pytest.mark.slow
def test_a_save_torn_by_a_crash_is_set_aside_when_the_resumed_run_saves_that_step(checkpoints, tmp_path):
    ckpt = checkpoints.copy(tmp_path / "ckpt")
    with pytest.raises(Exception, match="simulated crash"):
        run_ranks(crash_while_saving, 2, ckpt)
    torn = os.path.join(ckpt, f"global_step{SAVE_AT + 1}")
    torn_files = sorted(os.listdir(torn))
    folders = run_ranks(resume_save_again, 2, ckpt)
    assert folders == [torn, torn] and open(os.path.join(ckpt, "latest")).read() == f"global_step{SAVE_AT + 1}"
    assert sorted(os.listdir(f"{torn}.set-aside.0")) == torn_files  # kept for inspection, untouched
    assert "ds_aslora.json" in os.listdir(torn)
    run_ranks(refuse_or_load, 2, ckpt, True, True)  # the new save loads


def refuse_or_load(rank, ckpt_dir, with_bank, with_merger, extra_config=None, save=False):
    """Load (or with ``save``, save) without the bank or merger; returns the error or None."""
    import deepspeed.comm as dist

    from ds_aslora.merging.coordinator import MergeCoordinator
    from ds_aslora.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from ds_aslora.runtime.engine import initialize

    engine, bank = initialize(adapted("raw-adjacent"), {**ds_config(2, dist.get_world_size()), **(extra_config or {})})
    merger = MergeCoordinator(engine)
    try:
        if save:
            save_checkpoint(engine, ckpt_dir, bank=bank, merger=merger)
        else:
            load_checkpoint(engine, ckpt_dir, bank=bank if with_bank else None, merger=merger if with_merger else None)
    except CheckpointError as err:
        return str(err)
    return None


@pytest.mark.slow
def test_a_bad_deepspeed_partition_file_on_one_rank_stops_every_rank_alike(checkpoints, tmp_path):
    # DeepSpeed fails only on the rank whose file is bad; the others would go on into the next collective.
    ckpt = checkpoints.copy(tmp_path / "ckpt")
    folder = os.path.join(ckpt, open(os.path.join(ckpt, "latest")).read().strip())
    partition = os.path.join(folder, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with open(partition, "r+b") as f:  # torn: the first half only
        f.truncate(os.path.getsize(partition) // 2)
    torn = run_ranks(refuse_or_load, 2, ckpt, True, True, timeout=120)
    assert torn[0] == torn[1] and torn[0].startswith("rank 1: ")
    os.remove(partition)
    missing = run_ranks(refuse_or_load, 2, ckpt, True, True, timeout=120)
    assert missing[0] == missing[1] and "lacks rank 1's optimizer partition" in missing[0]


@pytest.mark.slow
def test_loading_without_the_bank_or_merger_a_checkpoint_holds_is_refused(checkpoints, tmp_path):
    ckpt = checkpoints.copy(tmp_path / "ckpt")
    for bank, merger, what in ((False, True, "shared-bank tensors"), (True, False, "ASLoRA merge state")):
        messages = run_ranks(refuse_or_load, 2, ckpt, bank, merger)
        assert messages[0] == messages[1] and what in messages[0] and "was not given them" in messages[0]
    # node-local storage: each node would keep files the others must read at resume
    node_local = {"checkpoint": {"use_node_local_storage": True}}
    messages = run_ranks(refuse_or_load, 2, str(tmp_path / "other"), True, True, node_local, True)
    assert messages[0] == messages[1] and "use_node_local_storage" in messages[0]
    assert not os.path.exists(tmp_path / "other")


def resume_reads(rank, stage, ckpt_dir):
    """Load ``ckpt_dir`` and return the running-mean files this rank opened."""
    import deepspeed.comm as dist

    from ds_aslora.merging.coordinator import MergeCoordinator
    from ds_aslora.runtime.checkpoint import load_checkpoint
    from ds_aslora.runtime.engine import initialize

    opened, statted, load, isfile = [], set(), torch.load, os.path.isfile

    def spy(path, *args, **kwargs):
        if "merge_means" in str(path):
            opened.append(os.path.basename(path))
        return load(path, *args, **kwargs)

    def stat_spy(path):
        if "merge_means" in str(path):
            statted.add(os.path.basename(path))
        return isfile(path)

    engine, bank = initialize(adapted("raw-adjacent"), ds_config(stage, dist.get_world_size()))
    merger = MergeCoordinator(engine)
    torch.load, os.path.isfile = spy, stat_spy
    try:
        load_checkpoint(engine, ckpt_dir, bank=bank, merger=merger)
    finally:
        torch.load, os.path.isfile = load, isfile
    assert statted == set(opened)  # no rank looks at every rank's file (512 ranks: 262k stats per resume)
    return sorted(opened)


@pytest.mark.slow
def test_a_resumed_rank_reads_and_checks_only_the_running_means_its_slices_need(checkpoints, tmp_path):
    same = checkpoints.copy(tmp_path / "same")
    assert run_ranks(resume_reads, 2, 2, same) == [["merge_means_rank00000.pt"], ["merge_means_rank00001.pt"]]
    recut = checkpoints.copy(tmp_path / "recut", stage=0, world=4)  # stage 0 re-cuts 4 ranks' slices onto 2
    assert run_ranks(resume_reads, 2, 0, recut) == [["merge_means_rank00000.pt", "merge_means_rank00001.pt"],
                                                     ["merge_means_rank00002.pt", "merge_means_rank00003.pt"]]


def load_locations(rank, stage, ckpt_dir):
    """Load ``ckpt_dir``; return (file, map_location) of every file read, and the storage locations
    recorded in rank 0's module-state file (where client_state lives)."""
    import deepspeed.comm as dist

    from ds_aslora.merging.coordinator import MergeCoordinator
    from ds_aslora.runtime.checkpoint import load_checkpoint
    from ds_aslora.runtime.engine import initialize

    reads, load = [], torch.load

    def spy(path, *args, map_location=None, **kwargs):
        reads.append((os.path.basename(str(path)), str(map_location)))
        return load(path, *args, map_location=map_location, **kwargs)

    engine, bank = initialize(adapted("raw-adjacent"), ds_config(stage, dist.get_world_size()))
    merger = MergeCoordinator(engine)
    torch.load = spy
    try:
        load_checkpoint(engine, ckpt_dir, bank=bank, merger=merger)
    finally:
        torch.load = load
    saved = set()
    folder = os.path.join(ckpt_dir, open(os.path.join(ckpt_dir, "latest")).read().strip())
    torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), weights_only=False,
               map_location=lambda storage, where: saved.add(where) or storage)
    return reads, saved


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_every_rank_reads_checkpoint_files_onto_the_cpu(checkpoints, tmp_path, stage):
    # DeepSpeed reads rank 0's module-state file (client_state: bank and merge state) with an identity
    # map_location: tensors saved from cuda:0 would land on cuda:0 on every rank of the node.
    ckpt = checkpoints.copy(tmp_path / "ckpt", stage=stage)
    for reads, saved in run_ranks(load_locations, 2, stage, ckpt):
        assert any(name == "mp_rank_00_model_states.pt" for name, _ in reads)
        assert all(where == "cpu" for _, where in reads), reads
        assert saved == {"cpu"}


def data_check(rank):
    from ds_aslora.train.job import check_same_data
    from ds_aslora.train.run_config import ConfigError

    saved = {"seed": 0, "train_sequences": 100, "content": "abc"}
    with pytest.raises(ConfigError) as info:  # one rank's node-local cache holds other data
        check_same_data(saved, {**saved, "content": "abc" if rank == 0 else "xyz"})
    return str(info.value)


@pytest.mark.slow
def test_data_that_differs_on_one_rank_stops_every_rank_alike():
    messages = run_ranks(data_check, 2, timeout=60)
    assert messages[0] == messages[1] and messages[0].startswith("rank 1: the checkpoint's data stream differs")


class _Payload:
    """Unpickling this runs code: what a crafted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_a_crafted_pickle_in_a_checkpoint_is_refused_on_every_rank_not_executed(checkpoints, tmp_path):
    ckpt = checkpoints.copy(tmp_path / "ckpt")
    marker = tmp_path / "executed"
    for name in ("merge_means_rank00001.pt", "rng_state_rank00001.pt"):
        path = os.path.join(ckpt, f"global_step{SAVE_AT}", name)
        original = open(path, "rb").read()
        torch.save({"slices": _Payload(str(marker))}, path)
        messages = run_ranks(refuse_or_load, 2, ckpt, True, True)
        assert messages[0] == messages[1] and messages[0].startswith("rank 1: UnpicklingError"), messages
        assert not marker.exists()
        open(path, "wb").write(original)


def test_a_checkpoint_of_another_base_model_is_named_in_one_line(tmp_path):
    """The base model is compared by shape, not by folder (folders move); the line names both."""
    import json

    from conftest import tiny_model

    from ds_aslora.runtime.checkpoint import META_FILE, check_resumable, model_identity

    os.makedirs(tmp_path / "global_step1")
    meta = {"world_size": 1, "zero_stage": 0, "adapter": {}, "model": model_identity(tiny_model(), name="/models/a")}
    (tmp_path / "global_step1" / META_FILE).write_text(json.dumps(meta))
    check_resumable(str(tmp_path), "global_step1", world=1, stage=0, adapter={},
                    model=model_identity(tiny_model(seed=1), name="/moved/a"))
    with pytest.raises(ValueError) as info:
        check_resumable(str(tmp_path), "global_step1", world=1, stage=0, adapter={},
                        model=model_identity(tiny_model(num_hidden_layers=2).config, name="/models/b"))
    assert str(info.value) == ("checkpoint 'global_step1' was trained on another base model: '/models/a' there, "
                               "'/models/b' here (num_hidden_layers=4 there, 2 here)")

"""The job's process setup: every group gets the collective timeout (DeepSpeed's too), the gloo
setup channel connects with it and names GLOO_SOCKET_IFNAME when it cannot, ranks waiting for
another's setup outlast it, and every rank stops alike on an environment variable one node sees
differently; CPU placement is reported per host."""
import os

import pytest
from multirank import run_ranks

from ds_aslora.train import dist_setup
from ds_aslora.train.dist_setup import environment_problem, placement_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def place(host, cpus, threads=4, **env):
    return {"host": host, "cpus": cpus, "threads": threads, **env}


def test_placement_warns_when_a_hosts_ranks_were_bound_to_too_few_cores():
    good = [place("n1", [0, 1, 2, 3]), place("n1", [4, 5, 6, 7]), place("n2", list(range(64)), 64)]
    assert placement_lines(good) == ["n1: 2 ranks, 4 CPUs each, 4 torch threads each",
                                     "n2: 1 ranks, 64 CPUs each, 64 torch threads each"]
    one_core = [place("n1", [0], 1) for _ in range(8)]
    lines = placement_lines(one_core)
    assert lines[0] == "n1: 8 ranks, 1 CPUs each, 1 torch threads each"
    assert "8 ranks on n1 share 1 CPU(s)" in lines[1] and "SRUN_CPUS_PER_TASK" in lines[1]


def test_an_environment_variable_that_differs_from_rank_0_is_named():
    same = [place("n1", [0], DS_ASLORA_CACHE="/shared/c"), place("n2", [0], DS_ASLORA_CACHE="/shared/c")]
    assert environment_problem(same) is None
    other = [place("n1", [0], DS_ASLORA_CACHE="/shared/c"), place("n2", [0])]
    message = environment_problem(other)
    assert message.startswith("DS_ASLORA_CACHE is '/shared/c' on rank 0 but None on rank 1 (host n2)")
    assert ".deepspeed_env" in message


def timeouts(rank):
    import torch
    import torch.distributed as dist

    from ds_aslora.train import dist_setup
    from ds_aslora.utils.ranks import object_group

    dist_setup.init_distributed(7)

    def timeout(group):
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()

    later = dist.new_group()  # as DeepSpeed creates its groups, with no timeout given
    os.environ["DS_ASLORA_CACHE"] = f"/cache/rank{rank}"  # one rank's launcher passed another value
    problem, _ = dist_setup.check_ranks()
    dist_setup.setup_barrier()
    return timeout(later), timeout(object_group()), problem


@pytest.mark.slow
def test_every_group_gets_the_collective_timeout_and_a_differing_variable_stops_all_ranks():
    results = run_ranks(timeouts, 2)
    assert [r[:2] for r in results] == [(420.0, 420.0)] * 2  # torch's default would be 1800 (gloo), 600 (NCCL)
    assert results[0][2] == results[1][2] and "DS_ASLORA_CACHE is '/cache/rank0' on rank 0 but '/cache/rank1'" \
        in results[0][2]


def late_rank_0(rank):
    import time
    from datetime import timedelta

    from ds_aslora.train import dist_setup

    # the job's groups, with a 3 s collective timeout and a 120 s setup wait
    dist_setup._connect_setup_group(timedelta(seconds=3), setup_wait=timedelta(seconds=120))
    if rank == 0:
        time.sleep(10)  # tokenising, past the collective timeout
    started = time.monotonic()
    dist_setup.setup_barrier()
    return time.monotonic() - started


@pytest.mark.slow
def test_ranks_waiting_for_rank_0s_setup_outlast_the_collective_timeout():
    """gloo's monitored barrier applies its timeout on rank 0 only: the others wait with their group's
    (they died after dist_timeout_minutes while rank 0 tokenised). The setup wait has a group of its own."""
    waited = run_ranks(late_rank_0, 2)
    assert waited[1] > 5  # rank 1 waited for rank 0, past the 3 s timeout


def unreachable(rank):
    from ds_aslora.train import dist_setup

    os.environ["GLOO_SOCKET_IFNAME"] = "no-such-if0"  # an interface gloo cannot use
    with pytest.raises(RuntimeError) as info:
        dist_setup.init_distributed(1)
    return str(info.value)


@pytest.mark.slow
def test_a_gloo_channel_that_cannot_connect_fails_at_once_naming_gloo_socket_ifname():
    for message in run_ranks(unreachable, 2, timeout=120):
        assert "could not connect to the other ranks over gloo" in message and "GLOO_SOCKET_IFNAME" in message


def test_a_job_whose_ranks_cannot_connect_exits_2_with_the_one_line_that_says_what_to_set(monkeypatch, capsys):
    from ds_aslora.train import job

    def unreachable(timeout_minutes):
        raise dist_setup.SetupChannelError("rank 1 on node7 could not connect to the other ranks over gloo (the "
                                           "job's setup channel): ... set GLOO_SOCKET_IFNAME")

    monkeypatch.setattr(job, "init_distributed", unreachable)
    closed = []
    monkeypatch.setattr(job, "close_distributed", lambda crashed=False: closed.append(crashed))
    status = job.main(["--deepspeed", os.path.join(ROOT, "ds_configs", "zero2.json"), "--model", "tiny"])
    assert status == 2 and closed == [False]
    assert capsys.readouterr().err.splitlines() == [
        "error: rank 1 on node7 could not connect to the other ranks over gloo (the job's setup channel): ... set "
        "GLOO_SOCKET_IFNAME"]

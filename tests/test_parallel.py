"""One process per visible GPU: every job runs once, results come back in job order, failures surface."""

import pytest

from aqsearch.parallel import JobFailed, run_per_gpu, visible_gpus
from parallel_jobs import init, job


def test_two_workers_share_the_queue_and_see_one_gpu_each():
    seen = []
    out = run_per_gpu(init, job, list(range(6)), gpus=["0", "1"], on_result=lambda i, r: seen.append(i))
    assert [r[0] for r in out] == [x * x for x in range(6)]  # in job order, whatever order they finished
    assert sorted(seen) == list(range(6))  # each reported once, as it finished
    assert {r[2] for r in out} <= {"0", "1"}  # every worker saw exactly one GPU
    assert len({(r[1], r[2]) for r in out}) >= 1 and all(r[1] != 0 for r in out)


def test_a_failed_job_raises_or_is_left_in_place():
    with pytest.raises(JobFailed, match="negative job"):
        run_per_gpu(init, job, [1, -1, 2], gpus=["0", "1"])
    out = run_per_gpu(init, job, [1, -1, 2], gpus=["0", "1"], keep_going=True)
    assert out[0][0] == 1 and isinstance(out[1], JobFailed) and out[2][0] == 4


def test_without_gpus_jobs_run_here_in_order(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    assert [r[0] for r in run_per_gpu(init, job, [3, 4], gpus=[])] == [9, 16]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]


def test_a_parent_on_gpus_2_and_3_hands_its_workers_2_and_3(monkeypatch):
    """Catches workers mapped to ``k % gpus`` (a parent on GPUs 2,3 sent them to GPUs 0 and 1): the
    environment each spawned worker receives keeps the parent's own entries."""
    from aqsearch.parallel import start_workers, worker_slots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    slots = worker_slots()
    assert slots == ["2", "3"]
    got = start_workers(init, job, slots).wait()  # each worker runs job(init(), None) once
    assert sorted(r[2] for r in got) == ["2", "3"]

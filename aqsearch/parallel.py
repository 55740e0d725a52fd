"""Many jobs, one process per visible GPU: what trains many things (uniform tables, the bank) runs on.

Jobs stacked on one GPU each ran 2-3x slower than alone on an H200 (FIELD-NOTES), so there is never
more than one worker a GPU. Each worker is a fresh process (``spawn``) that sees exactly one GPU
(``CUDA_VISIBLE_DEVICES``), sets itself up once with ``init()`` (load the model, the data) and then
takes jobs from a shared queue until it is empty: a long job on one GPU does not hold the others up.
Without a GPU the jobs run here, in order, in this process.

>>> def init(): return 10
>>> def add(state, job): return state + job
>>> run_per_gpu(init, add, [1, 2, 3], gpus=[])
[11, 12, 13]
"""

from __future__ import annotations

import os
import queue
import sys
import traceback
from typing import Any, Callable, Sequence


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (``[]`` without CUDA)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in (s.strip() for s in env.split(",")) if g and g != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def worker_slots(workers: int | None = None) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` entry each worker process gets: one per visible GPU (at most
    ``workers``), keeping the parent's own entries (a parent on GPUs 2,3 hands out ``"2"`` and ``"3"``);
    without a GPU, ``workers`` CPU workers (entry ``""``: no GPU), default one. (tests/test_parallel.py
    checks the entries worker processes receive.)
    """
    gpus = visible_gpus()
    if gpus:
        return gpus[: workers or len(gpus)]
    return [""] * (workers or 1)


class JobFailed(RuntimeError):
    """A job raised in a worker; the message carries the worker's traceback."""


def _worker(gpu: str, init, fn, jobs, results) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before anything touches CUDA in this process
    try:
        state = init()
    except BaseException:
        results.put((None, "init", traceback.format_exc()))
        return
    while True:
        try:
            i, job = jobs.get(timeout=2)  # not get_nowait: the parent's queue may not be flushed yet
        except queue.Empty:
            return
        try:
            results.put((i, "ok", fn(state, job)))
        except BaseException:
            results.put((i, "error", traceback.format_exc()))


def run_per_gpu(init: Callable[[], Any], fn: Callable[[Any, Any], Any], jobs: Sequence[Any],
                gpus: Sequence[str] | None = None, on_result: Callable[[int, Any], None] | None = None,
                keep_going: bool = False) -> list[Any]:
    """``[fn(state, job) for job in jobs]``, ``state = init()`` once a worker, one worker a GPU.

    ``init`` and ``fn`` must be importable module-level functions (they cross into spawned
    processes). ``on_result(i, result)`` is called here as each job finishes (write it to disk: a
    crash later loses nothing). A failed job raises :class:`JobFailed`, or with ``keep_going`` leaves
    a :class:`JobFailed` in its place in the results.
    """
    gpus = visible_gpus() if gpus is None else list(gpus)
    out: list[Any] = [None] * len(jobs)
    if len(gpus) <= 1 or len(jobs) <= 1:
        if gpus and gpus[0]:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]
        state = init()
        for i, job in enumerate(jobs):
            try:
                out[i] = fn(state, job)
            except Exception as e:
                if not keep_going:
                    raise
                out[i] = JobFailed(f"job {i} failed: {e!r}")
            if on_result is not None:
                on_result(i, out[i])
        return out
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    jq, rq = ctx.Queue(), ctx.Queue()
    for i, job in enumerate(jobs):
        jq.put((i, job))
    procs = [ctx.Process(target=_worker, args=(g, init, fn, jq, rq), daemon=True) for g in gpus[: len(jobs)]]
    for p in procs:
        p.start()
    left = len(jobs)
    try:
        while left:
            try:
                i, status, val = rq.get(timeout=5)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    raise JobFailed(f"every worker exited with {left} job(s) left (killed, or out of memory?)")
                continue
            if status == "init":
                print(f"aqsearch: a worker failed to start:\n{val}", file=sys.stderr)
                continue
            left -= 1
            if status == "error":
                if not keep_going:
                    raise JobFailed(f"job {i} failed in its worker:\n{val}")
                val = JobFailed(val)
            out[i] = val
            if on_result is not None:
                on_result(i, val)
    finally:
        for p in procs:
            if p.is_alive() and left:
                p.terminate()
            p.join(timeout=10)
    return out


class Workers:
    """Processes started by :func:`start_workers`; :meth:`wait` joins them and raises on a failure."""

    def __init__(self, procs, results):
        self.procs, self.results = procs, results

    def wait(self) -> list[Any]:
        out, errors = [], []
        left = len(self.procs)
        while left:  # read before joining: a worker's result must leave its queue for it to exit
            try:
                _, status, val = self.results.get(timeout=5)
            except queue.Empty:
                if not any(p.is_alive() for p in self.procs):
                    errors.append(f"{left} worker(s) exited without a result (killed, or out of memory?)")
                    break
                continue
            left -= 1
            (out if status == "ok" else errors).append(val)
        for p in self.procs:
            p.join()
        if errors:
            raise JobFailed(f"a worker failed:\n{errors[0]}")
        return out


def start_workers(init: Callable[[], Any], fn: Callable[[Any, Any], Any], slots: Sequence[str]) -> Workers:
    """Start one process per slot (a ``CUDA_VISIBLE_DEVICES`` entry, ``""`` for a CPU worker) running
    ``fn(init(), None)`` once, and return at once; the caller works beside them, then calls ``wait()``."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    rq = ctx.Queue()
    procs = [ctx.Process(target=_worker_once, args=(g, init, fn, rq, i), daemon=True) for i, g in enumerate(slots)]
    for p in procs:
        p.start()
    return Workers(procs, rq)


def _worker_once(gpu: str, init, fn, results, i: int) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before anything touches CUDA in this process
    try:
        results.put((i, "ok", fn(init(), None)))
    except BaseException:
        results.put((i, "error", traceback.format_exc()))

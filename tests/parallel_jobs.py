"""Module-level jobs for tests/test_parallel.py (spawned workers import them by name)."""

import os


def init():
    return {"pid": os.getpid(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}


def job(state, x):
    if x is None:  # start_workers runs each worker's job once, with no argument
        x = 0
    if x < 0:
        raise ValueError(f"negative job {x}")
    return x * x, state["pid"], state["gpu"]

"""Kernel tests run compiled on a CUDA GPU, or under Triton's CPU interpreter without one.

``TRITON_INTERPRET`` must be set before the kernel modules are imported (``triton.jit`` reads it
when it decorates), so it is set here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE

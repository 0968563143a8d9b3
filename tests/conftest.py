"""Test-wide setup: without CUDA, Triton kernels run in Triton's interpreter on CPU tensors, and tests marked
``gpu`` (they live beside the CPU tests of their op) are skipped with the reason."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # must be set before any @triton.jit kernel is defined; infofuse imports its Triton kernels lazily
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

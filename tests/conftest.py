"""Test-wide setup: without CUDA, Triton kernels run in Triton's interpreter on CPU tensors."""

import os

import torch

if not torch.cuda.is_available():
    # must be set before any @triton.jit kernel is defined; infofuse imports its Triton kernels lazily
    os.environ.setdefault("TRITON_INTERPRET", "1")

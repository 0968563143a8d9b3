"""Triton kernels of infofuse, installed as ``infofuse.triton_kernels``.

Each module holds ``@triton.jit`` kernels and the launcher that allocates outputs, checks layouts, builds the
grid and passes every stride. Triton is imported lazily by the backends that use these kernels, so the package
imports without it. The GPU backends of linear cross-entropy land here with the GPU issue.
"""

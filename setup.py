"""Build infofuse, with its C++ extension ``infofuse._C`` when torch is installed in the build environment.

With torch (``pip install --no-build-isolation .``, what the Makefile does), the extension is built ahead of time
against that torch. The CPU extension is always built; CUDA sources under ``csrc/cuda`` are added only where nvcc
and a CUDA build of torch are both present (decided from ``CUDA_HOME`` and ``torch.version.cuda``, never from
``torch.cuda.is_available()``, so that a GPU-less build machine can still build CUDA code).

Without torch (``pip install .`` or ``pip wheel .`` with build isolation, whose build environment has none), the
wheel is pure Python: the package, its Triton kernels and the C++/CUDA sources as package data (``infofuse/csrc``),
from which the extension is compiled at first use against the torch found then (python/infofuse/_jit.py).

Sources and flags are those of python/infofuse/_jit.py, shared by both builds. Environment:
  INFOFUSE_SKIP_CUDA_BUILD=1   never build CUDA sources.
  INFOFUSE_CUDA_ARCHS="80;90a" compute capabilities to build for (default: 80;90a).
  MAX_JOBS=N                   parallel compile jobs (default: bounded by cores and memory).
"""

import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_settings():
    """python/infofuse/_jit.py by its path: importing the package would need torch."""
    spec = importlib.util.spec_from_file_location("_infofuse_jit", os.path.join(ROOT, "python", "infofuse", "_jit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build_settings()

try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    torch = None


def get_extensions():
    csrc = "csrc"  # relative to the project directory, where pip runs setup.py
    cxx_flags = list(build.CXX_FLAGS)
    extra_link = list(build.LD_FLAGS)
    if build.cuda_wanted(csrc):
        nvcc_flags = [*build.NVCC_FLAGS, *build.cuda_arch_flags()]
        ext = CUDAExtension(
            "infofuse._C",
            build.cpu_sources(csrc) + build.cuda_sources(csrc),
            define_macros=[build.CUDA_DEFINE],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link,
        )
    else:
        ext = CppExtension(
            "infofuse._C",
            build.cpu_sources(csrc),
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link,
        )
    return [ext]


if torch is None:
    print(
        "infofuse: no torch in the build environment: building a pure-Python wheel; the C++ extension compiles at "
        "first use (for an ahead-of-time build: install torch, then pip install --no-build-isolation .)",
        file=sys.stderr,
    )
    setup()
else:
    os.environ.setdefault("MAX_JOBS", build.max_jobs())
    setup(
        ext_modules=get_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )

"""Build infofuse and its C++ extension ``infofuse._C``.

The CPU extension is always built. CUDA sources under ``csrc/cuda`` are added only where nvcc and a CUDA
build of torch are both present (decided from ``CUDA_HOME`` and ``torch.version.cuda``, never from
``torch.cuda.is_available()``, so that a GPU-less build machine can still build CUDA code).

Environment:
  INFOFUSE_SKIP_CUDA_BUILD=1   never build CUDA sources.
  INFOFUSE_CUDA_ARCHS="80;90a" compute capabilities to build for (default: 80;90a).
  MAX_JOBS=N                   parallel compile jobs (default: bounded by cores and memory).

torch must already be installed: build with ``pip install --no-build-isolation -e .``.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - a build-time message, not library code
    sys.exit(
        "infofuse builds against the torch that is already installed. Install torch first "
        "(on a CPU-only machine: pip install torch==2.13.0), then: pip install --no-build-isolation -e ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _max_jobs() -> str:
    """Cap parallel compile jobs: each torch translation unit needs ~1.5 GB of memory."""
    if "MAX_JOBS" in os.environ:
        return os.environ["MAX_JOBS"]
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8.0
    return str(max(1, min(os.cpu_count() or 1, int(mem_gb // 2))))


def _cuda_wanted() -> bool:
    if os.environ.get("INFOFUSE_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return False
    if CUDA_HOME is None or torch.version.cuda is None:
        return False
    return bool(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _cuda_arch_flags() -> list[str]:
    archs = os.environ.get("INFOFUSE_CUDA_ARCHS", "80;90a")
    flags = []
    for arch in filter(None, (a.strip() for a in archs.replace(",", ";").split(";"))):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def get_extensions():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    define_macros = []
    extra_link = ["-fopenmp"]
    if _cuda_wanted():
        sources = cpu_sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", *_cuda_arch_flags()]
        ext = CUDAExtension(
            "infofuse._C",
            sources,
            define_macros=[*define_macros, ("INFOFUSE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link,
        )
    else:
        ext = CppExtension(
            "infofuse._C",
            cpu_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link,
        )
    return [ext]


os.environ.setdefault("MAX_JOBS", _max_jobs())

setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

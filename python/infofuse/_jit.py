"""How the C++ extension is built: ahead of time by setup.py, or at first use by ``torch.utils.cpp_extension.load``.

setup.py loads this file by its path (a build without torch must still read it), so at module level it imports
nothing but the standard library. One set of sources and flags serves both builds: the CPU sources always; the
CUDA sources only where nvcc (``CUDA_HOME``) and a CUDA build of torch are both present, never decided by
``torch.cuda.is_available()``.

Environment:
  INFOFUSE_SKIP_CUDA_BUILD=1   never build CUDA sources.
  INFOFUSE_CUDA_ARCHS="80;90a" compute capabilities to build for (default: 80;90a).
  MAX_JOBS=N                   parallel compile jobs (default: bounded by cores and memory).
  TORCH_EXTENSIONS_DIR         where first-use builds are cached (default: torch's, ~/.cache/torch_extensions).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import math
import os
import re
import shutil
import sys

CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math"]
CUDA_DEFINE = ("INFOFUSE_WITH_CUDA", "1")
_SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
# CPU seconds of the ahead-of-time build's five translation units on a 2-core EPYC (.ninja_log), for the estimate
# printed before a first-use build; the largest one bounds it from below however many jobs run.
_CPU_SECONDS, _LONGEST_SECONDS = 190.0, 60.0


def csrc_dir() -> str | None:
    """The C++/CUDA sources: shipped in the package (a wheel), else the checkout's csrc/ (an editable install)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "csrc"), os.path.join(here, os.pardir, os.pardir, "csrc")):
        if os.path.isfile(os.path.join(candidate, "infofuse.cpp")):
            return os.path.normpath(candidate)
    return None


def cpu_sources(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "*.cpp")) + glob.glob(os.path.join(root, "cpu", "*.cpp")))


def cuda_sources(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "cuda", "*.cu")))


def cuda_wanted(root: str) -> bool:
    """Build the CUDA sources: not skipped by INFOFUSE_SKIP_CUDA_BUILD, nvcc found, torch built with CUDA."""
    if os.environ.get("INFOFUSE_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or torch.version.cuda is None:
        return False
    return bool(cuda_sources(root))


def cuda_arch_flags() -> list[str]:
    archs = os.environ.get("INFOFUSE_CUDA_ARCHS", "80;90a")
    return [
        f"-gencode=arch=compute_{arch},code=sm_{arch}"
        for arch in filter(None, (a.strip() for a in archs.replace(",", ";").split(";")))
    ]


def max_jobs() -> str:
    """Cap parallel compile jobs: each torch translation unit needs ~1.5 GB of memory."""
    if "MAX_JOBS" in os.environ:
        return os.environ["MAX_JOBS"]
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8.0
    return str(max(1, min(os.cpu_count() or 1, int(mem_gb // 2))))


def extension_name(root: str, with_cuda: bool) -> str:
    """``infofuse_C_py311_torch2_13_0_cpu_<hash>``: one cached build per Python, torch and (sources, flags)."""
    import torch

    digest = hashlib.sha256()
    files = sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, _, names in os.walk(root)
        for f in names
        if f.endswith(_SOURCE_SUFFIXES)
    )
    for rel in files:
        digest.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as fh:
            digest.update(fh.read() + b"\0")
    flags = [*CXX_FLAGS, *LD_FLAGS] + ([*NVCC_FLAGS, *cuda_arch_flags(), "=".join(CUDA_DEFINE)] if with_cuda else [])
    digest.update(repr(flags).encode())
    torch_tag = re.sub(r"\W", "_", torch.__version__)
    return f"infofuse_C_py{sys.version_info.major}{sys.version_info.minor}_torch{torch_tag}_{digest.hexdigest()[:12]}"


def build_root() -> str:
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def _import_built(name: str, path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load():
    """The extension module, compiled on the first call for this torch and these sources, then loaded from the cache.

    Prints one line to stderr when it compiles. Raises (RuntimeError, OSError, ...) if it cannot build or load.
    """
    import torch
    from torch.utils import cpp_extension

    root = csrc_dir()
    if root is None:
        raise FileNotFoundError("the C++ sources (infofuse/csrc) are not installed beside the package")
    with_cuda = cuda_wanted(root)
    name = extension_name(root, with_cuda)
    build_dir = os.path.join(build_root(), name)
    library = os.path.join(build_dir, name + (".pyd" if sys.platform == "win32" else ".so"))
    lock = os.path.join(build_dir, "lock")
    # A finished build of exactly these sources loads without ninja (whose timestamps a reinstall would refresh).
    # A library that does not load while a lock file exists is one that another process is still linking.
    if os.path.isfile(library):
        try:
            return _import_built(name, library)
        except ImportError:
            if not os.path.exists(lock):
                raise
    jobs = max_jobs()
    minutes = max(1, math.ceil(max(_CPU_SECONDS / max(1, int(jobs)), _LONGEST_SECONDS) / 60))
    if os.path.exists(lock):
        line = (
            f"infofuse: waiting for another process's build of the C++ extension in {build_dir} "
            f"(if none is running, one was interrupted: remove {lock})"
        )
    else:
        line = (
            f"infofuse: compiling the C++ extension for torch {torch.__version__}{' with CUDA' if with_cuda else ''} "
            f"(first use, ~{minutes} min) into {build_dir} ..."
        )
    print(line, file=sys.stderr, flush=True)
    os.makedirs(build_dir, exist_ok=True)
    sources = cpu_sources(root) + (cuda_sources(root) if with_cuda else [])
    with _environ(MAX_JOBS=jobs, PATH=_path_with_ninja()):
        return cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=CXX_FLAGS + (["-D{}={}".format(*CUDA_DEFINE)] if with_cuda else []),
            extra_cuda_cflags=[*NVCC_FLAGS, *cuda_arch_flags(), "-D{}={}".format(*CUDA_DEFINE)] if with_cuda else None,
            extra_ldflags=LD_FLAGS,
            build_directory=build_dir,
            with_cuda=with_cuda,
            is_python_module=True,
        )


def _path_with_ninja() -> str:
    """PATH, with the ``ninja`` package's binary appended when none is on it (a venv used without activating)."""
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        try:
            import ninja

            path = os.pathsep.join(filter(None, (path, ninja.BIN_DIR)))
        except (ImportError, AttributeError):
            pass
    return path


@contextlib.contextmanager
def _environ(**updates: str):
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

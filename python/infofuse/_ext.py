"""Loading of the compiled extension: the ahead-of-time build ``infofuse._C``, else a build at first use.

``import infofuse`` never compiles and never fails because the extension is missing or broken: it only tries to
import ``infofuse._C`` (built by ``pip install --no-build-isolation``). Where that module is absent (a pure-Python
wheel), the first call that asks for the extension — ``cpp_available()``, ``require_cpp()``, ``build_info()``,
which the CPU/CUDA backends call when they dispatch — compiles it with ``torch.utils.cpp_extension.load``
(``_jit.py``: cached per Python, torch version and source hash under ``TORCH_EXTENSIONS_DIR``), unless
``INFOFUSE_NO_JIT=1``. If that fails, the backends that need it report why when asked for (the way xformers'
``_cpp_lib`` does). The op schemas are defined by the Python op modules, which ``import infofuse`` has imported
before any backend asks, so the extension's ``TORCH_LIBRARY_IMPL`` blocks always find them.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading

import torch  # (loads libtorch/libc10, which the extension links against)

_C = None
_LOAD_ERROR: str | None = None
_BUILD: str | None = None  # "ahead-of-time" or "first use (<path>)"
# False until loading has been settled: at import when infofuse._C is there (loaded or broken), else at first use.
# A plain bool, so that torch.compile can guard on it where a first use happens inside a compiled function.
_TRIED = True
_LOCK = threading.Lock()

try:
    _C = importlib.import_module("infofuse._C")
    _BUILD = "ahead-of-time"
except ModuleNotFoundError as exc:
    if exc.name == "infofuse._C":  # no ahead-of-time build: build at first use
        _TRIED = False
    else:  # the module is there but something it imports is not
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
except Exception as exc:  # an undefined symbol from a torch ABI mismatch: rebuild, rather than build a second copy
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"


# A first use inside torch.compile (fullgraph too) runs the build at trace time rather than tracing it.
@torch.compiler.assume_constant_result
def _load() -> bool:
    """Build and load the extension at first use when there is no ahead-of-time build (once a process)."""
    global _C, _LOAD_ERROR, _BUILD, _TRIED
    with _LOCK:
        if not _TRIED and _C is None and _LOAD_ERROR is None:
            _C, _LOAD_ERROR, _BUILD = _build_at_first_use()
        _TRIED = True
        return _C is not None


def _build_at_first_use():
    """(module, error, how) of the build at first use; prints one line to stderr if it fails."""
    if os.environ.get("INFOFUSE_NO_JIT", "0") not in ("", "0"):
        return None, "no ahead-of-time build infofuse._C, and INFOFUSE_NO_JIT=1 turns off the build at first use", None
    from . import _jit

    try:
        module = _jit.load()
    except Exception as exc:  # a compiler error, no compiler or ninja, no sources: the backends say why
        message = str(exc).strip()
        if len(message) > 4000:
            message = "..." + message[-4000:]
        print(
            "infofuse: building the C++ extension failed (infofuse.build_info() says why)", file=sys.stderr, flush=True
        )
        return None, f"no ahead-of-time build infofuse._C, and the build at first use failed: {message}", None
    return module, None, f"first use ({module.__file__})"


def cpp_available() -> bool:
    """Whether the C++ extension is loaded (its ops are under ``torch.ops.infofuse``); builds it at first use."""
    if not _TRIED:
        return _load()
    return _C is not None


def require_cpp(backend: str) -> None:
    """Raise a clear ``RuntimeError`` if ``backend`` needs the extension and it did not load."""
    if not cpp_available():
        raise RuntimeError(
            f"infofuse backend {backend!r} needs the compiled extension infofuse._C, which did not load "
            f"({_LOAD_ERROR}). Build it ahead of time with `pip install --no-build-isolation .` against the "
            "installed torch, or pass impl='reference'."
        )


def build_info() -> dict:
    """How the extension was built (ahead of time or at first use; OpenMP, CUDA, torch version), or why it is
    missing."""
    if not cpp_available():
        return {"loaded": False, "error": _LOAD_ERROR}
    return {"loaded": True, "build": _BUILD, **_C.build_info()}

"""Loading of the compiled extension ``infofuse._C``.

``import infofuse`` never fails because the extension is missing or broken: the backends that need it report
why they are unavailable when they are asked for (the way xformers' ``_cpp_lib`` does).
"""

from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libtorch/libc10, which infofuse._C links against)

_C = None
_LOAD_ERROR: str | None = None

try:
    _C = importlib.import_module("infofuse._C")
except Exception as exc:  # ImportError, or an undefined symbol from a torch ABI mismatch
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def cpp_available() -> bool:
    """Whether the C++ extension ``infofuse._C`` is loaded (its ops are under ``torch.ops.infofuse``)."""
    return _C is not None


def require_cpp(backend: str) -> None:
    """Raise a clear ``RuntimeError`` if ``backend`` needs the extension and it did not load."""
    if _C is None:
        raise RuntimeError(
            f"infofuse backend {backend!r} needs the compiled extension infofuse._C, which did not load "
            f"({_LOAD_ERROR}). Build it with `pip install --no-build-isolation -e .` against the installed "
            "torch, or pass impl='reference'."
        )


def build_info() -> dict:
    """How the extension was built (OpenMP, CUDA, torch version), or why it is missing."""
    if _C is None:
        return {"loaded": False, "error": _LOAD_ERROR}
    return {"loaded": True, **_C.build_info()}

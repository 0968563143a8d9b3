"""Benchmarks of infofuse's ops beside their peers: ``python -m infofuse bench``.

Each op has a *case* module here that says how to build its inputs, which peers to run and how to compute its
ground truth; ``harness`` does the rest (timing, memory, accuracy, table, JSON rows, plot) the same way for every
op. Cases are imported lazily so that the worker processes that measure memory load only what they need.
"""

from __future__ import annotations

import importlib

__all__ = ["case_names", "get_case"]

# op name -> module in this package that defines ``CASE``
_CASES = {
    "linear_cross_entropy": "linear_cross_entropy",
    "linear_log_probs": "linear_log_probs",
    "info_nce": "info_nce",
    "knn_entropy": "knn",
    "linear_kl_divergence": "kl_divergence",
}


def case_names() -> list[str]:
    """The ops that have a benchmark case, in the order they are run."""
    return list(_CASES)


def get_case(op: str):
    """The ``harness.Case`` of ``op``."""
    if op not in _CASES:
        raise KeyError(f"no benchmark case for op {op!r}; known: {', '.join(_CASES)}")
    return importlib.import_module(f"{__name__}.{_CASES[op]}").CASE

"""The ``infofuse`` torch library: every op's schema is defined here, once, from Python.

The C++ extension (csrc/) only registers implementations (``TORCH_LIBRARY_IMPL(infofuse, CPU/CUDA, m)``) for ops
whose schemas these modules define; the Triton backends register theirs from Python. A backend shares an op
family's schema by formatting one template with its own op name.
"""

from __future__ import annotations

import torch

LIB = torch.library.Library("infofuse", "FRAGMENT")


def define(template: str, name: str) -> str:
    """Define ``infofuse::<name>`` from a schema template whose op name is ``{name}``; returns the qualified name."""
    LIB.define(template.format(name=name))
    return f"infofuse::{name}"

"""Every infofuse op has one schema, defined from Python (``infofuse._ops._library``); C++ only implements."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import infofuse
from infofuse._ops._library import LIB

ROOT = Path(__file__).resolve().parent.parent


def test_csrc_defines_no_schema():
    sources = [p for ext in ("cpp", "h", "cu", "cuh") for p in (ROOT / "csrc").glob(f"**/*.{ext}")]
    assert sources
    for path in sources:
        text = path.read_text()
        assert not re.search(r"\bTORCH_LIBRARY\s*\(", text), f"{path.relative_to(ROOT)} defines a torch library"
        # a schema string starts with the op's name and its argument list; pybind's m.def("name", fn) does not
        assert not re.search(r"\bm\.def\s*\(\s*\"\w+\(", text), f"{path.relative_to(ROOT)} declares a schema"


def test_every_op_is_defined_by_the_python_library():
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("infofuse::")}
    assert registered, "no infofuse op is registered"
    assert registered == set(LIB._op_defs), (
        f"ops without a Python schema: {sorted(registered - set(LIB._op_defs))}; "
        f"defined but not registered: {sorted(set(LIB._op_defs) - registered)}"
    )


def test_cpu_kernels_of_the_extension_attach_to_the_python_schemas():
    if not infofuse.cpp_available():
        pytest.skip(f"the extension did not load: {infofuse.build_info()}")
    for name in (
        "linear_cross_entropy_forward",
        "linear_kl_divergence_forward",
        "info_nce_forward",
        "siglip_forward",
        "knn",
        "knn_count",
    ):
        op = getattr(torch.ops.infofuse, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), f"{name} has no CPU kernel"


def test_optional_options_are_optional_arguments_not_sentinels():
    """softcap and chunk_size are ``float?`` / ``int?`` in every linear cross-entropy op (None: off / chosen by the
    backend), not the 0-means-off numbers they once were; the C++ kernel refuses the old sentinels."""
    ops = [n for n in LIB._op_defs if n.startswith("infofuse::linear_cross_entropy")]
    assert len(ops) >= 8, ops
    for name in ops:
        schema = getattr(torch.ops.infofuse, name.split("::")[1]).default._schema
        types = {a.name: str(a.type) for a in schema.arguments}
        assert types["softcap"] == "Optional[float]" and types["chunk_size"] == "Optional[int]", (name, types)
    if infofuse.cpp_available():
        x, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
        op = torch.ops.infofuse.linear_cross_entropy_forward
        with pytest.raises(ValueError, match="softcap must be None or > 0"):
            op(x, w, t, None, None, 1, -100, 0.0, 0.0, 0.0, None, False, False, False, False)
        with pytest.raises(ValueError, match="chunk_size must be None or >= 1"):
            op(x, w, t, None, None, 1, -100, 0.0, 0.0, None, 0, False, False, False, False)
        loss, *_ = op(x, w, t, None, None, 1, -100, 0.0, 0.0, None, None, False, False, False, False)
        assert torch.allclose(loss, torch.nn.functional.cross_entropy(x @ w.T, t))

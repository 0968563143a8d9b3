"""Bad input gets a clear ValueError/TypeError before any kernel runs; a missing extension is explained."""

from __future__ import annotations

import sys

import pytest
import torch

import infofuse
from infofuse import _ext, linear_cross_entropy

IMPLS = ["reference", "chunked", "fused"] + (["cpu"] if infofuse.cpp_available() else [])


def good(**over):
    g = torch.Generator().manual_seed(0)
    kw = {
        "input": torch.randn(6, 4, generator=g),
        "linear_weight": torch.randn(10, 4, generator=g),
        "target": torch.randint(0, 10, (6,), generator=g),
    }
    kw.update(over)
    return kw


def call(impl, **over):
    kw = good(**over)
    args = [kw.pop(k) for k in ("input", "linear_weight", "target")]
    return linear_cross_entropy(*args, impl=impl, **kw)


BAD = [
    ("input_not_tensor", {"input": [[1.0]]}, TypeError, "input must be a torch.Tensor"),
    ("input_0d", {"input": torch.tensor(1.0), "target": torch.tensor(0)}, ValueError, "input must have shape (..., D)"),
    ("weight_1d", {"linear_weight": torch.randn(10)}, ValueError, "linear_weight must be 2-D (V, D)"),
    ("d_mismatch", {"linear_weight": torch.randn(10, 5)}, ValueError, "D = input.shape[-1] = 4"),
    ("target_shape", {"target": torch.zeros(5, dtype=torch.long)}, ValueError, "target must have shape"),
    ("target_float_wrong_shape", {"target": torch.rand(6)}, ValueError, r"class-probability target must have shape"),
    ("target_bool", {"target": torch.ones(6, dtype=torch.bool)}, TypeError, "target must hold integer class indices"),
    ("soft_target_with_ignore_index", {"target": torch.rand(6, 10), "ignore_index": -100}, ValueError, "ignore_index"),
    ("token_weight_shape", {"token_weight": torch.rand(5)}, ValueError, r"token_weight must have shape"),
    (
        "token_weight_int",
        {"token_weight": torch.ones(6, dtype=torch.int64)},
        TypeError,
        "token_weight must be floating",
    ),
    ("options_type", {"options": {"batch_chunk_size": 2}}, TypeError, "options must be None or"),
    ("target_bool", {"target": torch.zeros(6, dtype=torch.bool)}, TypeError, "target must hold integer"),
    ("target_high", {"target": torch.tensor([0, 1, 10, 2, 3, 4])}, ValueError, "target[2] (flattened) = 10"),
    ("target_negative", {"target": torch.tensor([0, -1, 1, 2, 3, 4])}, ValueError, "outside [0, V) with V = 10"),
    ("input_int", {"input": torch.ones(6, 4, dtype=torch.int32)}, TypeError, "input must be float32, bfloat16"),
    (
        "dtype_mismatch",
        {"linear_weight": torch.randn(10, 4, dtype=torch.float64)},
        TypeError,
        "linear_weight must have input's dtype",
    ),
    ("bias_shape", {"linear_bias": torch.randn(9)}, ValueError, "linear_bias must have shape (V,) = (10,)"),
    ("bias_dtype", {"linear_bias": torch.randn(10, dtype=torch.float64)}, TypeError, "linear_bias must have input's"),
    ("weight_shape", {"weight": torch.rand(11)}, ValueError, "weight (class weights) must have shape (V,)"),
    ("weight_int", {"weight": torch.ones(10, dtype=torch.long)}, TypeError, "must be floating point"),
    ("weight_grad", {"weight": torch.rand(10, requires_grad=True)}, ValueError, "receives no gradient"),
    (
        "mixed_devices",
        {"target": torch.zeros(6, dtype=torch.long, device="meta")},
        ValueError,
        "all tensors must be on one device",
    ),
    ("reduction", {"reduction": "avg"}, ValueError, "reduction must be 'none', 'mean' or 'sum'"),
    ("ignore_index_float", {"ignore_index": 1.5}, TypeError, "ignore_index must be None or an int"),
    ("smoothing_high", {"label_smoothing": 1.5}, ValueError, "label_smoothing must be a float in [0, 1]"),
    ("smoothing_negative", {"label_smoothing": -0.1}, ValueError, "label_smoothing must be a float in [0, 1]"),
    ("z_loss_negative", {"z_loss": -1e-4}, ValueError, "z_loss must be a finite float >= 0"),
    ("z_loss_nan", {"z_loss": float("nan")}, ValueError, "z_loss must be a finite float >= 0"),
    ("softcap_zero", {"softcap": 0.0}, ValueError, "softcap must be None or a finite float > 0"),
    ("softcap_negative", {"softcap": -2.0}, ValueError, "softcap must be None or a finite float > 0"),
    ("chunk_size_zero", {"chunk_size": 0}, ValueError, "chunk_size must be None or an int >= 1"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,over,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_rejected(impl, name, over, exc, msg):
    with pytest.raises(exc) as info:
        call(impl, **over)
    assert msg in str(info.value), f"{name}: message {str(info.value)!r} lacks {msg!r}"


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl must be None, 'cpu', 'chunked', 'fused' or 'reference'"):
        call("triton-ish")


@pytest.mark.skipif(not infofuse.cpp_available(), reason="needs the C++ extension infofuse._C")
def test_kernel_checks_targets_itself():
    """The C++ kernel rejects an out-of-range target with ValueError too (the path torch.compile takes)."""
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    t = torch.tensor([0, 7, 1])
    with pytest.raises(ValueError, match=r"target\[1\] = 7 is outside \[0, V\) with V = 5"):
        torch.ops.infofuse.linear_cross_entropy_forward(
            x, w, t, None, None, 1, -100, 0.0, 0.0, None, None, False, False, False, False
        )


@pytest.mark.skipif(not infofuse.cpp_available(), reason="needs the C++ extension infofuse._C")
def test_cpu_impl_rejects_other_devices():
    x = torch.randn(3, 4, device="meta")
    w = torch.randn(5, 4, device="meta")
    t = torch.zeros(3, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="impl='cpu' needs CPU tensors"):
        linear_cross_entropy(x, w, t, impl="cpu")


def test_int32_target_and_ignore_index_none_are_accepted():
    kw = good()
    t32 = kw["target"].to(torch.int32)
    for impl in IMPLS:
        a = linear_cross_entropy(kw["input"], kw["linear_weight"], t32, impl=impl, ignore_index=None)
        b = linear_cross_entropy(kw["input"], kw["linear_weight"], kw["target"], impl=impl)
        assert torch.equal(a, b)


def test_missing_extension_is_explained(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_LOAD_ERROR", "ImportError: pretend it is missing")
    assert not _ext.cpp_available()
    assert "cpu" not in infofuse.available_impls("cpu") and infofuse.available_impls("cpu")[0] == "reference"
    with pytest.raises(RuntimeError, match="needs the compiled extension infofuse._C.*pretend it is missing"):
        call("cpu")
    monkeypatch.setattr(sys.modules["infofuse.linear_cross_entropy"], "_warned_fallback", set())
    with pytest.warns(RuntimeWarning, match="using impl='reference'"):
        loss = call(None)
    assert torch.isfinite(loss)
    assert infofuse.build_info() == {"loaded": False, "error": "ImportError: pretend it is missing"}


def test_chunked_rejects_float64():
    kw = good(input=torch.randn(6, 4, dtype=torch.float64), linear_weight=torch.randn(10, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="impl='chunked' takes float32, bfloat16 or float16 inputs"):
        call("chunked", **{k: kw[k] for k in ("input", "linear_weight")})


def test_chunked_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="impl='chunked' cannot run: the Triton backends need CUDA tensors"):
        call("chunked")

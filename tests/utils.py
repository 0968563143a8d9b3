"""Comparison helpers for infofuse's tests: errors graded against precision-matched references."""

from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (the absolute error if expected is zero)."""
    a = actual.detach().double()
    e = expected.detach().double()
    diff = torch.linalg.vector_norm(a - e).item()
    scale = torch.linalg.vector_norm(e).item()
    return diff / scale if scale > 0 else diff


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, limit: int = 5) -> str:
    """Where and how two tensors differ: worst indices with both values, NaN/inf counts."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    lines = [f"shape {tuple(a.shape)}; dtype {actual.dtype} vs {expected.dtype}"]
    for name, t in (("actual", a), ("expected", e)):
        n_nan, n_inf = int(t.isnan().sum()), int(t.isinf().sum())
        if n_nan or n_inf:
            lines.append(f"{name}: {n_nan} NaN, {n_inf} inf")
    err = (a - e).abs()
    bad = (err > atol + rtol * e.abs()) | (a.isnan() != e.isnan())
    lines.append(f"{int(bad.sum())} of {a.numel()} elements outside atol={atol:g} rtol={rtol:g}")
    flat = err.nan_to_num(float("inf")).reshape(-1)
    for idx in flat.argsort(descending=True)[:limit].tolist():
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape)) if a.dim() else ()
        lines.append(f"  at {where}: actual {a.reshape(-1)[idx].item():.9g}, expected {e.reshape(-1)[idx].item():.9g}")
    return "\n".join(lines)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, name: str = "") -> None:
    """Elementwise |actual − expected| <= atol + rtol·|expected| (NaN only where expected has NaN)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    ok = torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True).all().item()
    assert ok, f"{name} differs:\n{describe_mismatch(actual, expected, rtol, atol)}"


def assert_graded(
    ours: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    truth: torch.Tensor,
    *,
    name: str,
    factor: float = 2.0,
    floor: float = 0.0,
) -> None:
    """err(ours) <= factor · err(PyTorch at the same dtype) + floor, both against a float64 truth."""
    e_ours = rel_err(ours, truth)
    e_torch = rel_err(torch_same_dtype, truth)
    assert e_ours <= factor * e_torch + floor, (
        f"{name}: relative error {e_ours:.3e} vs PyTorch's {e_torch:.3e} at the same dtype "
        f"(allowed {factor} x + {floor:.1e})\n{describe_mismatch(ours, truth, 0.0, 0.0)}"
    )


# ---------------------------------------------------------------- helpers of the GPU tests (marked gpu)
# Shared by the GPU sections of test_linear_cross_entropy.py and test_info_nce.py (formerly in tests/test_gpu.py).

GPU_IMPLS = ["chunked", "fused"]  # the Triton strategies of linear cross-entropy and the info_nce family


def to_cuda(*tensors):
    """The tensors moved to the current CUDA device (None stays None), as a list."""
    return [None if t is None else t.cuda() for t in tensors]


def extra_cuda_bytes(fn):
    """Peak CUDA memory of fn() above what was allocated before it, after a warm-up call: (bytes, fn's result)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, out

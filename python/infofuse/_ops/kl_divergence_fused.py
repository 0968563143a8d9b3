"""The "fused" linear KL / JSD: Triton kernels that never write a logit to memory.

The kernels are in triton_kernels/kl_divergence_fused.py. Forward: the statistics kernel (per row: both heads'
log-sum-exps and the divergence, two passes over the vocabulary recomputing the logit tiles), then O(N) reductions
in PyTorch. Gradients: per-row coefficients (O(N), PyTorch), then one kernel over (row block, vocabulary tile)
pairs that recomputes both heads' tiles and adds each wanted head's dX, dW and db products with float32 atomics;
bf16/fp16 gradients are rounded once from float32 buffers. For "mean"/"sum" with gradients wanted, the forward op
runs the gradient kernel at once for ``grad_output = 1`` and the shared autograd formula scales the result; for
"none" or a second backward the backward op recomputes the statistics and then the gradients.

The atomics make the float32 sums' order depend on GPU scheduling, so on CUDA tensors under
``torch.use_deterministic_algorithms(True)`` the gradient kernel refuses to run (impl="chunked" is deterministic).

Registered as ``infofuse::linear_kl_divergence_fused_forward`` / ``_backward`` with the schemas, fake kernels and
autograd formula of ``kl_divergence.py``.
"""

from __future__ import annotations

import torch

from ._library import LIB, define
from ._triton_common import check_triton_input
from .kl_divergence import BACKWARD_SCHEMA, FORWARD_SCHEMA, register_pair

FORWARD = "infofuse::linear_kl_divergence_fused_forward"
BACKWARD = "infofuse::linear_kl_divergence_fused_backward"

define(FORWARD_SCHEMA, FORWARD.split("::")[1])
define(BACKWARD_SCHEMA, BACKWARD.split("::")[1])


def _valid(target, ignore_index, n, device):
    if target is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return target != ignore_index


def _grads(si, sw, ti, tw, target, sb, tb, beta, temperature, reduction, ignore_index, flags, stats, grad_up):
    """The six gradient outputs (full-size in the tensors' dtypes where ``flags`` and present, else empty (0,))."""
    from infofuse.triton_kernels.kl_divergence_fused import kl_fused_grads

    n = si.shape[0]
    present = (True, True, sb is not None, True, True, tb is not None)
    want = tuple(f and p for f, p in zip(flags, present, strict=True))
    if si.is_cuda and any(want) and torch.are_deterministic_algorithms_enabled():
        raise RuntimeError(
            "infofuse.linear_kl_divergence(impl='fused') adds its gradients with float32 atomics, which is not "
            "deterministic on CUDA; use impl='chunked' under torch.use_deterministic_algorithms(True)"
        )
    valid = _valid(target, ignore_index, n, si.device)
    g = grad_up.to(torch.float32).reshape(-1)
    if reduction == 1:
        g = g / valid.sum(dtype=torch.float32)
    coef = torch.where(valid, g * (1.0 / temperature), 0.0).expand(n).contiguous()
    out = kl_fused_grads(si, sw, sb, ti, tw, tb, stats, coef, beta=beta, temperature=temperature, want=want)
    likes = (si, sw, sb, ti, tw, tb)
    empties = (si, sw, si, ti, tw, ti)
    return tuple(
        o.to(like.dtype) if o is not None else empty.new_empty((0,))
        for o, like, empty in zip(out, likes, empties, strict=True)
    )


def _stats(si, sw, ti, tw, target, sb, tb, beta, temperature, ignore_index):
    from infofuse.triton_kernels.kl_divergence_fused import kl_fused_stats

    return kl_fused_stats(
        si,
        sw,
        None if sb is None else sb.contiguous(),
        ti,
        tw,
        None if tb is None else tb.contiguous(),
        target,
        ignore_index=ignore_index,
        beta=beta,
        temperature=temperature,
    )


@torch.library.impl(FORWARD, ("cpu", "cuda"), lib=LIB)
def _forward(si, sw, ti, tw, target, sb, tb, beta, temperature, reduction, ignore_index, chunk_size, *flags):
    check_triton_input(si, "fused")
    n = si.shape[0]
    target = None if target is None else target.contiguous()
    stats, per_row = _stats(si, sw, ti, tw, target, sb, tb, beta, temperature, ignore_index)
    if reduction == 0:
        loss = per_row
    elif reduction == 2:
        loss = per_row.sum()
    else:
        loss = per_row.sum() / _valid(target, ignore_index, n, si.device).sum()
    formed = tuple(f and reduction != 0 for f in flags)
    one = torch.ones(1, dtype=torch.float32, device=si.device)
    if any(formed):
        grads = _grads(si, sw, ti, tw, target, sb, tb, beta, temperature, reduction, ignore_index, formed, stats, one)
    else:
        grads = (si.new_empty((0,)), sw.new_empty((0,)), si.new_empty((0,)), ti.new_empty((0,)))
        grads = (*grads, tw.new_empty((0,)), ti.new_empty((0,)))
    return (loss, *grads)


@torch.library.impl(BACKWARD, ("cpu", "cuda"), lib=LIB)
def _backward(
    grad_loss, si, sw, ti, tw, target, sb, tb, beta, temperature, reduction, ignore_index, chunk_size, *flags
):
    check_triton_input(si, "fused")
    target = None if target is None else target.contiguous()
    stats, _ = _stats(si, sw, ti, tw, target, sb, tb, beta, temperature, ignore_index)
    return _grads(si, sw, ti, tw, target, sb, tb, beta, temperature, reduction, ignore_index, flags, stats, grad_loss)


register_pair(FORWARD, BACKWARD)

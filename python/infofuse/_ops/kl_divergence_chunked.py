"""The "chunked" linear KL / JSD: library GEMMs over row chunks with one Triton row pass between them.

Per chunk of rows: ``Z_s = X_s,c W_sᵀ (+ b_s)`` and ``Z_t = X_t,c W_tᵀ (+ b_t)`` by ``torch.mm`` (cuBLAS on the
GPU) into two reused buffers; the Triton row pass (``infofuse.triton_kernels.kl_divergence_rows``) reads both for
the divergence and writes each wanted head's logit gradient over its buffer; then ``dX_c = G W`` and
``dW += Gᵀ X_c`` per head. The divisor of "mean" stays on the device (no host sync). On CPU tensors it runs only
under ``TRITON_INTERPRET=1`` (Triton's interpreter), which is how CI tests it.

Registered as ``infofuse::linear_kl_divergence_chunked_forward`` / ``_backward`` with the schemas, fake kernels
and autograd formula of ``kl_divergence.py``. The per-head GEMM helpers are those of the chunked linear
cross-entropy (``linear_cross_entropy_chunked``): same buffers, same float32 weight-gradient accumulator rule.
"""

from __future__ import annotations

import torch

from ._library import LIB, define
from ._triton_common import check_triton_input
from .kl_divergence import BACKWARD_SCHEMA, FORWARD_SCHEMA, register_pair
from .linear_cross_entropy_chunked import _Grads, chunk_rows, logits_into

FORWARD = "infofuse::linear_kl_divergence_chunked_forward"
BACKWARD = "infofuse::linear_kl_divergence_chunked_backward"

define(FORWARD_SCHEMA, FORWARD.split("::")[1])
define(BACKWARD_SCHEMA, BACKWARD.split("::")[1])


def _scale(target, ignore_index, reduction, n, device):
    """1/n_valid for "mean" (1 otherwise) as one float32 element on the device: no host sync."""
    if reduction != 1:
        return torch.ones(1, dtype=torch.float32, device=device)
    n_valid = n if target is None else (target != ignore_index).sum(dtype=torch.float32)
    return (1.0 / torch.as_tensor(n_valid, dtype=torch.float32, device=device)).reshape(1)


def _run(
    si, sw, ti, tw, target, sb, tb, beta, temperature, ignore_index, chunk_size, loss, student, teacher, grad, scale
):
    from infofuse.triton_kernels.kl_divergence_rows import kl_divergence_rows

    n, v = si.shape[0], sw.shape[0]
    # one chunk of each head: rows chosen as for one head of twice the vocabulary
    rows = chunk_rows(n, 2 * v, si.element_size(), chunk_size)
    if n == 0:
        return
    s_buf, t_buf = si.new_empty((rows, v)), si.new_empty((rows, v))
    want_s = student is not None and (student.want_input or student.want_weight or student.want_bias)
    want_t = teacher is not None and (teacher.want_input or teacher.want_weight or teacher.want_bias)
    for r0 in range(0, n, rows):
        xs, xt = si[r0 : r0 + rows], ti[r0 : r0 + rows]
        zs, zt = s_buf[: xs.shape[0]], t_buf[: xs.shape[0]]
        logits_into(zs, xs, sw, sb)
        logits_into(zt, xt, tw, tb)
        kl_divergence_rows(
            zs,
            zt,
            r0,
            target,
            ignore_index=ignore_index,
            beta=beta,
            temperature=temperature,
            loss=loss,
            grad=grad,
            scale=scale,
            grad_student=want_s,
            grad_teacher=want_t,
        )
        if want_s:
            student.add(zs, xs, sw, r0)
        if want_t:
            teacher.add(zt, xt, tw, r0)


def _heads(si, sw, sb, ti, tw, tb, flags, rows):
    student = _Grads(si, sw, sb, *flags[:3], rows)
    teacher = _Grads(ti, tw, tb, *flags[3:], rows)
    return student, teacher


def _results(student, teacher, si, sb, ti, tb):
    return (*student.result(si, sb), *teacher.result(ti, tb))


@torch.library.impl(FORWARD, ("cpu", "cuda"), lib=LIB)
def _forward(si, sw, ti, tw, target, sb, tb, beta, temperature, reduction, ignore_index, chunk_size, *flags):
    check_triton_input(si, "chunked")
    n, v = si.shape[0], sw.shape[0]
    target = None if target is None else target.contiguous()
    formed = tuple(f and reduction != 0 for f in flags)
    rows = chunk_rows(n, 2 * v, si.element_size(), chunk_size)
    student, teacher = _heads(si, sw, sb, ti, tw, tb, formed, rows)
    per_row = torch.empty(n, dtype=torch.float32, device=si.device)
    scale = _scale(target, ignore_index, reduction, n, si.device)
    one = torch.ones(1, dtype=torch.float32, device=si.device)
    _run(
        si,
        sw,
        ti,
        tw,
        target,
        sb,
        tb,
        beta,
        temperature,
        ignore_index,
        chunk_size,
        per_row,
        student,
        teacher,
        one,
        scale,
    )
    if reduction == 0:
        loss = per_row
    elif reduction == 2:
        loss = per_row.sum()
    else:
        n_valid = n if target is None else (target != ignore_index).sum()
        loss = per_row.sum() / n_valid
    return (loss, *_results(student, teacher, si, sb, ti, tb))


@torch.library.impl(BACKWARD, ("cpu", "cuda"), lib=LIB)
def _backward(
    grad_loss, si, sw, ti, tw, target, sb, tb, beta, temperature, reduction, ignore_index, chunk_size, *flags
):
    check_triton_input(si, "chunked")
    n, v = si.shape[0], sw.shape[0]
    target = None if target is None else target.contiguous()
    rows = chunk_rows(n, 2 * v, si.element_size(), chunk_size)
    student, teacher = _heads(si, sw, sb, ti, tw, tb, flags, rows)
    g = grad_loss.reshape(-1).to(torch.float32).contiguous()  # also materialises a stride-0 (expanded) grad
    scale = _scale(target, ignore_index, reduction, n, si.device)
    _run(si, sw, ti, tw, target, sb, tb, beta, temperature, ignore_index, chunk_size, None, student, teacher, g, scale)
    return _results(student, teacher, si, sb, ti, tb)


register_pair(FORWARD, BACKWARD)

"""Custom ops of the pairwise InfoNCE family and SigLIP: schemas, fake kernels and autograd.

Every backend implements the same two pairs of ops (the C++ CPU kernels under the names declared in
``csrc/infofuse.cpp``; the Triton strategies under ``info_nce_<impl>_forward`` etc., declared here with the
same schemas):

* ``info_nce_forward`` returns per-row losses and log-sum-exps (and per-column ones for a symmetric loss), so
  that every reduction, the symmetric average and SupCon's "rows with a positive" mean are plain differentiable
  PyTorch on O(N) vectors; ``info_nce_backward`` takes the per-row (and per-column) upstream gradients and
  recomputes the scores from the saved log-sum-exps.
* ``siglip_forward`` / ``siglip_backward`` likewise, with per-row sums of the sigmoid loss.

The scale (and SigLIP's bias) is a 0-dim tensor input, float32 (float64 for float64 embeddings), read on the
device: no host sync. Its gradient is Σ_ij G_ij·(q_i·k_j).

The backward ops are not differentiable again: each backward formula starts with ``refuse_double_backward``, so
``create_graph=True`` through these ops raises rather than returning gradients without their second-order terms.
"""

from __future__ import annotations

import torch

from ._autograd import refuse_double_backward
from ._library import define

INFO_NCE_FORWARD_SCHEMA = (
    "{name}(Tensor query, Tensor key, Tensor scale, Tensor target, Tensor? labels, Tensor? key_labels, "
    "Tensor? col_target, int mode, bool exclude_self, bool want_cols) "
    "-> (Tensor row_loss, Tensor row_lse, Tensor col_loss, Tensor col_lse)"
)
INFO_NCE_BACKWARD_SCHEMA = (
    "{name}(Tensor grad_row, Tensor? grad_col, Tensor query, Tensor key, Tensor scale, Tensor target, "
    "Tensor? labels, Tensor? key_labels, Tensor? col_target, Tensor row_lse, Tensor? col_lse, int mode, "
    "bool exclude_self, bool grad_query, bool grad_key, bool grad_scale) "
    "-> (Tensor grad_query, Tensor grad_key, Tensor grad_scale)"
)
SIGLIP_FORWARD_SCHEMA = "{name}(Tensor query, Tensor key, Tensor scale, Tensor bias) -> Tensor row_loss"
SIGLIP_BACKWARD_SCHEMA = (
    "{name}(Tensor grad_row, Tensor query, Tensor key, Tensor scale, Tensor bias, bool grad_query, bool grad_key, "
    "bool grad_scale, bool grad_bias) -> (Tensor grad_query, Tensor grad_key, Tensor grad_scale, Tensor grad_bias)"
)

MODE_INFO_NCE = 0
MODE_SUPCON = 1


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def supcon_counts(labels: torch.Tensor, key_labels: torch.Tensor) -> torch.Tensor:
    """|P(i)| = #{j ≠ i: key_labels[j] = labels[i]} as int32, in O((N + M) log M) without an N×M mask."""
    sorted_keys = key_labels.sort().values
    count = torch.searchsorted(sorted_keys, labels, right=True) - torch.searchsorted(sorted_keys, labels)
    m = min(labels.shape[0], key_labels.shape[0])
    self_match = torch.zeros_like(count)
    self_match[:m] = (labels[:m] == key_labels[:m]).to(count.dtype)
    return (count - self_match).to(torch.int32)


# ---------------------------------------------------------------- fake kernels


def _info_nce_forward_fake(query, key, scale, target, labels, key_labels, col_target, mode, exclude_self, want_cols):
    n, m = query.shape[0], key.shape[0]
    acc = acc_dtype(query.dtype)
    cols = m if want_cols else 0
    return (
        query.new_empty((n,), dtype=acc),
        query.new_empty((n,), dtype=acc),
        query.new_empty((cols,), dtype=acc),
        query.new_empty((cols,), dtype=acc),
    )


def _info_nce_backward_fake(
    grad_row,
    grad_col,
    query,
    key,
    scale,
    target,
    labels,
    key_labels,
    col_target,
    row_lse,
    col_lse,
    mode,
    exclude_self,
    grad_query,
    grad_key,
    grad_scale,
):
    acc = acc_dtype(query.dtype)
    gq = query.new_empty(query.shape) if grad_query else query.new_empty((0,))
    gk = key.new_empty(key.shape) if grad_key else key.new_empty((0,))
    gs = query.new_empty((), dtype=acc) if grad_scale else query.new_empty((0,), dtype=acc)
    return gq, gk, gs


def _siglip_forward_fake(query, key, scale, bias):
    return query.new_empty((query.shape[0],), dtype=acc_dtype(query.dtype))


def _siglip_backward_fake(grad_row, query, key, scale, bias, grad_query, grad_key, grad_scale, grad_bias):
    acc = acc_dtype(query.dtype)
    gq = query.new_empty(query.shape) if grad_query else query.new_empty((0,))
    gk = key.new_empty(key.shape) if grad_key else key.new_empty((0,))
    gs = query.new_empty((), dtype=acc) if grad_scale else query.new_empty((0,), dtype=acc)
    gb = query.new_empty((), dtype=acc) if grad_bias else query.new_empty((0,), dtype=acc)
    return gq, gk, gs, gb


# ---------------------------------------------------------------- autograd


def _info_nce_setup_context(ctx, inputs, output):
    query, key, scale, target, labels, key_labels, col_target, mode, exclude_self, want_cols = inputs
    _, row_lse, _, col_lse = output
    ctx.save_for_backward(
        query, key, scale, target, labels, key_labels, col_target, row_lse, col_lse if want_cols else None
    )
    ctx.options = (mode, exclude_self, want_cols)
    ctx.mark_non_differentiable(row_lse, col_lse)
    ctx.set_materialize_grads(False)


def _info_nce_make_backward(backward_op):
    def backward(ctx, grad_row_loss, _grad_row_lse, grad_col_loss, _grad_col_lse):
        query, key, scale, target, labels, key_labels, col_target, row_lse, col_lse = ctx.saved_tensors
        refuse_double_backward("info_nce", grad_row_loss, grad_col_loss, query, key, scale)
        mode, exclude_self, want_cols = ctx.options
        need = ctx.needs_input_grad[:3]
        if (grad_row_loss is None and grad_col_loss is None) or not any(need):
            return (None,) * 10
        grad_row = grad_row_loss if grad_row_loss is not None else row_lse.new_zeros(row_lse.shape)
        grad_col = None
        if want_cols:
            grad_col = grad_col_loss if grad_col_loss is not None else col_lse.new_zeros(col_lse.shape)
        gq, gk, gs = backward_op(
            grad_row.contiguous(),
            None if grad_col is None else grad_col.contiguous(),
            query,
            key,
            scale,
            target,
            labels,
            key_labels,
            col_target,
            row_lse,
            col_lse,
            mode,
            exclude_self,
            *need,
        )
        return (gq if need[0] else None, gk if need[1] else None, gs if need[2] else None, *((None,) * 7))

    return backward


def _siglip_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _siglip_make_backward(backward_op):
    def backward(ctx, grad_row):
        query, key, scale, bias = ctx.saved_tensors
        refuse_double_backward("siglip_loss", grad_row, query, key, scale, bias)
        need = ctx.needs_input_grad[:4]
        if grad_row is None or not any(need):
            return None, None, None, None
        grads = backward_op(grad_row.contiguous(), query, key, scale, bias, *need)
        return tuple(g if n else None for g, n in zip(grads, need, strict=True))

    return backward


def _op(name: str):
    return getattr(torch.ops.infofuse, name.split("::")[1]).default


def register_info_nce_pair(forward_name: str, backward_name: str) -> None:
    torch.library.register_fake(forward_name)(_info_nce_forward_fake)
    torch.library.register_fake(backward_name)(_info_nce_backward_fake)
    torch.library.register_autograd(
        forward_name, _info_nce_make_backward(_op(backward_name)), setup_context=_info_nce_setup_context
    )


def register_siglip_pair(forward_name: str, backward_name: str) -> None:
    torch.library.register_fake(forward_name)(_siglip_forward_fake)
    torch.library.register_fake(backward_name)(_siglip_backward_fake)
    torch.library.register_autograd(
        forward_name, _siglip_make_backward(_op(backward_name)), setup_context=_siglip_setup_context
    )


# The C++ extension implements these four for CPU (csrc/cpu/info_nce.cpp).
register_info_nce_pair(
    define(INFO_NCE_FORWARD_SCHEMA, "info_nce_forward"), define(INFO_NCE_BACKWARD_SCHEMA, "info_nce_backward")
)
register_siglip_pair(define(SIGLIP_FORWARD_SCHEMA, "siglip_forward"), define(SIGLIP_BACKWARD_SCHEMA, "siglip_backward"))

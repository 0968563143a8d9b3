"""The Triton strategies of pairwise InfoNCE and SigLIP: "chunked" and "fused".

* chunked: query row chunks of raw scores ``Q_c Kᵀ`` by ``torch.mm`` (cuBLAS on the GPU) into one reused buffer in
  the embeddings' dtype, as dense PyTorch code computes them; one Triton pass per chunk
  (``triton_kernels/info_nce_terms.py``) for the row log-sum-exps and losses, or, in backward, for ``scale·G`` written
  over the chunk; then ``dQ_c = (scale·G)·K`` and ``dK += (scale·G)ᵀ·Q_c`` by ``torch.mm``, dK summed in float32.
  A symmetric loss's column log-sum-exps are the same pass over key chunks of ``K_c Qᵀ``. FLOPs: 2·N·M·D per
  GEMM; 4 (forward, symmetric) + 6 (backward) = 10·N·M·D.
* fused: ``triton_kernels/info_nce_fused.py``, no score ever in memory, float32 accumulation in ``tl.dot``.

Both accept CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests them), in float32, bfloat16
and float16. The GEMMs of float32 inputs run in full float32 precision in the fused kernels (IEEE ``tl.dot``)
and in whatever ``torch.backends.cuda.matmul.allow_tf32`` says in the chunked strategy (PyTorch's default: no
TF32), as dense PyTorch code would.
"""

from __future__ import annotations

import torch

from ._library import LIB, define
from ._triton_common import check_triton_input
from .info_nce import (
    INFO_NCE_BACKWARD_SCHEMA,
    INFO_NCE_FORWARD_SCHEMA,
    MODE_SUPCON,
    SIGLIP_BACKWARD_SCHEMA,
    SIGLIP_FORWARD_SCHEMA,
    register_info_nce_pair,
    register_siglip_pair,
    supcon_counts,
)

# Bytes of raw scores held at once by the chunked strategy (a module constant, so that tests can make it small).
CHUNK_BYTES = 128 << 20
# Rows of dK per GEMM when bf16/fp16 chunk contributions are added into its float32 accumulator.
HALF_GRAD_BLOCK = 4096

for _impl in ("chunked", "fused"):
    define(INFO_NCE_FORWARD_SCHEMA, f"info_nce_{_impl}_forward")
    define(INFO_NCE_BACKWARD_SCHEMA, f"info_nce_{_impl}_backward")
    define(SIGLIP_FORWARD_SCHEMA, f"siglip_{_impl}_forward")
    define(SIGLIP_BACKWARD_SCHEMA, f"siglip_{_impl}_backward")


def _f32(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float32, device=x.device)


def _empty(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return x.new_empty((0,), dtype=dtype)


def _chunk_rows(m: int, elem_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(1, m * elem_bytes))


def _score_chunks(a: torch.Tensor, b: torch.Tensor):
    """(r0, raw scores a[r0:r1] @ bᵀ) over row chunks of ``a``, in one reused buffer of a's dtype."""
    n, m = a.shape[0], b.shape[0]
    if n == 0 or m == 0:
        return
    rows = min(n, _chunk_rows(m, a.element_size()))
    buffer = a.new_empty((rows, m))
    for r0 in range(0, n, rows):
        chunk = a[r0 : r0 + rows]
        out = buffer[: chunk.shape[0]]
        torch.mm(chunk, b.t(), out=out)
        yield r0, chunk, out


class _KeyGrad:
    """dK += Gᵀ·Q_c over chunks: summed in float32 (the gradient itself for float32 keys), rounded once."""

    def __init__(self, key: torch.Tensor, want: bool):
        self.out = torch.zeros_like(key, memory_format=torch.contiguous_format) if want else None
        self.acc = None
        if want and key.dtype != torch.float32:
            self.acc = torch.zeros(key.shape, dtype=torch.float32, device=key.device)

    def add(self, g: torch.Tensor, q_chunk: torch.Tensor) -> None:
        if self.out is None:
            return
        if self.acc is None:
            self.out.addmm_(g.t(), q_chunk)
            return
        for j0 in range(0, g.shape[1], HALF_GRAD_BLOCK):
            gj = g[:, j0 : j0 + HALF_GRAD_BLOCK]
            self.acc[j0 : j0 + gj.shape[1]] += torch.mm(gj.t(), q_chunk)

    def result(self, key: torch.Tensor) -> torch.Tensor:
        if self.out is None:
            return _empty(key, key.dtype)
        if self.acc is not None:
            self.out.copy_(self.acc)
        return self.out


# ---------------------------------------------------------------- chunked


def _info_nce_chunked_forward(query, key, scale, target, labels, key_labels, col_target, mode, exclude_self, want_cols):
    from infofuse.triton_kernels.info_nce_terms import pair_lse_rows

    check_triton_input(query, "chunked")
    supcon = mode == MODE_SUPCON
    scale = scale.to(torch.float32)
    n, m = query.shape[0], key.shape[0]
    row_loss, row_lse = _f32(query, n), _f32(query, n)
    for r0, _, s in _score_chunks(query, key):
        pair_lse_rows(
            s, r0, scale, target, labels, key_labels, row_lse, row_loss, exclude_self=exclude_self, supcon=supcon
        )
    if m == 0:
        row_lse.fill_(float("-inf"))
        row_loss.fill_(float("nan") if not supcon else 0.0)
    if not want_cols:
        return row_loss, row_lse, _empty(query), _empty(query)
    col_loss, col_lse = _f32(query, m), _f32(query, m)
    for r0, _, s in _score_chunks(key, query):
        pair_lse_rows(
            s, r0, scale, col_target, key_labels, labels, col_lse, col_loss, exclude_self=exclude_self, supcon=False
        )
    return row_loss, row_lse, col_loss, col_lse


def _info_nce_chunked_backward(
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
    from infofuse.triton_kernels.info_nce_terms import pair_grad_rows

    check_triton_input(query, "chunked")
    supcon = mode == MODE_SUPCON
    scale32 = scale.to(torch.float32)
    n = query.shape[0]
    count = supcon_counts(labels, key_labels) if supcon else None
    gq = torch.zeros_like(query, memory_format=torch.contiguous_format) if grad_query else _empty(query, query.dtype)
    gk = _KeyGrad(key, grad_key)
    ds_rows = torch.zeros(n, dtype=torch.float32, device=query.device)
    g_row = grad_row.to(torch.float32)
    g_col = None if grad_col is None else grad_col.to(torch.float32)
    for r0, q_chunk, s in _score_chunks(query, key):
        pair_grad_rows(
            s,
            r0,
            scale32,
            target,
            labels,
            key_labels,
            count,
            row_lse,
            g_row,
            col_target,
            col_lse,
            g_col,
            ds_rows,
            exclude_self=exclude_self,
            supcon=supcon,
        )
        if grad_query:
            torch.mm(s, key, out=gq[r0 : r0 + s.shape[0]])
        gk.add(s, q_chunk)
    gs = ds_rows.sum() if grad_scale else _empty(query)
    return gq, gk.result(key), gs


def _siglip_chunked_forward(query, key, scale, bias):
    from infofuse.triton_kernels.info_nce_terms import siglip_rows

    check_triton_input(query, "chunked")
    scale, bias = scale.to(torch.float32), bias.to(torch.float32)
    row_loss = torch.zeros(query.shape[0], dtype=torch.float32, device=query.device)
    for r0, _, s in _score_chunks(query, key):
        siglip_rows(s, r0, scale, bias, loss=row_loss)
    return row_loss


def _siglip_chunked_backward(grad_row, query, key, scale, bias, grad_query, grad_key, grad_scale, grad_bias):
    from infofuse.triton_kernels.info_nce_terms import siglip_rows

    check_triton_input(query, "chunked")
    scale, bias = scale.to(torch.float32), bias.to(torch.float32)
    n = query.shape[0]
    gq = torch.zeros_like(query, memory_format=torch.contiguous_format) if grad_query else _empty(query, query.dtype)
    gk = _KeyGrad(key, grad_key)
    ds_rows = torch.zeros(n, dtype=torch.float32, device=query.device)
    db_rows = torch.zeros(n, dtype=torch.float32, device=query.device)
    g = grad_row.to(torch.float32)
    for r0, q_chunk, s in _score_chunks(query, key):
        siglip_rows(s, r0, scale, bias, grad_row=g, ds_rows=ds_rows, db_rows=db_rows)
        if grad_query:
            torch.mm(s, key, out=gq[r0 : r0 + s.shape[0]])
        gk.add(s, q_chunk)
    return (
        gq,
        gk.result(key),
        ds_rows.sum() if grad_scale else _empty(query),
        db_rows.sum() if grad_bias else _empty(query),
    )


# ---------------------------------------------------------------- fused


def _info_nce_fused_forward(query, key, scale, target, labels, key_labels, col_target, mode, exclude_self, want_cols):
    from infofuse.triton_kernels.info_nce_fused import pair_fused_forward

    check_triton_input(query, "fused")
    supcon = mode == MODE_SUPCON
    scale = scale.to(torch.float32)
    row_lse, row_loss = pair_fused_forward(
        query,
        key,
        scale,
        target=None if supcon else target,
        lab_row=labels,
        lab_col=key_labels,
        exclude_self=exclude_self,
        supcon=supcon,
    )
    if not want_cols:
        return row_loss, row_lse, _empty(query), _empty(query)
    col_lse, col_loss = pair_fused_forward(
        key, query, scale, target=col_target, lab_row=key_labels, lab_col=labels, exclude_self=exclude_self
    )
    return row_loss, row_lse, col_loss, col_lse


def _info_nce_fused_backward(
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
    from infofuse.triton_kernels.info_nce_fused import pair_fused_backward

    check_triton_input(query, "fused")
    supcon = mode == MODE_SUPCON
    gq, gk, gs, _ = pair_fused_backward(
        query,
        key,
        scale.to(torch.float32),
        grad_row.to(torch.float32),
        target=None if supcon else target,
        lab_row=labels,
        lab_col=key_labels,
        count=supcon_counts(labels, key_labels) if supcon else None,
        row_lse=row_lse,
        col_target=col_target,
        col_lse=col_lse,
        grad_col=None if grad_col is None else grad_col.to(torch.float32),
        exclude_self=exclude_self,
        supcon=supcon,
        want_q=grad_query,
        want_k=grad_key,
        want_scale=grad_scale,
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )
    return (
        gq if gq is not None else _empty(query, query.dtype),
        gk if gk is not None else _empty(key, key.dtype),
        gs if gs is not None else _empty(query),
    )


def _siglip_fused_forward(query, key, scale, bias):
    from infofuse.triton_kernels.info_nce_fused import pair_fused_forward

    check_triton_input(query, "fused")
    return pair_fused_forward(query, key, scale.to(torch.float32), bias=bias.to(torch.float32), siglip=True)[1]


def _siglip_fused_backward(grad_row, query, key, scale, bias, grad_query, grad_key, grad_scale, grad_bias):
    from infofuse.triton_kernels.info_nce_fused import pair_fused_backward

    check_triton_input(query, "fused")
    gq, gk, gs, gb = pair_fused_backward(
        query,
        key,
        scale.to(torch.float32),
        grad_row.to(torch.float32),
        bias=bias.to(torch.float32),
        siglip=True,
        want_q=grad_query,
        want_k=grad_key,
        want_scale=grad_scale,
        want_bias=grad_bias,
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )
    return (
        gq if gq is not None else _empty(query, query.dtype),
        gk if gk is not None else _empty(key, key.dtype),
        gs if gs is not None else _empty(query),
        gb if gb is not None else _empty(query),
    )


_IMPLS = {
    "chunked": (
        _info_nce_chunked_forward,
        _info_nce_chunked_backward,
        _siglip_chunked_forward,
        _siglip_chunked_backward,
    ),
    "fused": (_info_nce_fused_forward, _info_nce_fused_backward, _siglip_fused_forward, _siglip_fused_backward),
}
for _impl, (_nf, _nb, _sf, _sb) in _IMPLS.items():
    for _name, _fn in (
        (f"info_nce_{_impl}_forward", _nf),
        (f"info_nce_{_impl}_backward", _nb),
        (f"siglip_{_impl}_forward", _sf),
        (f"siglip_{_impl}_backward", _sb),
    ):
        torch.library.impl(f"infofuse::{_name}", ("cpu", "cuda"), lib=LIB)(_fn)
    register_info_nce_pair(f"infofuse::info_nce_{_impl}_forward", f"infofuse::info_nce_{_impl}_backward")
    register_siglip_pair(f"infofuse::siglip_{_impl}_forward", f"infofuse::siglip_{_impl}_backward")

"""The "chunked" linear cross-entropy: library GEMMs over row chunks with one Triton row pass between them.

Per chunk of rows: ``Z = X_c Wᵀ (+ b)`` by ``torch.mm`` (cuBLAS on the GPU) into one reused buffer; the Triton
row pass (``infofuse.triton_kernels.linear_cross_entropy_rows``) reads it once for the lse and every loss
term and writes the logits' gradient over it; then ``dX_c = G W`` and ``dW += Gᵀ X_c`` by ``torch.mm``/``addmm``.
Nothing is read back to the host: the reduction's divisors stay on the device. On CPU tensors it runs only under
``TRITON_INTERPRET=1`` (Triton's interpreter), which is how CI tests it.

Registered as ``infofuse::linear_cross_entropy_chunked_forward`` / ``_backward`` with the schemas, fake kernels
and autograd formula of the C++ ops (``linear_cross_entropy.py``).
"""

from __future__ import annotations

import torch

from ._library import LIB, define
from ._triton_common import check_triton_input, prepare, reduce_loss
from .linear_cross_entropy import BACKWARD_SCHEMA, FORWARD_SCHEMA, register_pair

FORWARD = "infofuse::linear_cross_entropy_chunked_forward"
BACKWARD = "infofuse::linear_cross_entropy_chunked_backward"

# Default chunk: a quarter of what the full logits would take, at most this many bytes.
MAX_CHUNK_BYTES = 1 << 30
# Rows of grad_weight per GEMM when bf16/fp16 chunk contributions are added into a float32 accumulator.
HALF_GRAD_WEIGHT_BLOCK = 4096
# bf16/fp16 grad_weight: a float32 (V, D) accumulator is used when it takes at most this, or at most the logits
# chunk; above both, each chunk's Gᵀ·X_c is added into the gradient itself (float32 inside the GEMM, one rounding
# per chunk). bench/NOTES.md measures what the per-chunk rounding costs.
FLOAT32_ACCUMULATOR_BYTES = 64 << 20

define(FORWARD_SCHEMA, FORWARD.split("::")[1])
define(BACKWARD_SCHEMA, BACKWARD.split("::")[1])


def chunk_rows(n: int, v: int, elem_bytes: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(chunk_size, n))
    budget = min(MAX_CHUNK_BYTES, max(1, n * v * elem_bytes // 4))
    return max(1, min(n, budget // max(1, v * elem_bytes)))


def logits_into(out, x_chunk, linear_weight, linear_bias):
    """``out = x_chunk @ linear_weightᵀ (+ linear_bias)`` by one library GEMM into a reused buffer."""
    if linear_bias is None:
        torch.mm(x_chunk, linear_weight.t(), out=out)
    else:
        torch.addmm(linear_bias, x_chunk, linear_weight.t(), out=out)


def float32_accumulator(linear_weight: torch.Tensor, rows: int) -> bool:
    """Whether bf16/fp16 grad_weight is summed in a float32 (V, D) buffer (see FLOAT32_ACCUMULATOR_BYTES)."""
    if linear_weight.dtype == torch.float32:
        return False  # the float32 gradient is its own accumulator
    v, d = linear_weight.shape
    return v * d * 4 <= max(FLOAT32_ACCUMULATOR_BYTES, rows * v * linear_weight.element_size())


def add_grad_products(g, x_chunk, linear_weight, r0, grad_input, grad_weight):
    """One chunk's GEMMs from its dLoss/dlogits ``g``: ``grad_input[r0 : r0 + rows] = g·W`` and
    ``grad_weight += gᵀ·X_c`` (None: not wanted). A ``grad_weight`` wider than ``g`` (a float32 accumulator for
    bf16/fp16) takes the products by blocks of V rows, so that no (V, D) temporary is made per chunk."""
    if grad_input is not None:
        torch.mm(g, linear_weight, out=grad_input[r0 : r0 + g.shape[0]])
    if grad_weight is not None:
        if grad_weight.dtype == g.dtype:
            grad_weight.addmm_(g.t(), x_chunk)
        else:
            for j0 in range(0, g.shape[1], HALF_GRAD_WEIGHT_BLOCK):
                gj = g[:, j0 : j0 + HALF_GRAD_WEIGHT_BLOCK]
                grad_weight[j0 : j0 + gj.shape[1]] += torch.mm(gj.t(), x_chunk)


class _Grads:
    """grad_input rows, grad_weight and grad_bias, filled chunk by chunk from dLoss/dlogits."""

    def __init__(self, input, linear_weight, linear_bias, gi, gw, gb, rows):
        n, d = input.shape
        v = linear_weight.shape[0]
        self.gi = input.new_empty((n, d)) if gi else input.new_empty((0,))
        # grad_weight sums the chunks' Gᵀ·X_c: in a float32 (V, D) accumulator rounded once where that fits the
        # budget, else in the gradient's own dtype (a rounding per chunk: Liger #512 is this with many chunks).
        self.gw_out = linear_weight.new_empty((v, d)) if gw else linear_weight.new_empty((0,))
        wide = float32_accumulator(linear_weight, rows)
        self.gw = (
            (torch.zeros((v, d), dtype=torch.float32, device=input.device) if wide else self.gw_out.zero_())
            if gw
            else None
        )
        self.want_bias = gb and linear_bias is not None
        self.gb = torch.zeros(v, dtype=torch.float32, device=input.device) if self.want_bias else None
        self.want_input, self.want_weight = gi, gw

    def add(self, g, x_chunk, linear_weight, r0):
        add_grad_products(g, x_chunk, linear_weight, r0, self.gi if self.want_input else None, self.gw)
        if self.want_bias:
            self.gb += g.sum(0, dtype=torch.float32)

    def result(self, input, linear_bias):
        gb = self.gb.to(linear_bias.dtype) if self.want_bias else input.new_empty((0,))
        if self.want_weight and self.gw is not self.gw_out:
            self.gw_out.copy_(self.gw)
        return self.gi, self.gw_out, gb


def _run(
    input,
    linear_weight,
    target,
    linear_bias,
    weight,
    scales,
    opts,
    chunk_size,
    forward,
    lse,
    ce,
    zl,
    grads,
    grad=None,
    lse_grad=None,
    argmax=None,
    extra=None,
):
    from infofuse.triton_kernels.linear_cross_entropy_rows import linear_cross_entropy_rows

    n = input.shape[0]
    v = linear_weight.shape[0]
    rows = chunk_rows(n, v, input.element_size(), chunk_size)
    buffer = input.new_empty((rows, v)) if n else None
    for r0 in range(0, n, rows):
        x_chunk = input[r0 : r0 + rows]
        z = buffer[: x_chunk.shape[0]]
        logits_into(z, x_chunk, linear_weight, linear_bias)
        lse_rows = dict(lse=lse, ce=ce, zl=zl, forward=forward, grad=grad, lse_grad=lse_grad, argmax=argmax)
        linear_cross_entropy_rows(z, r0, target, weight, scales, **opts, **lse_rows, **(extra or {}))
        if grads is not None:
            grads.add(z, x_chunk, linear_weight, r0)


def _options(ignore_index, label_smoothing, z_loss, softcap):
    return {"ignore_index": ignore_index, "label_smoothing": label_smoothing, "z_loss": z_loss, "softcap": softcap}


@torch.library.impl(FORWARD, ("cpu", "cuda"), lib=LIB)
def _forward(
    input,
    linear_weight,
    target,
    linear_bias,
    weight,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
    grad_input,
    grad_weight,
    grad_bias,
    want_argmax,
    temperature=1.0,
    want_entropy=False,
):
    check_triton_input(input, "chunked")
    n = input.shape[0]
    v = linear_weight.shape[0]
    target = target.contiguous()
    weight32, scales = prepare(target, weight, v, ignore_index, reduction, input.device)
    f32 = {"dtype": torch.float32, "device": input.device}
    lse, ce, zl = (torch.empty(n, **f32) for _ in range(3))
    want = reduction != 0 and (grad_input or grad_weight or (grad_bias and linear_bias is not None))
    rows = chunk_rows(n, v, input.element_size(), chunk_size)
    grads = _Grads(input, linear_weight, linear_bias, grad_input, grad_weight, grad_bias, rows) if want else None
    one = torch.ones(1, **f32)
    argmax = torch.empty(n if want_argmax else 0, dtype=torch.int64, device=input.device)
    entropy = torch.empty(n if want_entropy else 0, **f32)
    _run(
        input,
        linear_weight,
        target,
        linear_bias,
        weight32,
        scales,
        _options(ignore_index, label_smoothing, z_loss, softcap),
        chunk_size,
        True,
        lse,
        ce,
        zl,
        grads,
        grad=one if want else None,
        argmax=argmax if want_argmax else None,
        extra={"temperature": temperature, "entropy": entropy if want_entropy else None},
    )
    loss = reduce_loss(ce, zl, scales, reduction, z_loss)
    if grads is None:
        empty = (input.new_empty((0,)), linear_weight.new_empty((0,)), input.new_empty((0,)))
        return loss, lse, *empty, argmax, entropy
    return (loss, lse, *grads.result(input, linear_bias), argmax, entropy)


@torch.library.impl(BACKWARD, ("cpu", "cuda"), lib=LIB)
def _backward(
    grad_loss,
    grad_lse,
    input,
    linear_weight,
    target,
    linear_bias,
    weight,
    lse,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
    grad_input,
    grad_weight,
    grad_bias,
    grad_entropy=None,
    entropy=None,
    temperature=1.0,
):
    check_triton_input(input, "chunked")
    v = linear_weight.shape[0]
    want_bias = grad_bias and linear_bias is not None
    if not (grad_input or grad_weight or want_bias):
        return input.new_empty((0,)), linear_weight.new_empty((0,)), input.new_empty((0,))
    target = target.contiguous()
    weight32, scales = prepare(target, weight, v, ignore_index, reduction, input.device)
    rows = chunk_rows(input.shape[0], v, input.element_size(), chunk_size)
    grads = _Grads(input, linear_weight, linear_bias, grad_input, grad_weight, grad_bias, rows)
    g = grad_loss.reshape(-1).to(torch.float32).contiguous()  # also materialises a stride-0 (expanded) grad
    g_lse = None if grad_lse is None else grad_lse.reshape(-1).to(torch.float32).contiguous()
    extra = {"temperature": temperature}
    if grad_entropy is not None:
        if entropy is None or entropy.numel() != input.shape[0] or grad_entropy.numel() != input.shape[0]:
            raise ValueError("grad_entropy and entropy must both have N = input.shape[0] elements")
        extra["entropy"] = entropy.reshape(-1).to(torch.float32).contiguous()
        extra["entropy_grad"] = grad_entropy.reshape(-1).to(torch.float32).contiguous()
    _run(
        input,
        linear_weight,
        target,
        linear_bias,
        weight32,
        scales,
        _options(ignore_index, label_smoothing, z_loss, softcap),
        chunk_size,
        False,
        lse.contiguous(),
        None,
        None,
        grads,
        grad=g,
        lse_grad=g_lse,
        extra=extra,
    )
    return grads.result(input, linear_bias)


register_pair(FORWARD, BACKWARD)

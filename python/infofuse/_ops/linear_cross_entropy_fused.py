"""The "fused" linear cross-entropy: Triton kernels that never hold a logit in memory.

The kernels are in triton_kernels/linear_cross_entropy_fused.py.

Forward: the fused lse kernel over vocabulary slices, then O(N) merges in PyTorch. Backward: per-row gradient
coefficients (O(N), PyTorch), then two kernel passes that recompute the logit tiles, one summing dX rows over the
vocabulary, one summing dW rows over the input rows (skipping tiles whose softmax entries are all below the
dtype's filter threshold). Each gradient element is summed in float32 and rounded once; bf16/fp16 gradients go
through a float32 workspace of at most 32 MiB per pass. Under ``torch.use_deterministic_algorithms(True)`` the
passes run without atomics, bitwise reproducible. For "mean"/"sum" with gradients wanted, the forward op runs the
backward passes at once (recomputing costs the same in forward as in backward) and the shared autograd formula
scales the result by ``grad_output``.

Registered as ``infofuse::linear_cross_entropy_fused_forward`` / ``_backward`` with the shared schemas, fake
kernels and autograd formula (``linear_cross_entropy.py``).
"""

from __future__ import annotations

import torch

from ._library import LIB, define
from ._triton_common import check_triton_input, prepare, reduce_loss, target_weight
from .linear_cross_entropy import BACKWARD_SCHEMA, FORWARD_SCHEMA, register_pair

FORWARD = "infofuse::linear_cross_entropy_fused_forward"
BACKWARD = "infofuse::linear_cross_entropy_fused_backward"

define(FORWARD_SCHEMA, FORWARD.split("::")[1])
define(BACKWARD_SCHEMA, BACKWARD.split("::")[1])


def _grads(
    input,
    linear_weight,
    target,
    linear_bias,
    weight32,
    scales,
    lse,
    grad_up,
    grad_lse,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    want_dx,
    want_dw,
    want_db,
    temperature=1.0,
    grad_entropy=None,
    entropy=None,
):
    from infofuse.triton_kernels.linear_cross_entropy_fused import default_filter_eps, lce_fused_grads

    v = linear_weight.shape[0]
    valid = target != ignore_index
    w_t = target_weight(target, weight32, valid, v)
    g_up = grad_up.to(torch.float32).reshape(-1)
    # ignored rows take no loss gradient (and never meet "mean"'s 1/0 divisor when every row is ignored)
    g_ce = torch.where(valid, g_up * scales[0], 0.0)
    g_z = torch.where(valid, g_up * scales[1], 0.0)
    eps_v = label_smoothing / v
    # the coefficient of p beyond the target's b (the kernel forms b·(p − [j = t]) + a·p: no cancellation at p_t = 1)
    a = g_ce * (eps_v * scales[2]) + g_z * (2.0 * z_loss) * lse
    if grad_lse is not None:
        a = a + grad_lse.to(torch.float32).reshape(-1)
    b = g_ce * (1.0 - label_smoothing) * w_t
    c = g_ce * eps_v
    n = input.shape[0]
    inv_t = 1.0 / temperature  # dℓ/dẑ, folded into every coefficient
    a, b, c = ((t * inv_t).expand(n).contiguous() for t in (a, b, c))
    e = h = None
    if grad_entropy is not None:  # −e·p·(ℓ − h): e the entropy's upstream gradient (0 at ignored rows), h = lse − H
        e = torch.where(valid, grad_entropy.to(torch.float32).reshape(-1) * inv_t, 0.0).contiguous()
        h = (lse - entropy.to(torch.float32).reshape(-1)).contiguous()
    dx, dw, db = lce_fused_grads(
        input,
        linear_weight,
        linear_bias,
        target,
        weight32,
        softcap,
        lse,
        a,
        b,
        c,
        want_dx=want_dx,
        want_dw=want_dw,
        want_db=want_db,
        deterministic=torch.are_deterministic_algorithms_enabled(),
        filter_eps=default_filter_eps(input.dtype, label_smoothing),
        temperature=temperature,
        coef_e=e,
        coef_h=h,
    )
    gi = dx if want_dx else input.new_empty((0,))
    gw = dw if want_dw else linear_weight.new_empty((0,))
    gb = db.to(linear_bias.dtype) if want_db else input.new_empty((0,))
    return gi, gw, gb


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
    from infofuse.triton_kernels.linear_cross_entropy_fused import lce_fused_partials

    check_triton_input(input, "fused")
    n, v = input.shape[0], linear_weight.shape[0]
    target = target.contiguous()
    weight32, scales = prepare(target, weight, v, ignore_index, reduction, input.device)
    argmax = torch.zeros(n if want_argmax else 0, dtype=torch.int64, device=input.device)
    entropy = torch.zeros(n if want_entropy else 0, dtype=torch.float32, device=input.device)
    valid = target != ignore_index
    if n:
        m, s, zt, wz, *rest = lce_fused_partials(
            input,
            linear_weight,
            linear_bias,
            target,
            weight32,
            softcap,
            want_argmax=want_argmax,
            temperature=temperature,
            want_entropy=want_entropy,
        )
        top = m.max(0).values
        scale = torch.exp(m - top)
        s_all = (s * scale).sum(0)
        lse = top + torch.log(s_all)
        zt, wz = zt.sum(0), wz.sum(0)
        if want_argmax:  # the first slice holding the row's maximum (slices are in column order)
            first = (m == top).to(torch.uint8).argmax(0, keepdim=True)
            argmax = rest[0].gather(0, first)[0]
        if want_entropy:  # each slice's Σ e^{ℓ−m}(ℓ − m) moved to the row max M, then H = log S − T/S
            t_all = (scale * (rest[-1] + (m - top) * s)).sum(0)
            entropy = torch.where(valid, torch.log(s_all) - t_all / s_all, 0.0)
    else:
        lse = zt = wz = torch.zeros(0, dtype=torch.float32, device=input.device)
    w_t = target_weight(target, weight32, valid, v)
    eps = label_smoothing
    ce = torch.where(valid, (1.0 - eps) * w_t * (lse - zt) + eps / v * (scales[2] * lse - wz), 0.0)
    zl = torch.where(valid, z_loss * lse * lse, 0.0)
    loss = reduce_loss(ce, zl, scales, reduction, z_loss)
    want_db = grad_bias and linear_bias is not None
    if reduction == 0 or not (grad_input or grad_weight or want_db):
        empty = (input.new_empty((0,)), linear_weight.new_empty((0,)), input.new_empty((0,)))
        return loss, lse, *empty, argmax, entropy
    one = torch.ones((), dtype=torch.float32, device=input.device)
    grads = _grads(
        input,
        linear_weight,
        target,
        linear_bias,
        weight32,
        scales,
        lse,
        one,
        None,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        grad_input,
        grad_weight,
        want_db,
        temperature=temperature,
    )
    return (loss, lse, *grads, argmax, entropy)


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
    check_triton_input(input, "fused")
    want_db = grad_bias and linear_bias is not None
    if not (grad_input or grad_weight or want_db):
        return input.new_empty((0,)), linear_weight.new_empty((0,)), input.new_empty((0,))
    target = target.contiguous()
    weight32, scales = prepare(target, weight, linear_weight.shape[0], ignore_index, reduction, input.device)
    return _grads(
        input,
        linear_weight,
        target,
        linear_bias,
        weight32,
        scales,
        lse.contiguous(),
        grad_loss,
        grad_lse,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        grad_input,
        grad_weight,
        want_db,
        temperature=temperature,
        grad_entropy=grad_entropy,
        entropy=entropy,
    )


register_pair(FORWARD, BACKWARD)

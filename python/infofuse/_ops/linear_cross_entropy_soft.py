"""Linear cross-entropy with class-probability ("soft") targets, streamed over row chunks.

``F.cross_entropy(F.linear(x, W, b).float(), q, weight=w, reduction=r, label_smoothing=ε)`` for a float (N, V)
target q, with PyTorch's definition for probability targets: q' = (1 − ε)·q + ε/V, the row loss is
``−Σ_j w_j q'_ij log p_ij``, "mean" divides by N (not by a weight sum), no ``ignore_index``. infofuse's extras:
z-loss λ adds λ·lse_i² per row ("mean" divides it by N), softcap c replaces the logits by c·tanh(z/c).

Per chunk of rows, in plain torch ops (so it runs wherever torch does; registered for CPU and CUDA):
``Z_c = X_c Wᵀ (+ b)`` by ``torch.mm``/``addmm`` into one reused (rows, V) buffer of the input dtype, then in
float32 (float64 for float64 inputs) the softcap, lse, loss terms and, for "mean"/"sum", the logits' gradient

    G_ij = s·[p_ij·(S_i + 2λ·lse_i) − w_j q'_ij]·(1 − tanh²(z_ij/c)),   S_i = Σ_j w_j q'_ij,  s = 1/N ("mean") or 1

formed while the chunk is hot, so that forward + backward cost 3 GEMMs (``dX_c = G W``, ``dW += Gᵀ X_c``,
``db += Σ G``; bf16/fp16 weight gradients summed in float32). Backward scales them by ``grad_output``. For
``reduction="none"`` (a per-row upstream gradient g_i), a gradient into the returned lse, a second backward
through a retained graph, or a gradient w.r.t. the target (``dL/dq_ij = −(1 − ε)·w_j·log p_ij·g_i``, which
PyTorch supports too), the backward op recomputes each chunk from the saved lse. Memory: one chunk of logits
and its float32 temporaries, never N×V beyond the target itself, whose rows are read chunk by chunk.
"""

from __future__ import annotations

import dataclasses

import torch

from ._autograd import refuse_double_backward
from ._library import LIB, define
from .linear_cross_entropy import _acc_dtype, _empty_like_flag, grad_flags
from .linear_cross_entropy_chunked import add_grad_products, logits_into

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
# Default chunk: this many bytes of float32 (float64 for float64 inputs) logits.
CHUNK_BYTES = 32 << 20
_TARGET_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

FORWARD_SCHEMA = (
    "{name}(Tensor input, Tensor linear_weight, Tensor target, Tensor? linear_bias, Tensor? weight, int reduction, "
    "float label_smoothing, float z_loss, float? softcap, int? chunk_size, bool grad_input, bool grad_weight, "
    "bool grad_bias) -> (Tensor loss, Tensor lse, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)"
)
BACKWARD_SCHEMA = (
    "{name}(Tensor grad_loss, Tensor? grad_lse, Tensor input, Tensor linear_weight, Tensor target, "
    "Tensor? linear_bias, Tensor? weight, Tensor lse, int reduction, float label_smoothing, float z_loss, "
    "float? softcap, int? chunk_size, bool grad_input, bool grad_weight, bool grad_bias, bool grad_target) "
    "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_target)"
)
FORWARD = define(FORWARD_SCHEMA, "linear_cross_entropy_soft_forward")
BACKWARD = define(BACKWARD_SCHEMA, "linear_cross_entropy_soft_backward")


@dataclasses.dataclass(frozen=True)
class SoftLCEParams:
    """The non-tensor options of one call, in the order of the op schema."""

    reduction: int
    label_smoothing: float
    z_loss: float
    softcap: float | None  # None: off
    chunk_size: int | None  # None: about CHUNK_BYTES of logits

    def as_args(self) -> tuple:
        return dataclasses.astuple(self)


def chunk_rows(n: int, v: int, acc: torch.dtype, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(chunk_size, n))
    return max(1, min(n, CHUNK_BYTES // max(1, v * acc.itemsize)))


class _Chunk:
    """One chunk's log-probabilities and weighted smoothed targets, in the accumulation dtype."""

    def __init__(self, z, q, weight, p: SoftLCEParams, acc, lse=None):
        zh = z.to(acc)
        self.slope = None
        if p.softcap is not None:
            # 1 − tanh²(z/c) as 4e/(1 + e)², e = exp(−2|z|/c): accurate where tanh saturates
            e = torch.exp(zh.abs() * (-2.0 / p.softcap))
            self.slope = e.mul(4.0).div_((1.0 + e).square_())
            zh = torch.tanh(zh / p.softcap) * p.softcap
        self.lse = torch.logsumexp(zh, 1) if lse is None else lse
        self.logp = zh - self.lse[:, None]
        wq = q.to(acc)
        if p.label_smoothing != 0.0:
            wq = wq * (1.0 - p.label_smoothing) + p.label_smoothing / z.shape[1]
        if weight is not None:
            wq = wq * weight
        self.wq = wq  # w_j q'_ij (never the caller's target: every step above makes a new tensor or reads only)
        self.z_loss = p.z_loss

    def row_loss(self):
        loss = -(self.wq * self.logp).sum(1)
        if self.z_loss != 0.0:
            loss = loss + self.z_loss * self.lse.square()
        return loss

    def logit_grad(self, g, g_lse=None):
        """dL/dz for per-row upstream gradients ``g`` (rows,) of the loss and ``g_lse`` of the lse."""
        coef = self.wq.sum(1)
        if self.z_loss != 0.0:
            coef = coef + 2.0 * self.z_loss * self.lse
        coef = coef * g
        if g_lse is not None:
            coef = coef + g_lse
        grad = self.logp.exp().mul_(coef[:, None]).sub_(self.wq * g[:, None])
        if self.slope is not None:
            grad.mul_(self.slope)
        return grad

    def target_grad(self, g, weight, p: SoftLCEParams):
        """dL/dq = −(1 − ε)·w·log p·g (the smoothing term ε/V does not depend on q)."""
        scale = g[:, None] * (p.label_smoothing - 1.0)
        grad = self.logp * scale
        return grad * weight if weight is not None else grad


class _Grads:
    """grad_input rows, grad_weight and grad_bias (float32 sums for bf16/fp16), filled chunk by chunk."""

    def __init__(self, input, linear_weight, linear_bias, gi, gw, gb):
        n, d = input.shape
        v = linear_weight.shape[0]
        acc = _acc_dtype(input.dtype)
        self.gi = input.new_empty((n, d)) if gi else None
        self.gw = torch.zeros((v, d), dtype=acc, device=input.device) if gw else None
        self.gb = torch.zeros((v,), dtype=acc, device=input.device) if gb and linear_bias is not None else None

    def add(self, grad, buffer, x_chunk, linear_weight, r0):
        """Add one chunk's dL/dz (``grad``, accumulation dtype); ``buffer`` (its logits) takes the rounded copy."""
        if self.gb is not None:
            self.gb += grad.sum(0)
        g = grad if grad.dtype == buffer.dtype else buffer.copy_(grad)
        # bf16/fp16: float32 inside each GEMM, one rounding per chunk and V block, summed in the float32 self.gw
        add_grad_products(g, x_chunk, linear_weight, r0, self.gi, self.gw)

    def result(self, input, linear_weight, linear_bias):
        gi = self.gi if self.gi is not None else input.new_empty((0,))
        gw = self.gw.to(linear_weight.dtype) if self.gw is not None else linear_weight.new_empty((0,))
        gb = self.gb.to(linear_bias.dtype) if self.gb is not None else input.new_empty((0,))
        return gi, gw, gb


def _chunks(input, linear_weight, linear_bias, p: SoftLCEParams):
    """(r0, x_chunk, logits) per chunk; the logits live in one reused buffer of the input dtype."""
    n = input.shape[0]
    v = linear_weight.shape[0]
    rows = chunk_rows(n, v, _acc_dtype(input.dtype), p.chunk_size)
    buffer = input.new_empty((rows, v)) if n else None
    for r0 in range(0, n, rows):
        x_chunk = input[r0 : r0 + rows]
        z = buffer[: x_chunk.shape[0]]
        logits_into(z, x_chunk, linear_weight, linear_bias)
        yield r0, x_chunk, z


def _mean_scale(p: SoftLCEParams, n: int) -> float:
    return 1.0 / n if p.reduction == 1 and n else 1.0


@torch.library.impl(FORWARD, ("cpu", "cuda"), lib=LIB)
def _forward(
    input,
    linear_weight,
    target,
    linear_bias,
    weight,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
    grad_input,
    grad_weight,
    grad_bias,
):
    p = SoftLCEParams(reduction, label_smoothing, z_loss, softcap, chunk_size)
    n = input.shape[0]
    acc = _acc_dtype(input.dtype)
    w = None if weight is None else weight.to(acc)
    lse = input.new_empty((n,), dtype=acc)
    rows_loss = input.new_empty((n,), dtype=acc)
    want = reduction != 0 and (grad_input or grad_weight or (grad_bias and linear_bias is not None))
    grads = _Grads(input, linear_weight, linear_bias, grad_input, grad_weight, grad_bias) if want else None
    scale = _mean_scale(p, n)
    for r0, x_chunk, z in _chunks(input, linear_weight, linear_bias, p):
        r1 = r0 + z.shape[0]
        c = _Chunk(z, target[r0:r1], w, p, acc)
        lse[r0:r1] = c.lse
        rows_loss[r0:r1] = c.row_loss()
        if grads is not None:
            g = torch.full((z.shape[0],), scale, dtype=acc, device=input.device)
            grads.add(c.logit_grad(g), z, x_chunk, linear_weight, r0)
    if reduction == 0:
        loss = rows_loss
    elif reduction == 1:
        loss = rows_loss.sum() / n  # 0/0 = NaN for an empty batch, as in PyTorch
    else:
        loss = rows_loss.sum()
    if grads is None:
        return loss, lse, input.new_empty((0,)), linear_weight.new_empty((0,)), input.new_empty((0,))
    return (loss, lse, *grads.result(input, linear_weight, linear_bias))


@torch.library.impl(BACKWARD, ("cpu", "cuda"), lib=LIB)
def _backward_op(
    grad_loss,
    grad_lse,
    input,
    linear_weight,
    target,
    linear_bias,
    weight,
    lse,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
    grad_input,
    grad_weight,
    grad_bias,
    grad_target,
):
    p = SoftLCEParams(reduction, label_smoothing, z_loss, softcap, chunk_size)
    n = input.shape[0]
    acc = _acc_dtype(input.dtype)
    w = None if weight is None else weight.to(acc)
    grads = _Grads(input, linear_weight, linear_bias, grad_input, grad_weight, grad_bias)
    want_logits = grad_input or grad_weight or grads.gb is not None
    gq = target.new_empty((n, target.shape[1])) if grad_target else target.new_empty((0,))
    if want_logits or grad_target:
        # per-row upstream gradient; expand() also materialises a stride-0 grad_output
        g = grad_loss.to(acc).expand(n) * _mean_scale(p, n) if reduction != 0 else grad_loss.to(acc)
        g_lse = None if grad_lse is None else grad_lse.to(acc)
        for r0, x_chunk, z in _chunks(input, linear_weight, linear_bias, p):
            r1 = r0 + z.shape[0]
            c = _Chunk(z, target[r0:r1], w, p, acc, lse=lse[r0:r1].to(acc))
            if grad_target:
                gq[r0:r1] = c.target_grad(g[r0:r1], w, p)
            if want_logits:
                grad = c.logit_grad(g[r0:r1], None if g_lse is None else g_lse[r0:r1])
                grads.add(grad, z, x_chunk, linear_weight, r0)
    return (*grads.result(input, linear_weight, linear_bias), gq)


def _forward_fake(
    input,
    linear_weight,
    target,
    linear_bias,
    weight,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
    grad_input,
    grad_weight,
    grad_bias,
):
    n, d = input.shape
    v = linear_weight.shape[0]
    acc = _acc_dtype(input.dtype)
    loss = input.new_empty((n,) if reduction == 0 else (), dtype=acc)
    lse = input.new_empty((n,), dtype=acc)
    want_bias = grad_bias and linear_bias is not None
    grads = reduction != 0 and (grad_input or grad_weight or want_bias)
    gi = _empty_like_flag(grads and grad_input, (n, d), input)
    gw = _empty_like_flag(grads and grad_weight, (v, d), linear_weight)
    gb = linear_bias.new_empty((v,)) if grads and want_bias else input.new_empty((0,))
    return loss, lse, gi, gw, gb


def _backward_fake(
    grad_loss,
    grad_lse,
    input,
    linear_weight,
    target,
    linear_bias,
    weight,
    lse,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
    grad_input,
    grad_weight,
    grad_bias,
    grad_target,
):
    n, d = input.shape
    v = linear_weight.shape[0]
    gi = _empty_like_flag(grad_input, (n, d), input)
    gw = _empty_like_flag(grad_weight, (v, d), linear_weight)
    gb = linear_bias.new_empty((v,)) if grad_bias and linear_bias is not None else input.new_empty((0,))
    gq = target.new_empty((n, target.shape[1])) if grad_target else target.new_empty((0,))
    return gi, gw, gb, gq


def _setup_context(ctx, inputs, output):
    input, linear_weight, target, linear_bias, weight, *options = inputs
    params = SoftLCEParams(*options[:5])
    flags = tuple(options[5:8])
    _loss, lse, gi, gw, gb = output
    ctx.save_for_backward(input, linear_weight, target, linear_bias, weight, lse)
    ctx.params = params
    # Gradients formed in forward (mean/sum), held until the first backward hands them over.
    formed = params.reduction != 0 and any(flags)
    ctx.formed = (gi, gw, gb) if formed else None
    ctx.formed_flags = (flags[0], flags[1], flags[2] and linear_bias is not None) if formed else (False,) * 3
    ctx.mark_non_differentiable(gi, gw, gb)
    ctx.set_materialize_grads(False)


def _is_eager(*tensors: torch.Tensor) -> bool:
    """True for plain tensors (not fake/functional ones being traced by torch.compile or opcheck)."""
    return all(type(t) is torch.Tensor for t in tensors) and not torch.compiler.is_compiling()


def _backward(ctx, grad_loss, grad_lse, _gi, _gw, _gb):
    saved = ctx.saved_tensors
    refuse_double_backward("linear_cross_entropy", grad_loss, grad_lse, *saved)
    input, linear_weight, target, linear_bias, weight, lse = saved
    need_input, need_weight, need_target = ctx.needs_input_grad[:3]
    need_bias = linear_bias is not None and ctx.needs_input_grad[3]
    nones = [None] * 9
    if grad_loss is None and grad_lse is None:
        return None, None, None, None, None, *nones
    p = ctx.params
    formed, ctx.formed = ctx.formed, None  # a second backward (retain_graph=True) recomputes
    have = ctx.formed_flags
    covered = (not need_input or have[0]) and (not need_weight or have[1]) and (not need_bias or have[2])
    gq = None
    if formed is not None and grad_lse is None and covered:
        in_place = _is_eager(grad_loss, *formed)
        gi, gw, gb = (
            (g.mul_(grad_loss) if in_place else g * grad_loss.to(g.dtype)) if h else None
            for g, h in zip(formed, have, strict=True)
        )
        if need_target:  # the formed gradients do not include the target's: one recompute GEMM per chunk
            *_, gq = torch.ops.infofuse.linear_cross_entropy_soft_backward(
                grad_loss, None, input, linear_weight, target, linear_bias, weight, lse, *p.as_args(),
                False, False, False, True,
            )  # fmt: skip
    else:
        if grad_loss is None:
            grad_loss = lse.new_zeros(() if p.reduction != 0 else lse.shape)
        gi, gw, gb, gq = torch.ops.infofuse.linear_cross_entropy_soft_backward(
            grad_loss, grad_lse, input, linear_weight, target, linear_bias, weight, lse, *p.as_args(),
            need_input, need_weight, need_bias, need_target,
        )  # fmt: skip
    return (
        gi if need_input else None,
        gw if need_weight else None,
        gq if need_target else None,
        gb if need_bias else None,
        *nones,
    )


torch.library.register_fake(FORWARD)(_forward_fake)
torch.library.register_fake(BACKWARD)(_backward_fake)
torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context)


def validate_soft_target(target: torch.Tensor, input: torch.Tensor, v: int) -> None:
    """Check a class-probability ``target`` for ``input`` (..., D) and V classes; raises naming ``target``."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in _TARGET_DTYPES:
        raise TypeError(f"a class-probability target must be float32, bfloat16, float16 or float64, got {target.dtype}")
    want = (*input.shape[:-1], v)
    if tuple(target.shape) != want:
        raise ValueError(
            f"a class-probability target must have shape input.shape[:-1] + (V,) = {want}, got {tuple(target.shape)}"
        )
    if target.device != input.device:
        raise ValueError(f"target must be on input's device {input.device}, got {target.device}")


def soft_linear_cross_entropy(
    input2d: torch.Tensor,
    linear_weight: torch.Tensor,
    target2d: torch.Tensor,
    linear_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, lse)`` for validated arguments: ``input2d`` (N, D), ``target2d`` (N, V) class probabilities.

    The loss is (N,) for "none", else a scalar; lse is (N,); both float32 (float64 for float64 inputs).
    Gradients flow to ``input2d``, ``linear_weight``, ``linear_bias`` and ``target2d``.
    """
    params = SoftLCEParams(
        reduction=REDUCTIONS[reduction],
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        chunk_size=None if chunk_size is None else int(chunk_size),
    )
    flags = grad_flags(input2d, linear_weight, linear_bias)
    op = torch.ops.infofuse.linear_cross_entropy_soft_forward
    loss, lse, *_ = op(input2d, linear_weight, target2d, linear_bias, weight, *params.as_args(), *flags)
    return loss, lse

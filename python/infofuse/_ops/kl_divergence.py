"""Custom ops of linear KL / generalised JSD distillation: schemas, fake kernels and autograd.

Every backend implements one pair of ops with the schemas below: ``infofuse::linear_kl_divergence_forward`` /
``_backward`` (the C++ CPU kernel, csrc/cpu/kl_divergence.cpp), ``..._chunked_forward`` / ``_backward`` (library
GEMMs with a Triton row pass, ``kl_divergence_chunked.py``) and ``..._fused_forward`` / ``_backward`` (Triton
kernels that never write a logit, ``kl_divergence_fused.py``). The autograd formula is shared:

* ``reduction`` "mean"/"sum": the forward op already formed every wanted gradient (student, and teacher where
  asked) for ``grad_output = 1`` while each chunk of logits was hot; backward scales them by ``grad_output``
  (in place in eager mode, so the forward's buffers become the gradients).
* ``reduction="none"``, a second backward through a retained graph, or a gradient the forward did not form:
  the backward op recomputes both heads' logits chunk by chunk with the per-token upstream gradient.
"""

from __future__ import annotations

import dataclasses

import torch

from ._autograd import refuse_double_backward
from ._library import define

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

# (student_input, student_weight, teacher_input, teacher_weight, target, student_bias, teacher_bias): the
# tensor arguments of both ops, in this order; the gradients come back for all but target, in this order too.
FORWARD_SCHEMA = (
    "{name}(Tensor student_input, Tensor student_weight, Tensor teacher_input, Tensor teacher_weight, "
    "Tensor? target, Tensor? student_bias, Tensor? teacher_bias, float beta, float temperature, int reduction, "
    "int ignore_index, int? chunk_size, bool grad_student_input, bool grad_student_weight, bool grad_student_bias, "
    "bool grad_teacher_input, bool grad_teacher_weight, bool grad_teacher_bias) -> (Tensor loss, "
    "Tensor grad_student_input, Tensor grad_student_weight, Tensor grad_student_bias, Tensor grad_teacher_input, "
    "Tensor grad_teacher_weight, Tensor grad_teacher_bias)"
)
BACKWARD_SCHEMA = (
    "{name}(Tensor grad_loss, Tensor student_input, Tensor student_weight, Tensor teacher_input, "
    "Tensor teacher_weight, Tensor? target, Tensor? student_bias, Tensor? teacher_bias, float beta, "
    "float temperature, int reduction, int ignore_index, int? chunk_size, bool grad_student_input, "
    "bool grad_student_weight, bool grad_student_bias, bool grad_teacher_input, bool grad_teacher_weight, "
    "bool grad_teacher_bias) -> (Tensor grad_student_input, Tensor grad_student_weight, Tensor grad_student_bias, "
    "Tensor grad_teacher_input, Tensor grad_teacher_weight, Tensor grad_teacher_bias)"
)

# Positions of the differentiable tensors among the forward op's inputs (target, at 4, is not).
_GRAD_POSITIONS = (0, 1, 5, 2, 3, 6)  # student input, weight, bias; teacher input, weight, bias


@dataclasses.dataclass(frozen=True)
class KLParams:
    """The non-tensor options of one call, in the order of the op schema."""

    beta: float
    temperature: float
    reduction: int
    ignore_index: int
    chunk_size: int | None  # None: chosen by the backend

    def as_args(self) -> tuple:
        return dataclasses.astuple(self)


def grad_flags(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias) -> tuple:
    """The six gradient flags of the forward op (student input, weight, bias; teacher input, weight, bias)."""
    on = torch.is_grad_enabled()
    return tuple(
        bool(on and t is not None and t.requires_grad)
        for t in (student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias)
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_placeholders(flags, student_input, student_weight, teacher_input, teacher_weight, student_bias, teacher_bias):
    """The six gradient outputs as the kernels allocate them: full-size where wanted, else empty (0,)."""
    v = student_weight.shape[0]
    shapes = (student_input.shape, student_weight.shape, (v,), teacher_input.shape, teacher_weight.shape, (v,))
    likes = (student_input, student_weight, student_input, teacher_input, teacher_weight, teacher_input)
    present = (True, True, student_bias is not None, True, True, teacher_bias is not None)
    return tuple(
        like.new_empty(tuple(shape)) if flag and ok else like.new_empty((0,))
        for flag, ok, shape, like in zip(flags, present, shapes, likes, strict=True)
    )


def _forward_fake(si, sw, ti, tw, target, sb, tb, beta, temperature, reduction, ignore_index, chunk_size, *flags):
    n = si.shape[0]
    loss = si.new_empty((n,) if reduction == 0 else (), dtype=_acc_dtype(si.dtype))
    formed = flags if reduction != 0 else (False,) * 6
    return (loss, *_grad_placeholders(formed, si, sw, ti, tw, sb, tb))


def _backward_fake(
    grad_loss, si, sw, ti, tw, target, sb, tb, beta, temperature, reduction, ignore_index, chunk, *flags
):
    return _grad_placeholders(flags, si, sw, ti, tw, sb, tb)


def _setup_context(ctx, inputs, output):
    si, sw, ti, tw, target, sb, tb, *options = inputs
    params = KLParams(*options[:5])
    flags = tuple(options[5:11])
    _loss, *grads = output
    ctx.save_for_backward(si, sw, ti, tw, target, sb, tb)
    ctx.params = params
    formed = params.reduction != 0 and any(flags)
    present = (True, True, sb is not None, True, True, tb is not None)
    ctx.formed = tuple(grads) if formed else None
    ctx.formed_flags = tuple(f and p for f, p in zip(flags, present, strict=True)) if formed else (False,) * 6
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)


def _is_eager(*tensors: torch.Tensor) -> bool:
    """Plain tensors outside torch.compile (not fake/functional ones being traced): formed gradients are scaled in
    place there."""
    return all(type(t) is torch.Tensor for t in tensors) and not torch.compiler.is_compiling()


def _make_backward(backward_op):
    def backward(ctx, grad_loss, *_grads):
        return _backward(backward_op, ctx, grad_loss)

    return backward


def _backward(backward_op, ctx, grad_loss):
    si, sw, ti, tw, target, sb, tb = ctx.saved_tensors
    refuse_double_backward("linear_kl_divergence", grad_loss, si, sw, ti, tw, sb, tb)
    nig = ctx.needs_input_grad
    present = (True, True, sb is not None, True, True, tb is not None)
    need = tuple(bool(nig[pos]) and ok for pos, ok in zip(_GRAD_POSITIONS, present, strict=True))
    none = [None] * 18
    if grad_loss is None or not any(need):
        return tuple(none)
    formed, ctx.formed = ctx.formed, None  # a second backward (retain_graph=True) recomputes
    have = ctx.formed_flags
    if formed is not None and all(h or not n for h, n in zip(have, need, strict=True)):
        in_place = _is_eager(grad_loss, *formed)
        grads = [
            (g.mul_(grad_loss) if in_place else g * grad_loss.to(g.dtype)) if h and n else None
            for g, h, n in zip(formed, have, need, strict=True)
        ]
    else:
        grads = backward_op(grad_loss, si, sw, ti, tw, target, sb, tb, *ctx.params.as_args(), *need)
    out = list(none)
    for pos, g, n in zip(_GRAD_POSITIONS, grads, need, strict=True):
        out[pos] = g if n else None
    return tuple(out)


def register_pair(forward_name: str, backward_name: str) -> None:
    """Fake kernels for both ops of a backend and the autograd formula of its forward op."""
    backward_op = getattr(torch.ops.infofuse, backward_name.split("::")[1]).default
    torch.library.register_fake(forward_name)(_forward_fake)
    torch.library.register_fake(backward_name)(_backward_fake)
    torch.library.register_autograd(forward_name, _make_backward(backward_op), setup_context=_setup_context)


# The C++ extension implements these two for CPU (csrc/cpu/kl_divergence.cpp).
register_pair(
    define(FORWARD_SCHEMA, "linear_kl_divergence_forward"), define(BACKWARD_SCHEMA, "linear_kl_divergence_backward")
)

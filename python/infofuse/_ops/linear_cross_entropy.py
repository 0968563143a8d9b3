"""Custom ops of linear cross-entropy: fake kernels and autograd.

The ops ``infofuse::linear_cross_entropy_forward`` / ``_backward`` are declared in ``csrc/infofuse.cpp`` and
implemented per backend (the C++ CPU kernel now; the GPU backends register theirs beside their kernels). Here
they get what makes them first-class torch ops: fake kernels that mirror the real allocations exactly (for
``torch.compile`` and ``opcheck``) and one autograd formula:

* ``reduction`` "mean"/"sum": the forward op already formed the gradients for ``grad_output = 1`` while each
  chunk of logits was hot; backward scales them by ``grad_output`` (in place, in eager mode: the forward's
  buffers become the gradients, no copy).
* ``reduction="none"``, a gradient flowing into the returned lse or entropy, a second backward through a
  retained graph, or a gradient the forward did not form: the backward op recomputes the logits chunk by chunk
  from the lse (and the saved entropy, for the entropy's gradient).

Two options sit at the end of the schemas with defaults, so that older positional calls keep working:
``temperature`` T > 0 divides the (softcapped) logits before the softmax (every returned quantity, lse included,
is of the logits ℓ = ẑ/T; the gradients carry the 1/T), and ``want_entropy`` adds the per-row entropy
H = lse − Σ_j p_j·ℓ_j as a last output (0 at ignored rows, which take no entropy gradient), found in the same
pass over the logits as the lse. Without it the entropy output is an empty, non-differentiable placeholder and
no backend does any entropy work.
"""

from __future__ import annotations

import dataclasses

import torch

from ._autograd import refuse_double_backward
from ._library import define

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


@dataclasses.dataclass(frozen=True)
class LCEParams:
    """The non-tensor options of one call, in the order of the op schema."""

    reduction: int
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None  # None: off
    chunk_size: int | None  # None: chosen by the backend

    def as_args(self) -> tuple:
        return dataclasses.astuple(self)


def grad_flags(input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: torch.Tensor | None) -> tuple:
    """The forward ops' (grad_input, grad_weight, grad_bias): which gradients autograd will ask for."""
    grad_on = torch.is_grad_enabled()
    return (
        grad_on and input.requires_grad,
        grad_on and linear_weight.requires_grad,
        grad_on and linear_bias is not None and linear_bias.requires_grad,
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_like_flag(flag: bool, shape, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(shape) if flag else like.new_empty((0,))


def _forward_fake(
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
    n, d = input.shape
    v = linear_weight.shape[0]
    acc = _acc_dtype(input.dtype)
    loss = input.new_empty((n,) if reduction == 0 else (), dtype=acc)
    lse = input.new_empty((n,), dtype=acc)
    grads = reduction != 0 and (grad_input or grad_weight or (grad_bias and linear_bias is not None))
    gi = _empty_like_flag(grads and grad_input, (n, d), input)
    gw = _empty_like_flag(grads and grad_weight, (v, d), linear_weight)
    gb = linear_bias.new_empty((v,)) if grads and grad_bias and linear_bias is not None else input.new_empty((0,))
    argmax = input.new_empty((n if want_argmax else 0,), dtype=torch.int64)
    entropy = input.new_empty((n if want_entropy else 0,), dtype=acc)
    return loss, lse, gi, gw, gb, argmax, entropy


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
    n, d = input.shape
    v = linear_weight.shape[0]
    any_grad = grad_input or grad_weight or (grad_bias and linear_bias is not None)
    gi = _empty_like_flag(any_grad and grad_input, (n, d), input)
    gw = _empty_like_flag(any_grad and grad_weight, (v, d), linear_weight)
    gb = linear_bias.new_empty((v,)) if any_grad and grad_bias and linear_bias is not None else input.new_empty((0,))
    return gi, gw, gb


def _setup_context(ctx, inputs, output):
    input, linear_weight, target, linear_bias, weight, *options = inputs
    params = LCEParams(*options[:6])
    flags = tuple(options[6:9])
    temperature, want_entropy = options[10], options[11]
    loss, lse, gi, gw, gb, argmax, entropy = output
    ctx.save_for_backward(input, linear_weight, target, linear_bias, weight, lse, entropy if want_entropy else None)
    ctx.params = params
    ctx.temperature = temperature
    # Gradients formed in forward (mean/sum), held until the first backward hands them over.
    formed = params.reduction != 0 and any(flags)
    ctx.formed = (gi, gw, gb) if formed else None
    ctx.formed_flags = (flags[0], flags[1], flags[2] and linear_bias is not None) if formed else (False,) * 3
    ctx.mark_non_differentiable(gi, gw, gb, argmax, *(() if want_entropy else (entropy,)))
    ctx.set_materialize_grads(False)


def _is_eager(*tensors: torch.Tensor) -> bool:
    """True for plain tensors (not fake/functional ones being traced by torch.compile or opcheck)."""
    return all(type(t) is torch.Tensor for t in tensors) and not torch.compiler.is_compiling()


def _scale_formed(grad: torch.Tensor, scale: torch.Tensor, in_place: bool) -> torch.Tensor:
    if in_place:
        return grad.mul_(scale)
    return grad * scale.to(grad.dtype)


def _make_backward(backward_op):
    """The autograd formula of a forward op whose recompute path is ``backward_op`` (same schema for every backend)."""

    def backward(ctx, grad_loss, grad_lse, _gi, _gw, _gb, _argmax, grad_entropy):
        return _backward(backward_op, ctx, grad_loss, grad_lse, grad_entropy)

    return backward


def _backward(backward_op, ctx, grad_loss, grad_lse, grad_entropy):
    input, linear_weight, target, linear_bias, weight, lse, entropy = ctx.saved_tensors
    refuse_double_backward("linear_cross_entropy", grad_loss, grad_lse, grad_entropy, input, linear_weight, linear_bias)
    need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_bias = linear_bias is not None and ctx.needs_input_grad[3]
    if entropy is None:  # the entropy output is an empty placeholder: no gradient flows through it
        grad_entropy = None
    if grad_loss is None and grad_lse is None and grad_entropy is None:
        return None, None, None, None, None, *([None] * 12)
    formed, ctx.formed = ctx.formed, None  # a second backward (retain_graph=True) recomputes
    have = ctx.formed_flags
    covered = (not need_input or have[0]) and (not need_weight or have[1]) and (not need_bias or have[2])
    if formed is not None and grad_lse is None and grad_entropy is None and covered:
        in_place = _is_eager(grad_loss, *formed)
        gi, gw, gb = (_scale_formed(g, grad_loss, in_place) if h else None for g, h in zip(formed, have, strict=True))
    else:
        p = ctx.params
        if grad_loss is None:
            grad_loss = lse.new_zeros(() if p.reduction != 0 else lse.shape)
        extra = {"temperature": ctx.temperature}
        if grad_entropy is not None:  # the entropy term costs nothing where no gradient reaches the entropy
            extra.update(grad_entropy=grad_entropy, entropy=entropy)
        gi, gw, gb = backward_op(
            grad_loss,
            grad_lse,
            input,
            linear_weight,
            target,
            linear_bias,
            weight,
            lse,
            *p.as_args(),
            need_input,
            need_weight,
            need_bias,
            **extra,
        )
    return (
        gi if need_input else None,
        gw if need_weight else None,
        None,
        gb if need_bias else None,
        *([None] * 13),
    )


# The forward and backward schemas every backend's pair of ops shares ("{name}" is the op's name).
FORWARD_SCHEMA = (
    "{name}(Tensor input, Tensor linear_weight, Tensor target, Tensor? linear_bias, Tensor? weight, int reduction, "
    "int ignore_index, float label_smoothing, float z_loss, float? softcap, int? chunk_size, bool grad_input, "
    "bool grad_weight, bool grad_bias, bool want_argmax, float temperature=1.0, bool want_entropy=False) -> "
    "(Tensor loss, Tensor lse, Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor argmax, "
    "Tensor entropy)"
)
BACKWARD_SCHEMA = (
    "{name}(Tensor grad_loss, Tensor? grad_lse, Tensor input, Tensor linear_weight, Tensor target, "
    "Tensor? linear_bias, Tensor? weight, Tensor lse, int reduction, int ignore_index, float label_smoothing, "
    "float z_loss, float? softcap, int? chunk_size, bool grad_input, bool grad_weight, bool grad_bias, "
    "Tensor? grad_entropy=None, Tensor? entropy=None, float temperature=1.0) "
    "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)"
)


def register_pair(forward_name: str, backward_name: str) -> None:
    """Fake kernels for both ops of a backend and the autograd formula of its forward op."""
    backward_op = getattr(torch.ops.infofuse, backward_name.split("::")[1]).default
    torch.library.register_fake(forward_name)(_forward_fake)
    torch.library.register_fake(backward_name)(_backward_fake)
    torch.library.register_autograd(forward_name, _make_backward(backward_op), setup_context=_setup_context)


# The C++ extension implements these two for CPU (csrc/cpu/linear_cross_entropy.cpp).
register_pair(
    define(FORWARD_SCHEMA, "linear_cross_entropy_forward"), define(BACKWARD_SCHEMA, "linear_cross_entropy_backward")
)

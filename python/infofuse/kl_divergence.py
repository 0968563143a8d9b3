"""Linear KL / generalised JSD distillation between a teacher's and a student's linear heads, without logits."""

from __future__ import annotations

import numbers
import warnings

import torch

from . import _ext
from ._ops import _triton_common
from ._ops import kl_divergence_chunked as _chunked  # noqa: F401 (registers the chunked ops)
from ._ops import kl_divergence_fused as _fused  # noqa: F401 (registers the fused ops)
from ._ops.kl_divergence import REDUCTIONS, KLParams, grad_flags
from .reference import linear_kl_divergence_reference

__all__ = ["linear_kl_divergence"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_IMPLS = ("cpu", "chunked", "fused", "reference")
_warned_fallback: set[str] = set()


def _check_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _validate(si, sw, ti, tw, sb, tb, temperature, beta, target, ignore_index, reduction, impl, chunk_size, trg):
    named = {"student_input": si, "student_weight": sw, "teacher_input": ti, "teacher_weight": tw}
    for name, t in named.items():
        _check_tensor(name, t)
    for name, t in (("student_input", si), ("teacher_input", ti)):
        if t.dim() < 1:
            raise ValueError(f"{name} must have shape (..., D), got a 0-dim tensor")
    for name, t in (("student_weight", sw), ("teacher_weight", tw)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (V, D), got shape {tuple(t.shape)}")
    if sw.shape[1] != si.shape[-1]:
        raise ValueError(
            f"student_weight must be (V, D_s) with D_s = student_input.shape[-1] = {si.shape[-1]}, "
            f"got shape {tuple(sw.shape)}"
        )
    if tw.shape[1] != ti.shape[-1]:
        raise ValueError(
            f"teacher_weight must be (V, D_t) with D_t = teacher_input.shape[-1] = {ti.shape[-1]}, "
            f"got shape {tuple(tw.shape)}"
        )
    v = sw.shape[0]
    if tw.shape[0] != v:
        raise ValueError(
            f"teacher and student must share the vocabulary: teacher_weight has V = {tw.shape[0]} rows, "
            f"student_weight has V = {v}"
        )
    if tuple(ti.shape[:-1]) != tuple(si.shape[:-1]):
        raise ValueError(
            f"teacher_input must have the student's leading shape student_input.shape[:-1] = {tuple(si.shape[:-1])}, "
            f"got teacher_input of shape {tuple(ti.shape)}"
        )
    if si.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"student_input must be float32, bfloat16, float16 or float64, got {si.dtype}")
    for name, t in (("student_weight", sw), ("teacher_input", ti), ("teacher_weight", tw)):
        if t.dtype != si.dtype:
            raise TypeError(f"{name} must have student_input's dtype {si.dtype}, got {t.dtype}")
    for name, t in (("student_bias", sb), ("teacher_bias", tb)):
        if t is None:
            continue
        _check_tensor(name, t)
        if tuple(t.shape) != (v,):
            raise ValueError(f"{name} must have shape (V,) = ({v},), got {tuple(t.shape)}")
        if t.dtype != si.dtype:
            raise TypeError(f"{name} must have student_input's dtype {si.dtype}, got {t.dtype}")
    if target is not None:
        _check_tensor("target", target)
        if tuple(target.shape) != tuple(si.shape[:-1]):
            raise ValueError(
                f"target must have shape student_input.shape[:-1] = {tuple(si.shape[:-1])}, got {tuple(target.shape)}"
            )
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(
                f"target must be an integer tensor (token ids; only ignore_index is read), got {target.dtype}"
            )
    tensors = {"student_input": si, "student_weight": sw, "teacher_input": ti, "teacher_weight": tw}
    tensors.update({"student_bias": sb, "teacher_bias": tb, "target": target})
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in tensors.items() if t is not None)
        raise ValueError(f"all tensors must be on one device, got {where}")
    if not isinstance(beta, numbers.Real) or isinstance(beta, bool) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be a float in [0, 1], got {beta!r}")
    if (
        not isinstance(temperature, numbers.Real)
        or isinstance(temperature, bool)
        or not 0.0 < float(temperature) < float("inf")
    ):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (
        not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if impl is not None and impl not in _IMPLS:
        raise ValueError(f"impl must be None, 'cpu', 'chunked', 'fused' or 'reference', got {impl!r}")
    if not isinstance(trg, bool):
        raise TypeError(f"teacher_requires_grad must be a bool, got {type(trg).__name__}")


def _default_impl(device: torch.device) -> str:
    if device.type == "cpu" and _ext.cpp_available():
        return "cpu"
    if device.type == "cuda" and _triton_common.triton_usable(device) is None:
        return "chunked"
    if device.type not in _warned_fallback and not torch.compiler.is_compiling():
        _warned_fallback.add(device.type)
        warnings.warn(
            f"infofuse.linear_kl_divergence: no infofuse backend runs on {device.type} here; using "
            "impl='reference', which materialises both heads' N×V logits",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


def linear_kl_divergence(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.0,
    target: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    teacher_requires_grad: bool = False,
    impl: str | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """KL divergence or generalised Jensen–Shannon divergence between a teacher's and a student's linear heads,
    over the whole vocabulary, without materialising either head's N×V logits.

    Equivalent PyTorch (the reference, ``infofuse.reference.linear_kl_divergence_reference``)::

        log_q = (F.linear(student_input, student_weight, student_bias).float() / temperature).log_softmax(-1)
        log_p = (F.linear(teacher_input, teacher_weight, teacher_bias).float() / temperature).log_softmax(-1)
        if beta == 0:    # forward KL(P‖Q), P the teacher, Q the student
            per_token = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
        elif beta == 1:  # reverse KL(Q‖P)
            per_token = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
        else:            # β-skew JSD, M = β·P + (1 − β)·Q
            log_m = torch.logaddexp(log_p + log(beta), log_q + log(1 - beta))
            per_token = (beta * F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)
                         + (1 - beta) * F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1))
        per_token = per_token * (target != ignore_index)     # target=None: every token counts
        loss = per_token.sum() / (target != ignore_index).sum()   # "mean"

    This is Liger-Kernel's generalised JSD convention (``LigerFusedLinearJSD``): β weights the teacher in M and
    KL(P‖M); the endpoints are the two KL divergences, not the limits of the middle formula (which vanishes at
    both ends). "mean" is "batchmean"-style, as Liger normalises: the sum over tokens and vocabulary divided by
    the number of tokens not ignored. The loss is not multiplied by T² (Hinton's scaling): multiply it yourself
    (``loss * temperature**2``) where gradient magnitudes must not depend on T. docs/kl_divergence.md has the
    math and the gradients.

    Args:
        student_input: (..., D_s) float32, bfloat16, float16 (or float64) student activations.
        student_weight: (V, D_s) student head, same dtype.
        teacher_input: (..., D_t) teacher activations, same leading shape and dtype; D_t may differ from D_s.
        teacher_weight: (V, D_t) teacher head: the vocabulary V must be the student's.
        student_bias, teacher_bias: optional (V,) biases, same dtype.
        temperature: T > 0; both heads' logits are divided by it before the softmaxes.
        beta: β in [0, 1]: 0 forward KL(P‖Q), 1 reverse KL(Q‖P), in between the β-skew JSD.
        target: optional (...) = ``student_input.shape[:-1]`` integer tensor; tokens where it equals
            ``ignore_index`` count neither in the loss nor in the "mean" divisor and get no gradient. Its other
            values are not read (None: no token is ignored).
        ignore_index: the masked value of ``target`` (-100).
        reduction: "mean" (over tokens not ignored; NaN when every token is ignored, as in PyTorch), "sum" or
            "none" (the per-token divergence in ``student_input.shape[:-1]``, 0 at ignored tokens).
        teacher_requires_grad: False (default): the teacher is a fixed target; no gradient flows to its input,
            weight or bias even if they require one (they are detached), and the kernels form the student's
            gradients only. True: gradients flow to every teacher tensor that requires one too.
        impl: None picks by device ("cpu" for CPU tensors, "chunked" for CUDA tensors); "cpu" (C++ over row
            chunks), "chunked" (library GEMMs over row chunks with a Triton row pass between; CUDA, or CPU
            tensors under ``TRITON_INTERPRET=1``; float32/bfloat16/float16), "fused" (Triton kernels that form both
            heads' logits only as tiles in registers, never in memory; same devices and dtypes as "chunked";
            gradients by float32 atomics, refused on CUDA under ``torch.use_deterministic_algorithms(True)``) or
            "reference" (plain PyTorch, materialises both heads' logits).
        chunk_size: rows of each head's logits held at once (None: on the CPU 32 MiB for both heads, but at least
            max(D_s, D_t)/32 rows; on the GPU as the chunked linear cross-entropy picks for twice the vocabulary).
            "fused" holds no chunk and ignores it.

    Returns:
        The loss, float32 (float64 for float64 inputs): a scalar for "mean"/"sum", ``student_input.shape[:-1]``
        for "none". Gradients are in each tensor's own dtype, accumulated in float32.

    Double backward is supported by ``impl="reference"`` only; the kernel backends raise a ``RuntimeError``.
    """
    with torch.profiler.record_function("infofuse::linear_kl_divergence"):
        _validate(
            student_input,
            student_weight,
            teacher_input,
            teacher_weight,
            student_bias,
            teacher_bias,
            temperature,
            beta,
            target,
            ignore_index,
            reduction,
            impl,
            chunk_size,
            teacher_requires_grad,
        )
        if not teacher_requires_grad:
            teacher_input = teacher_input.detach()
            teacher_weight = teacher_weight.detach()
            teacher_bias = None if teacher_bias is None else teacher_bias.detach()
        batch_shape = student_input.shape[:-1]
        device = student_input.device
        if impl is None:
            impl = _default_impl(device)
        beta, temperature = float(beta), float(temperature)
        if impl == "reference":
            loss = linear_kl_divergence_reference(
                student_input,
                student_weight,
                teacher_input,
                teacher_weight,
                student_bias=student_bias,
                teacher_bias=teacher_bias,
                temperature=temperature,
                beta=beta,
                target=target,
                ignore_index=int(ignore_index),
                reduction=reduction,
                compute_dtype=torch.float64 if student_input.dtype == torch.float64 else torch.float32,
            )
            return loss.reshape(batch_shape) if reduction == "none" else loss
        if impl == "cpu":
            _ext.require_cpp("cpu")
            if device.type != "cpu":
                raise ValueError(f"impl='cpu' needs CPU tensors, got tensors on {device}")
            forward_op = torch.ops.infofuse.linear_kl_divergence_forward
        else:
            _triton_common.check_triton_input(student_input, impl)
            forward_op = (
                torch.ops.infofuse.linear_kl_divergence_fused_forward
                if impl == "fused"
                else torch.ops.infofuse.linear_kl_divergence_chunked_forward
            )
        n = batch_shape.numel()
        params = KLParams(
            beta=beta,
            temperature=temperature,
            reduction=REDUCTIONS[reduction],
            ignore_index=int(ignore_index),
            chunk_size=None if chunk_size is None else int(chunk_size),
        )
        flags = grad_flags(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias)
        t = None if target is None else target.reshape(n).long()
        loss, *_ = forward_op(
            student_input.reshape(n, student_input.shape[-1]),
            student_weight,
            teacher_input.reshape(n, teacher_input.shape[-1]),
            teacher_weight,
            t,
            student_bias,
            teacher_bias,
            *params.as_args(),
            *flags,
        )
        return loss.reshape(batch_shape) if reduction == "none" else loss

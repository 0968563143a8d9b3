"""Linear cross-entropy: ``cross_entropy(input @ linear_weight.T + linear_bias, target)`` without the N×V logits."""

from __future__ import annotations

import numbers
import warnings
from typing import Literal, overload

import torch

from . import _ext
from ._ops import _triton_common
from ._ops import linear_cross_entropy_chunked as _chunked  # noqa: F401 (registers the chunked ops)
from ._ops import linear_cross_entropy_fused as _fused  # noqa: F401 (registers the fused ops)
from ._ops.linear_cross_entropy import REDUCTIONS, LCEParams, grad_flags
from ._ops.linear_cross_entropy_soft import soft_linear_cross_entropy, validate_soft_target
from .reference import linear_cross_entropy_reference, linear_log_probs_reference

__all__ = ["linear_cross_entropy", "available_impls"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TRITON_IMPLS = ("chunked", "fused")
_warned_fallback: set[str] = set()


def available_impls(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """The ``impl=`` values that can run on ``device`` in this installation, the default first.

    On CPU tensors the Triton strategies run only under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).
    """
    device = torch.device(device)
    triton_ok = _triton_common.triton_usable(device) is None
    if device.type == "cpu":
        cpp = ("cpu",) if _ext.cpp_available() else ()
        return (*cpp, "reference", *(_TRITON_IMPLS if triton_ok else ()))
    return (*(_TRITON_IMPLS if triton_ok else ()), "reference")


def _default_impl(device: torch.device) -> str:
    if device.type == "cpu" and _ext.cpp_available():
        return "cpu"
    if device.type == "cuda" and _triton_common.triton_usable(device) is None:
        return "chunked"
    reason = (
        f"the C++ extension did not load ({_ext.build_info().get('error')})"
        if device.type == "cpu"
        else f"no infofuse backend runs on {device.type} here ({_triton_common.triton_usable(device)})"
    )
    if device.type not in _warned_fallback and not torch.compiler.is_compiling():
        _warned_fallback.add(device.type)
        warnings.warn(
            f"infofuse.linear_cross_entropy: {reason}; using impl='reference', which materialises the N×V logits",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


def _check_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _validate(
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
    impl,
    chunk_size,
    token_weight,
    options,
    return_argmax=False,
    return_entropy=False,
):
    _check_tensor("input", input)
    _check_tensor("linear_weight", linear_weight)
    _check_tensor("target", target)
    if input.dim() < 1:
        raise ValueError("input must have shape (..., D), got a 0-dim tensor")
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must be 2-D (V, D), got shape {tuple(linear_weight.shape)}")
    d, v = input.shape[-1], linear_weight.shape[0]
    if linear_weight.shape[1] != d:
        raise ValueError(
            f"linear_weight must be (V, D) with D = input.shape[-1] = {d}, got shape {tuple(linear_weight.shape)}"
        )
    soft = target.dtype.is_floating_point
    if soft:  # class probabilities, (..., V)
        validate_soft_target(target, input, v)
        if ignore_index is not None:
            raise ValueError(
                f"ignore_index applies to class-index targets only; got ignore_index={ignore_index} with a "
                "class-probability target (pass None, as torch does)"
            )
    else:
        if tuple(target.shape) != tuple(input.shape[:-1]):
            raise ValueError(
                f"target must have shape input.shape[:-1] = {tuple(input.shape[:-1])} (class indices) or "
                f"input.shape[:-1] + (V,) = {(*input.shape[:-1], v)} (class probabilities), got {tuple(target.shape)}"
            )
        if target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices or float class probabilities, got {target.dtype}")
    if soft and return_argmax:
        raise ValueError("return_argmax is for class-index targets; got a class-probability target")
    if soft and return_entropy:
        raise ValueError("return_entropy is for class-index targets; got a class-probability target")
    if token_weight is not None:
        _check_tensor("token_weight", token_weight)
        if tuple(token_weight.shape) != tuple(input.shape[:-1]):
            raise ValueError(
                f"token_weight must have shape input.shape[:-1] = {tuple(input.shape[:-1])}, "
                f"got {tuple(token_weight.shape)}"
            )
        if not token_weight.dtype.is_floating_point:
            raise TypeError(f"token_weight must be floating point, got {token_weight.dtype}")
        if token_weight.device != input.device:
            raise ValueError(f"token_weight must be on input's device {input.device}, got {token_weight.device}")
    if options is not None:
        options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        if options_cls is not None and not isinstance(options, options_cls):
            raise TypeError(
                f"options must be None or a torch.nn.LinearCrossEntropyOptions, got {type(options).__name__}"
            )
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float32, bfloat16, float16 or float64, got {input.dtype}")
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight must have input's dtype {input.dtype}, got {linear_weight.dtype}")
    if linear_bias is not None:
        _check_tensor("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (v,):
            raise ValueError(f"linear_bias must have shape (V,) = ({v},), got {tuple(linear_bias.shape)}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias must have input's dtype {input.dtype}, got {linear_bias.dtype}")
    if weight is not None:
        _check_tensor("weight", weight)
        if tuple(weight.shape) != (v,):
            raise ValueError(f"weight (class weights) must have shape (V,) = ({v},), got {tuple(weight.shape)}")
        if not weight.dtype.is_floating_point:
            raise TypeError(f"weight (class weights) must be floating point, got {weight.dtype}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("weight (class weights) receives no gradient, as in PyTorch; pass weight.detach()")
    devices = {t.device for t in (input, linear_weight, target, linear_bias, weight) if t is not None}
    if len(devices) > 1:
        named = zip(
            ("input", "linear_weight", "target", "linear_bias", "weight"),
            (input, linear_weight, target, linear_bias, weight),
            strict=True,
        )
        where = ", ".join(f"{n} on {t.device}" for n, t in named if t is not None)
        raise ValueError(f"all tensors must be on one device, got {where}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if ignore_index is not None and (not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool)):
        raise TypeError(f"ignore_index must be None or an int, got {type(ignore_index).__name__}")
    if not isinstance(label_smoothing, numbers.Real) or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not isinstance(z_loss, numbers.Real) or not float(z_loss) >= 0.0 or z_loss == float("inf"):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is not None and (not isinstance(softcap, numbers.Real) or not 0.0 < float(softcap) < float("inf")):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if impl is not None and impl not in ("cpu", "chunked", "fused", "reference"):
        raise ValueError(f"impl must be None, 'cpu', 'chunked', 'fused' or 'reference', got {impl!r}")
    # Target range: a data-dependent check, done here where it is free (CPU tensors, eager). Under
    # torch.compile the C++ kernel checks the same thing before its first GEMM.
    if not soft and target.device.type == "cpu" and target.numel() and not torch.compiler.is_compiling():
        ignore_index = -100 if ignore_index is None else ignore_index
        t = target.reshape(-1)
        bad = (t != ignore_index) & ((t < 0) | (t >= v))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"target[{i}] (flattened) = {int(t[i])} is outside [0, V) with V = {v} and is not "
                f"ignore_index ({ignore_index})"
            )


@overload
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = ...,
    weight: torch.Tensor | None = ...,
    reduction: str = ...,
    ignore_index: int | None = ...,
    label_smoothing: float = ...,
    options: object | None = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    token_weight: torch.Tensor | None = ...,
    return_lse: Literal[False] = ...,
    return_argmax: Literal[False] = ...,
    return_entropy: Literal[False] = ...,
    impl: str | None = ...,
    chunk_size: int | None = ...,
) -> torch.Tensor: ...


@overload
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = ...,
    weight: torch.Tensor | None = ...,
    reduction: str = ...,
    ignore_index: int | None = ...,
    label_smoothing: float = ...,
    options: object | None = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    token_weight: torch.Tensor | None = ...,
    return_lse: Literal[True],
    return_argmax: Literal[False] = ...,
    return_entropy: Literal[False] = ...,
    impl: str | None = ...,
    chunk_size: int | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = ...,
    weight: torch.Tensor | None = ...,
    reduction: str = ...,
    ignore_index: int | None = ...,
    label_smoothing: float = ...,
    options: object | None = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    token_weight: torch.Tensor | None = ...,
    return_lse: bool = ...,
    return_argmax: Literal[True],
    return_entropy: bool = ...,
    impl: str | None = ...,
    chunk_size: int | None = ...,
) -> tuple[torch.Tensor, ...]: ...


@overload
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = ...,
    weight: torch.Tensor | None = ...,
    reduction: str = ...,
    ignore_index: int | None = ...,
    label_smoothing: float = ...,
    options: object | None = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    token_weight: torch.Tensor | None = ...,
    return_lse: bool = ...,
    return_argmax: bool = ...,
    return_entropy: Literal[True],
    impl: str | None = ...,
    chunk_size: int | None = ...,
) -> tuple[torch.Tensor, ...]: ...


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: object | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    token_weight: torch.Tensor | None = None,
    return_lse: bool = False,
    return_argmax: bool = False,
    return_entropy: bool = False,
    impl: str | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Cross-entropy of a linear layer's output, without materialising the N×V logits.

    Equivalent PyTorch (the reference, ``infofuse.reference.linear_cross_entropy_reference``)::

        logits = F.linear(input, linear_weight, linear_bias).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        loss = F.cross_entropy(logits.flatten(0, -2), target.flatten(0, input.dim() - 2), weight=weight,
                               reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing)
        loss = loss + z_loss * lse**2   # lse = logits.logsumexp(-1), reduced like the loss over valid tokens

    The arguments up to ``options`` are those of ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13),
    with its defaults, so existing calls work unchanged; the rest are keyword-only extras.

    Args:
        input: (..., D) float32, bfloat16, float16 (or float64) activations. D = 0 is allowed (the loss of the
            bias alone, as in PyTorch).
        linear_weight: (V, D) classifier weight, same dtype as ``input``.
        target: either (...) = ``input.shape[:-1]`` integer class indices in [0, V) or ``ignore_index``; or
            (..., V) floating-point class probabilities (PyTorch's probability-target definition: with label
            smoothing ε the target becomes (1 − ε)·q + ε/V, class weights multiply each class's term, "mean"
            divides by the number of rows, no ``ignore_index``; rows need not sum to 1). Probability targets are
            streamed chunk by chunk beside the logits (a torch-op path for every ``impl``) and receive a
            gradient if they require one, as in PyTorch.
        linear_bias: optional (V,) bias, same dtype as ``input``.
        weight: optional (V,) per-class rescaling, as in ``F.cross_entropy`` ("mean" divides by
            Σ weight[target] over non-ignored tokens for class indices). Receives no gradient.
        reduction: "mean" | "sum" | "none". "none" returns the per-token loss in ``input.shape[:-1]``, 0 at
            ignored tokens. "mean" over zero valid tokens is NaN, as in PyTorch.
        ignore_index: class-index targets equal to it contribute neither loss nor gradient (None: -100, as in
            PyTorch). Must be None with probability targets.
        label_smoothing: ε in [0, 1], PyTorch's definition (with class weights, the smoothing term is weighted
            per class too).
        options: a ``torch.nn.LinearCrossEntropyOptions`` (torch >= 2.13), accepted for drop-in use. Its
            ``batch_chunk_size`` sets ``chunk_size`` when that is not given; ``acc_policy``, ``acc_dtype``,
            ``chunking_method`` and ``allow_retain_graph`` do not apply (infofuse always accumulates in float32,
            picks its own chunking, and supports ``retain_graph``) and are ignored.
        z_loss: λ >= 0; adds λ·lse² per non-ignored token, not class-weighted; "mean" divides that term by the
            number of non-ignored tokens.
        softcap: c > 0 replaces the logits by c·tanh(logits / c) (Gemma-2) before everything else.
        token_weight: optional (...) = ``input.shape[:-1]`` per-token scale τ: each token's loss (every term) is
            multiplied by τ before the reduction, whose divisor does not change ("mean" = Σ τ_i·loss_i divided by
            what it would be divided by without τ; "none" returns τ_i·loss_i). It receives a gradient if it
            requires one. The kernels then run with ``reduction="none"`` and recompute the logits in backward
            (4 GEMMs instead of 3).
        return_lse: also return the per-token log-sum-exp of the (softcapped) logits, in ``input.shape[:-1]``;
            gradients flow through it too.
        return_argmax: also return each token's predicted class, the first index of its largest (softcapped)
            logit, int64 in ``input.shape[:-1]``, found in the same pass over the logits (no extra GEMM; class-index
            targets). Token accuracy, as trainers log it: ``(argmax == target)[target != ignore_index].float()
            .mean()``. Where two logits are within rounding of each other the backends may pick either.
        return_entropy: also return each token's entropy H(p) = −Σ_v p_v·log p_v of p = softmax of the
            (softcapped) logits, float32 (float64 for float64 inputs) in ``input.shape[:-1]``, found in the same
            pass over the logits as the lse (no extra GEMM; class-index targets). 0 at ignored tokens. It is
            differentiable: a gradient flowing into it adds −p_v·(log p_v + H) per logit (the logits are then
            recomputed in backward, as for a gradient into the lse); ``.detach()`` it to only log it.
        impl: None picks by device ("cpu" for CPU tensors, "chunked" for CUDA tensors); "cpu" (C++ over row
            chunks), "chunked" (library GEMMs over row chunks with a Triton row pass between), "fused" (Triton
            kernels that never write logits to memory; float32 atomics, so reproducible only to rounding) — both
            on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``, for float32/bfloat16/float16 — and
            "reference" (plain PyTorch, materialises the logits). ``available_impls(device)`` lists what runs.
        chunk_size: rows of logits held at once by the chunked backends (None: about 32 MiB of logits on the
            CPU; on the GPU a quarter of the full logits, at most 1 GiB).

    Returns:
        The loss, float32 (float64 for float64 inputs): a scalar for "mean"/"sum", ``input.shape[:-1]`` for
        "none"; with ``return_lse``, ``return_argmax`` and/or ``return_entropy``, the tuple
        ``(loss[, lse][, argmax][, entropy])``, in that order. Gradients
        flow to ``input``, ``linear_weight`` and ``linear_bias``, each in its own dtype, accumulated in float32.

    Double backward (``create_graph=True``) is supported by ``impl="reference"`` only; the kernel backends raise
    a ``RuntimeError`` saying so rather than return a gradient without its second-order terms.
    NaN or inf in the inputs propagate to the loss and the gradients; they are not checked for.
    """
    with torch.profiler.record_function("infofuse::linear_cross_entropy"):
        _validate(
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
            impl,
            chunk_size,
            token_weight,
            options,
            return_argmax,
            return_entropy,
        )
        soft = target.dtype.is_floating_point
        if ignore_index is None:
            ignore_index = -100
        if chunk_size is None and options is not None:
            chunk_size = getattr(options, "batch_chunk_size", None)
        batch_shape = input.shape[:-1]
        # token weights: per-token losses from the kernels, scaled and reduced here (the divisor unchanged)
        op_reduction = "none" if token_weight is not None else reduction
        device = input.device
        if impl is None:
            impl = _default_impl(device)
        softcap = None if softcap is None else float(softcap)
        if impl == "reference":
            loss, lse = linear_cross_entropy_reference(
                input,
                linear_weight,
                target,
                linear_bias=linear_bias,
                weight=weight,
                reduction=op_reduction,
                ignore_index=ignore_index,
                label_smoothing=float(label_smoothing),
                z_loss=float(z_loss),
                softcap=softcap,
                return_lse=True,
                compute_dtype=torch.float64 if input.dtype == torch.float64 else torch.float32,
            )
            loss, lse = loss.reshape(-1) if op_reduction == "none" else loss, lse.reshape(-1)
            if return_argmax:
                with torch.no_grad():
                    logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
                    logits = logits.to(torch.float64 if input.dtype == torch.float64 else torch.float32)
                    if softcap is not None:
                        logits = softcap * torch.tanh(logits / softcap)
                    argmax = logits.argmax(-1).reshape(-1)
            if return_entropy:
                entropy = linear_log_probs_reference(
                    input,
                    linear_weight,
                    target,
                    linear_bias,
                    softcap=softcap,
                    return_entropy=True,
                    ignore_index=ignore_index,
                    compute_dtype=torch.float64 if input.dtype == torch.float64 else torch.float32,
                )[1].reshape(-1)
        elif soft:
            loss, lse = soft_linear_cross_entropy(
                input.reshape(batch_shape.numel(), input.shape[-1]),
                linear_weight,
                target.reshape(batch_shape.numel(), target.shape[-1]),
                linear_bias,
                weight,
                op_reduction,
                float(label_smoothing),
                float(z_loss),
                softcap,
                chunk_size,
            )
        else:
            loss, lse, argmax, entropy = _class_index_loss(
                input,
                linear_weight,
                target,
                linear_bias,
                weight,
                op_reduction,
                ignore_index,
                label_smoothing,
                z_loss,
                softcap,
                impl,
                chunk_size,
                return_argmax,
                want_entropy=return_entropy,
            )
        if token_weight is not None:
            loss = _token_weighted(
                loss, lse, token_weight.reshape(-1), target, weight, reduction, ignore_index, z_loss, soft
            )
        if reduction == "none":
            loss = loss.reshape(batch_shape)
        if not (return_lse or return_argmax or return_entropy):
            return loss
        extra = (lse.reshape(batch_shape),) if return_lse else ()
        extra += (argmax.reshape(batch_shape),) if return_argmax else ()
        extra += (entropy.reshape(batch_shape),) if return_entropy else ()
        return (loss, *extra)


def _class_index_loss(
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
    impl,
    chunk_size,
    want_argmax,
    *,
    temperature=1.0,
    want_entropy=False,
):
    """(loss, lse (N,), argmax (N,) or empty, entropy (N,) or empty) of the kernel backends for class-index
    targets; loss (N,) for "none". Everything is of the logits ẑ/temperature."""
    if impl == "cpu":
        _ext.require_cpp("cpu")
        if input.device.type != "cpu":
            raise ValueError(f"impl='cpu' needs CPU tensors, got tensors on {input.device}")
        forward_op = torch.ops.infofuse.linear_cross_entropy_forward
    elif impl in _TRITON_IMPLS:
        _triton_common.check_triton_input(input, impl)
        forward_op = getattr(torch.ops.infofuse, f"linear_cross_entropy_{impl}_forward")
    else:  # pragma: no cover - _validate admits no other value
        raise AssertionError(impl)

    params = LCEParams(
        reduction=REDUCTIONS[reduction],
        ignore_index=int(ignore_index),
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=softcap,
        chunk_size=None if chunk_size is None else int(chunk_size),
    )
    flags = grad_flags(input, linear_weight, linear_bias)
    # (N, D) with N from the target: input.reshape(-1, 0) cannot infer N when D = 0
    x = input.reshape(target.numel(), input.shape[-1])
    t = target.reshape(-1)
    if t.dtype != torch.int64:
        t = t.long()
    extra = {}
    if temperature != 1.0 or want_entropy:  # the schema's defaults otherwise: old call sites stay valid
        extra = {"temperature": float(temperature), "want_entropy": bool(want_entropy)}
    loss, lse, *_, argmax, entropy = forward_op(
        x, linear_weight, t, linear_bias, weight, *params.as_args(), *flags, bool(want_argmax), **extra
    )
    return loss, lse, argmax, entropy


def _token_weighted(loss, lse, tau, target, weight, reduction, ignore_index, z_loss, soft):
    """Σ τ_i·loss_i reduced as ``reduction`` would reduce loss_i (per-token losses ``loss`` (N,), lse (N,))."""
    weighted = loss * tau.to(loss.dtype)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    if soft:  # "mean" over rows, every term
        return weighted.sum() / loss.numel()
    t = target.reshape(-1)
    valid = t != ignore_index
    n_valid = valid.sum().to(loss.dtype)
    # Σ weight[target] over valid tokens (ignore_index may lie outside [0, V): those rows index class 0, masked)
    w_valid = n_valid if weight is None else (weight.to(loss.dtype)[torch.where(valid, t, 0)] * valid).sum()
    if weight is None or z_loss == 0.0:
        return weighted.sum() / w_valid
    # class weights and z-loss: the cross-entropy part is divided by Σ weight[target], the z-loss part by the
    # number of valid tokens (the op's own "mean")
    z_part = torch.where(valid, z_loss * lse.square(), 0.0) * tau.to(loss.dtype)
    return (weighted - z_part).sum() / w_valid + z_part.sum() / n_valid

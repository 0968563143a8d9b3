"""Pairwise InfoNCE (CLIP, SimCLR, SupCon) and SigLIP without the N×M similarity matrix."""

from __future__ import annotations

import math
import numbers

import torch

from . import _ext
from ._ops import _triton_common
from ._ops import info_nce as _ops
from ._ops import info_nce_triton as _triton  # noqa: F401 (registers the chunked and fused ops)
from .reference import info_nce_reference, siglip_reference

__all__ = ["clip_loss", "info_nce", "nt_xent", "siglip_loss", "supcon_loss"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_IMPLS = ("cpu", "chunked", "fused", "reference")
_TRITON_IMPLS = ("chunked", "fused")
_REDUCTIONS = ("mean", "sum", "none")


def _default_impl(device: torch.device) -> str:
    if device.type == "cpu" and _ext.cpp_available():
        return "cpu"
    if device.type == "cuda" and _triton_common.triton_usable(device) is None:
        return "chunked"
    return "reference"


def _check_embeddings(query, key, query_name, key_name):
    for name, t in ((query_name, query), (key_name, key)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, D), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if key.dtype != query.dtype:
        raise TypeError(f"{key_name} must have {query_name}'s dtype {query.dtype}, got {key.dtype}")
    if key.shape[1] != query.shape[1]:
        raise ValueError(
            f"{key_name} must be (M, D) with D = {query_name}.shape[1] = {query.shape[1]}, got shape {tuple(key.shape)}"
        )


# float32 rounds every |x| >= 2¹²⁸ − 2¹⁰³ (its largest finite value plus half an ulp) to inf.
_OVERFLOW = {torch.float32: 2.0**128 - 2.0**103, torch.float64: math.inf}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _scalar_error(name: str, value: float, dtype: torch.dtype, positive: bool, reciprocal: bool) -> str:
    """Why ``value`` of ``name`` failed ``_check_scalar``, in the order the conditions are checked."""
    if not math.isfinite(value):
        return f"{name} must be finite, got {value}"
    if positive and not value > 0:
        return f"{name} must be > 0, got {value}"
    what = f"1/{name}" if reciprocal else name
    return f"{what} must be finite in {_dtype_name(dtype)}, the dtype the loss is computed in; got {name} = {value}"


def _check_scalar(name: str, value, device, dtype: torch.dtype, *, positive: bool, reciprocal: bool = False):
    """Check a scale, bias or temperature and return the multiplier of the scores it stands for: ``value``, or
    ``1 / value`` for a temperature (``reciprocal``).

    ``value`` is a float or a one-element floating tensor on ``device``. It must be finite, > 0 where ``positive``,
    and the multiplier finite in ``dtype`` (the dtype the loss is computed in: float32, float64 for float64
    embeddings): an infinite scale, or a temperature whose reciprocal overflows, would make the loss NaN. Floats and
    eager CPU tensors are checked on the host (a ValueError naming the argument and its value); CUDA tensors, and
    every tensor under torch.compile, by ``torch._assert_async``: no host sync, no graph break.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element tensor, got shape {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} must be on the embeddings' device {device}, got {value.device}")
        multiplier = 1.0 / value if reciprocal else value
        v = value.detach().reshape(())
        ok = torch.isfinite(v) & torch.isfinite(multiplier.detach().reshape(()).to(dtype))
        if positive:
            ok = ok & (v > 0)
        if value.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(ok):
                raise ValueError(_scalar_error(name, v.item(), dtype, positive, reciprocal))
        else:
            need = ("finite and > 0" if positive else "finite") + (", with a finite reciprocal" if reciprocal else "")
            torch._assert_async(ok, f"infofuse: {name} must be {need} in {_dtype_name(dtype)}")
        return multiplier
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    v = float(value)
    multiplier = 1.0 / v if reciprocal and v > 0 else v
    if not math.isfinite(v) or (positive and not v > 0) or not abs(multiplier) < _OVERFLOW[dtype]:
        raise ValueError(_scalar_error(name, v, dtype, positive, reciprocal))
    return 1.0 / value if reciprocal else value


def _check_index_vector(name: str, t, length: int, length_name: str, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers (int64), got {t.dtype}")
    if tuple(t.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length_name},) = ({length},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the embeddings' device {device}, got {t.device}")


def _check_common(reduction, impl):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if impl is not None and impl not in _IMPLS:
        raise ValueError(f"impl must be None, 'cpu', 'chunked', 'fused' or 'reference', got {impl!r}")


def _eager_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _scale_tensor(value, like: torch.Tensor) -> torch.Tensor:
    """The op's 0-dim scale in float32 (float64 for float64 embeddings); differentiable for tensors."""
    dtype = _ops.acc_dtype(like.dtype)
    if isinstance(value, torch.Tensor):
        return value.reshape(()).to(dtype)
    return torch.tensor(float(value), dtype=dtype, device=like.device)


def _resolve_impl(impl, query):
    device = query.device
    if impl is None:
        impl = _default_impl(device)
    if impl == "cpu":
        _ext.require_cpp("cpu")
        if device.type != "cpu":
            raise ValueError(f"impl='cpu' needs CPU tensors, got tensors on {device}")
    elif impl in _TRITON_IMPLS:
        _triton_common.check_triton_input(query, impl)
    return impl


def _op_name(impl: str, family: str, which: str) -> str:
    return f"{family}_{which}" if impl == "cpu" else f"{family}_{impl}_{which}"


def _pairwise(
    query,
    key,
    scale,
    target,
    labels,
    key_labels,
    symmetric,
    exclude_self,
    reduction,
    impl,
    supcon,
    names=("query", "key"),
    scale_name="scale",
):
    """Validation, backend choice and the reduction shared by info_nce and its wrappers. ``scale_name`` None: the
    caller has checked the scale (the reciprocal of a temperature it checked)."""
    _check_embeddings(query, key, *names)
    _check_common(reduction, impl)
    device = query.device
    if key.device != device:
        raise ValueError(f"{names[1]} must be on {names[0]}'s device {device}, got {key.device}")
    if scale_name is not None:
        _check_scalar(scale_name, scale, device, _ops.acc_dtype(query.dtype), positive=True)
    n, m = query.shape[0], key.shape[0]
    if target is not None:
        _check_index_vector("target", target, n, "N", device)
        if _eager_cpu(target) and n and bool(((target < 0) | (target >= m)).any()):
            i = int(((target < 0) | (target >= m)).nonzero()[0, 0])
            raise ValueError(f"target[{i}] = {int(target[i])} is outside [0, M) with M = {m}")
    elif not supcon and m < n:
        raise ValueError(f"the default target arange(N) needs M >= N, got N = {n} and M = {m}; pass target")
    if labels is not None:
        _check_index_vector("labels", labels, n, "N", device)
        if key_labels is None and m != n:
            raise ValueError(f"labels with M != N (N = {n}, M = {m}) need key_labels of shape (M,)")
    if key_labels is not None:
        if labels is None:
            raise ValueError("key_labels needs labels")
        _check_index_vector("key_labels", key_labels, m, "M", device)
    if symmetric or exclude_self:
        what = "symmetric=True" if symmetric else "exclude_self=True"
        if m != n:
            raise ValueError(f"{what} needs as many keys as queries (M == N), got N = {n} and M = {m}")
    t = target if target is not None else (None if supcon else torch.arange(n, device=device))
    if symmetric and target is not None and _eager_cpu(target):
        if not torch.equal(torch.sort(target).values, torch.arange(n, device=device)):
            raise ValueError("symmetric=True needs target to be a permutation of 0 … N − 1")
    if exclude_self and t is not None and _eager_cpu(t) and bool((t == torch.arange(n, device=device)).any()):
        i = int((t == torch.arange(n, device=device)).nonzero()[0, 0])
        raise ValueError(f"exclude_self=True removes each row's own column, but target[{i}] = {i}")
    impl = _resolve_impl(impl, query)
    if impl == "reference":
        return info_nce_reference(
            query,
            key,
            scale=scale,
            target=t,
            labels=labels,
            key_labels=key_labels,
            symmetric=symmetric,
            exclude_self=exclude_self,
            reduction=reduction,
            supcon=supcon,
            compute_dtype=_ops.acc_dtype(query.dtype),
        )
    if labels is not None:
        labels = labels.long()
        key_labels = labels if key_labels is None else key_labels.long()
    t = t.long() if t is not None else torch.zeros(0, dtype=torch.long, device=device)
    col_target = None
    if symmetric:
        if target is not None and device.type != "cpu":
            is_permutation = (torch.sort(t).values == torch.arange(n, device=device)).all()
            torch._assert_async(is_permutation, "infofuse.info_nce: symmetric=True needs a permutation target")
        col_target = torch.argsort(t)
    op = getattr(torch.ops.infofuse, _op_name(impl, "info_nce", "forward"))
    s = _scale_tensor(scale, query)
    mode = _ops.MODE_SUPCON if supcon else _ops.MODE_INFO_NCE
    row, _, col, _ = op(query, key, s, t, labels, key_labels, col_target, mode, exclude_self, symmetric)
    if symmetric:
        row = 0.5 * (row + col)
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    if supcon:
        has_positive = _ops.supcon_counts(labels, key_labels) > 0
        return row.sum() / has_positive.sum().clamp(min=1)
    return row.mean()


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale,
    target: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    key_labels: torch.Tensor | None = None,
    symmetric: bool = False,
    exclude_self: bool = False,
    reduction: str = "mean",
    impl: str | None = None,
) -> torch.Tensor:
    """InfoNCE over the scores ``scale · query @ key.T`` without materialising them.

    Equivalent PyTorch (``infofuse.reference.info_nce_reference``, without labels or exclude_self)::

        logits = scale * query @ key.T                      # (N, M)
        loss = F.cross_entropy(logits.float(), target)      # target defaults to arange(N)
        if symmetric:
            loss = (loss + F.cross_entropy(logits.float().T, target.argsort())) / 2

    Args:
        query: (N, D) embeddings, float32, bfloat16, float16 (or float64).
        key: (M, D) embeddings, same dtype; rows beyond the targets are extra (hard) negatives.
        scale: the inverse temperature, a finite float > 0 or a 0-dim tensor (e.g. ``logit_scale.exp()``), which
            then receives its gradient. A scale that is not finite (in float32 for float32/bf16/fp16 embeddings)
            or not > 0 raises ValueError before any kernel runs; for a tensor on CUDA or under torch.compile the
            check is an asynchronous device assertion (``torch._assert_async``) instead.
        target: (N,) integer, each query's positive column (default ``arange(N)``, which needs M >= N).
        labels: (N,) integer class labels: columns j ≠ target[i] whose label equals row i's leave row i's softmax
            (false-negative masking). key_labels: (M,) the keys' labels (default ``labels``, when M == N).
        symmetric: also the column-wise loss (keys against queries), averaged with the row-wise one as CLIP
            trains; needs M == N and a permutation target.
        exclude_self: column j = i leaves row i's softmax (SimCLR); needs M == N and target[i] ≠ i.
        reduction: "mean" | "sum" | "none" (per query; with symmetric, the average of row i's and column i's loss).
        impl: None picks by device ("cpu" for CPU tensors, "chunked" for CUDA tensors); "cpu" (C++ over row chunks,
            ATen GEMMs, OpenMP), "chunked" (library GEMMs over row chunks with a Triton pass between), "fused"
            (Triton kernels that never write a score to memory) — both on CUDA, or on CPU tensors under
            ``TRITON_INTERPRET=1`` — and "reference" (plain PyTorch, materialises the scores).

    Returns:
        The loss, float32 (float64 for float64 embeddings). Gradients flow to query, key and a tensor scale,
        each in its own dtype, accumulated in float32.

    Double backward (``create_graph=True``, e.g. a gradient penalty) is supported by ``impl="reference"`` only;
    the other backends raise a RuntimeError saying so rather than return gradients without second-order terms.
    """
    with torch.profiler.record_function("infofuse::info_nce"):
        return _pairwise(
            query, key, scale, target, labels, key_labels, symmetric, exclude_self, reduction, impl, supcon=False
        )


def clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale, *, reduction: str = "mean", impl: str | None = None
) -> torch.Tensor:
    """open_clip's ``ClipLoss`` on one device: the symmetric InfoNCE of matched (image, text) pairs.

    Equivalent PyTorch::

        logits = logit_scale * image @ text.T
        labels = torch.arange(len(image))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    ``logit_scale`` is the multiplier itself (open_clip passes ``model.logit_scale.exp()``): a float or a 0-dim
    tensor that receives its gradient; it must be finite and > 0 (checked as ``info_nce``'s ``scale``). image and
    text are (N, D); ``reduction`` and ``impl`` as in ``info_nce``; double backward only with ``impl="reference"``.
    """
    with torch.profiler.record_function("infofuse::clip_loss"):
        return _pairwise(
            image,
            text,
            logit_scale,
            None,
            None,
            None,
            True,
            False,
            reduction,
            impl,
            supcon=False,
            names=("image", "text"),
            scale_name="logit_scale",
        )


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature, *, reduction: str = "mean", impl: str | None = None
) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two views z1, z2 (B, D) of the same B samples.

    Equivalent PyTorch::

        z = torch.cat([z1, z2])                                    # (2B, D)
        logits = (z @ z.T / temperature).fill_diagonal_(-inf)      # a sample is not its own negative
        target = (torch.arange(2 * B) + B) % (2 * B)               # the other view
        loss = F.cross_entropy(logits, target)

    The embeddings are used as given (normalise them first for SimCLR's cosine similarity). ``temperature`` > 0,
    a float or a 0-dim tensor (then it receives its gradient), finite and with a finite reciprocal in the loss's
    dtype (``temperature=1e-320`` raises ValueError: 1/temperature overflows). "none" returns the 2B per-anchor
    losses. Double backward only with ``impl="reference"``.
    """
    with torch.profiler.record_function("infofuse::nt_xent"):
        _check_embeddings(z1, z2, "z1", "z2")
        if z1.shape[0] != z2.shape[0]:
            raise ValueError(f"z2 must have z1's shape {tuple(z1.shape)}, got {tuple(z2.shape)}")
        if z2.device != z1.device:
            raise ValueError(f"z2 must be on z1's device {z1.device}, got {z2.device}")
        scale = _check_scalar(
            "temperature", temperature, z1.device, _ops.acc_dtype(z1.dtype), positive=True, reciprocal=True
        )
        b = z1.shape[0]
        z = torch.cat([z1, z2])
        target = (torch.arange(2 * b, device=z.device) + b) % max(2 * b, 1)
        return _pairwise(
            z,
            z,
            scale,
            target,
            None,
            None,
            False,
            True,
            reduction,
            impl,
            supcon=False,
            names=("z1", "z2"),
            scale_name=None,
        )


def supcon_loss(
    features: torch.Tensor, labels: torch.Tensor, temperature, *, reduction: str = "mean", impl: str | None = None
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out): every other same-label sample is a positive.

    Equivalent PyTorch, for features (N, D)::

        logits = (features @ features.T / temperature).fill_diagonal_(-inf)
        log_prob = logits.log_softmax(1)
        positive = (labels[:, None] == labels[None, :]).fill_diagonal_(False)
        per_row = -(log_prob * positive).nansum(1) / positive.sum(1)      # rows with a positive
        loss = per_row[positive.any(1)].mean()

    ``features`` may also be (B, V, D), V views per sample with ``labels`` (B,), flattened view-major as the
    reference SupConLoss does (``torch.cat(features.unbind(1))``, labels repeated V times). The positives come from
    the label vector inside the kernels; no N×N mask is built. Rows without a positive have loss 0 and leave the
    mean (which is 0, never NaN, when no row has one). ``temperature`` > 0, a float or a 0-dim tensor, finite and
    with a finite reciprocal (as in ``nt_xent``). Double backward only with ``impl="reference"``.
    """
    with torch.profiler.record_function("infofuse::supcon_loss"):
        if isinstance(features, torch.Tensor) and features.dim() == 3:
            views = features.shape[1]
            features = torch.cat(features.unbind(1)) if views else features.reshape(0, features.shape[2])
            if isinstance(labels, torch.Tensor) and labels.dim() == 1:
                labels = labels.repeat(views)
        _check_embeddings(features, features, "features", "features")
        scale = _check_scalar(
            "temperature", temperature, features.device, _ops.acc_dtype(features.dtype), positive=True, reciprocal=True
        )
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        return _pairwise(
            features,
            features,
            scale,
            None,
            labels,
            labels,
            False,
            False,
            reduction,
            impl,
            supcon=True,
            names=("features", "features"),
            scale_name=None,
        )


def siglip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    reduction: str = "mean",
    impl: str | None = None,
) -> torch.Tensor:
    """open_clip's ``SigLipLoss`` on one device: a sigmoid loss on every (image, text) pair.

    Equivalent PyTorch::

        logits = logit_scale * image @ text.T + logit_bias
        y = 2 * torch.eye(N, M) - 1                        # +1 for the matched pair, -1 elsewhere
        loss = -F.logsigmoid(y * logits).sum() / N

    image (N, D), text (M, D) (rows of text beyond N are extra negatives). ``logit_scale`` (the multiplier, e.g.
    ``model.logit_scale.exp()``) and ``logit_bias`` are floats or 0-dim tensors, and receive their gradients; both
    must be finite (in float32 for float32/bf16/fp16 embeddings), else ValueError (an asynchronous device assertion
    for tensors on CUDA or under torch.compile). "mean" is open_clip's Σ/N; "sum" the plain sum; "none" the
    per-image sums. Double backward only with ``impl="reference"``.
    """
    with torch.profiler.record_function("infofuse::siglip_loss"):
        _check_embeddings(image, text, "image", "text")
        _check_common(reduction, impl)
        if text.device != image.device:
            raise ValueError(f"text must be on image's device {image.device}, got {text.device}")
        acc = _ops.acc_dtype(image.dtype)
        _check_scalar("logit_scale", logit_scale, image.device, acc, positive=False)
        _check_scalar("logit_bias", logit_bias, image.device, acc, positive=False)
        impl = _resolve_impl(impl, image)
        if impl == "reference":
            return siglip_reference(
                image,
                text,
                scale=logit_scale,
                bias=logit_bias,
                reduction=reduction,
                compute_dtype=acc,
            )
        op = getattr(torch.ops.infofuse, _op_name(impl, "siglip", "forward"))
        row = op(image, text, _scale_tensor(logit_scale, image), _scale_tensor(logit_bias, image))
        if reduction == "none":
            return row
        if reduction == "sum":
            return row.sum()
        return row.sum() / image.shape[0]  # NaN for no rows, as open_clip's Σ/N

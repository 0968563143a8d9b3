"""``nn.Module`` wrappers: each stores its keyword arguments and calls the matching function."""

from __future__ import annotations

import math

import torch
from torch import nn

from .info_nce import clip_loss, info_nce, nt_xent, siglip_loss, supcon_loss
from .kl_divergence import linear_kl_divergence
from .linear_cross_entropy import linear_cross_entropy
from .log_probs import linear_log_probs

__all__ = [
    "ClipLoss",
    "InfoNCELoss",
    "LinearCrossEntropy",
    "LinearCrossEntropyLoss",
    "LinearLogProbs",
    "LinearKLDivergence",
    "NTXentLoss",
    "SigLipLoss",
    "SupConLoss",
]


class LinearCrossEntropy(nn.Module):
    """Module form of :func:`infofuse.linear_cross_entropy` for a classifier weight owned elsewhere (a tied
    embedding, say); takes the function's keyword arguments.

    ``forward(input, linear_weight, target, linear_bias=None)`` — the argument order of ``F.linear`` followed by
    ``F.cross_entropy``. A class-weight tensor is registered as a buffer, so it follows ``.to(device)``. For the
    drop-in of ``torch.nn.LinearCrossEntropyLoss``, which owns its linear layer, see :class:`LinearCrossEntropyLoss`.
    """

    def __init__(
        self,
        *,
        weight: torch.Tensor | None = None,
        reduction: str = "mean",
        ignore_index: int | None = -100,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        return_lse: bool = False,
        impl: str | None = None,
        chunk_size: int | None = None,
    ):
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.impl = impl
        self.chunk_size = chunk_size

    def forward(self, input, linear_weight, target, linear_bias=None):
        return linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            return_lse=self.return_lse,
            impl=self.impl,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        keys = ("reduction", "ignore_index", "label_smoothing", "z_loss", "softcap", "impl")
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in keys)


class LinearCrossEntropyLoss(nn.Module):
    """Drop-in for ``torch.nn.LinearCrossEntropyLoss`` (torch >= 2.13) that computes with
    :func:`infofuse.linear_cross_entropy`; it works on older torch as well.

    Same constructor arguments and defaults, same parameters and buffers (``linear.weight`` of shape
    ``(num_classes·prod(out_features), in_features)``, ``linear.bias`` with ``bias=True``, the ``weight`` buffer
    of class weights), so state dicts load both ways, and the same initialisation (an ``nn.Linear`` made the
    same way: one seed, one set of weights). ``forward(input, target)``.

    ``options`` (a ``torch.nn.LinearCrossEntropyOptions``) is accepted and stored for compatibility only:
    infofuse always streams the logits, and ``chunk_size`` sets its chunk. The keyword-only extras ``z_loss``,
    ``softcap``, ``impl`` and ``chunk_size`` are those of :func:`infofuse.linear_cross_entropy`.

    With ``out_features = (d_1, ..., d_K)`` (PyTorch's K-dimensional loss: ``input`` (N, in_features), logits
    (N, C, d_1, ..., d_K), ``target`` (N, d_1, ..., d_K) of indices or (N, C, d_1, ..., d_K) of probabilities)
    each of the P = prod(out_features) positions is one row of a P·N-row problem whose input is block-diagonal
    (P times the work of a plain call; exact, every reduction and option included).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options=None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        impl: str | None = None,
        chunk_size: int | None = None,
    ):
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise RuntimeError(f"expected weight shape to be ({num_classes},), got {tuple(weight.shape)}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__()
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = nn.Linear(
            in_features, math.prod(out_features, start=num_classes), bias=bias, device=device, dtype=dtype
        )
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.impl = impl
        self.chunk_size = chunk_size

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        linear_weight, linear_bias = self.linear.weight, self.linear.bias
        shape = None
        if self.out_features:
            input, linear_weight, linear_bias, target, shape = self._k_dimensional(input, target)
        loss = linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            impl=self.impl,
            chunk_size=self.chunk_size,
        )
        return loss.reshape(shape) if shape is not None and self.reduction == "none" else loss

    def _k_dimensional(self, input, target):
        """Rows (n, k) of a block-diagonal input [0 … x_n … 0 | e_k] against [W_0 … W_{P−1} | bias]."""
        c, p = self.num_classes, math.prod(self.out_features)
        if input.dim() != 2:
            raise ValueError(
                f"out_features = {self.out_features} (K-dimensional loss) needs input of shape (N, in_features), "
                f"got {tuple(input.shape)}"
            )
        n, d = input.shape
        eye = torch.eye(p, dtype=input.dtype, device=input.device)
        rows = (eye[None, :, :, None] * input[:, None, None, :]).reshape(n * p, p * d)
        linear_weight = self.linear.weight.reshape(c, p * d)  # row c·P + k of the Linear is W_k's row c
        if self.linear.bias is not None:
            rows = torch.cat([rows, eye.repeat(n, 1)], dim=1)
            linear_weight = torch.cat([linear_weight, self.linear.bias.reshape(c, p)], dim=1)
        if target.is_floating_point():  # (N, C, d_1, ..., d_K) probabilities
            flat = target.reshape(n, c, p).transpose(1, 2).reshape(n * p, c)
        else:
            flat = target.reshape(n * p)
        return rows, linear_weight, None, flat, (n, *self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"out_features={self.out_features}, bias={self.linear.bias is not None}, reduction={self.reduction}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, options={self.options}, "
            f"z_loss={self.z_loss}, softcap={self.softcap}, impl={self.impl!r}, chunk_size={self.chunk_size}"
        )


class LinearLogProbs(nn.Module):
    """Module form of :func:`infofuse.linear_log_probs`: stores its keyword arguments (``temperature``,
    ``softcap``, ``return_entropy``, ``ignore_index``, ``impl``, ``chunk_size``).

    ``forward(input, weight, target, linear_bias=None)`` returns the per-token log-probabilities, or
    ``(log_probs, entropy)`` with ``return_entropy=True``.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        softcap: float | None = None,
        return_entropy: bool = False,
        ignore_index: int = -100,
        impl: str | None = None,
        chunk_size: int | None = None,
    ):
        super().__init__()
        self.temperature = temperature
        self.softcap = softcap
        self.return_entropy = return_entropy
        self.ignore_index = ignore_index
        self.impl = impl
        self.chunk_size = chunk_size

    def forward(self, input, weight, target, linear_bias=None):
        return linear_log_probs(
            input,
            weight,
            target,
            linear_bias,
            temperature=self.temperature,
            softcap=self.softcap,
            return_entropy=self.return_entropy,
            ignore_index=self.ignore_index,
            impl=self.impl,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, softcap={self.softcap}, return_entropy={self.return_entropy}, "
            f"ignore_index={self.ignore_index}, impl={self.impl!r}, chunk_size={self.chunk_size}"
        )


class _KeywordLoss(nn.Module):
    """Stores keyword arguments; ``extra_repr`` shows them."""

    _keys: tuple[str, ...] = ()

    def __init__(self, **keywords):
        super().__init__()
        for k in self._keys:
            setattr(self, k, keywords[k])

    def _kw(self) -> dict:
        return {k: getattr(self, k) for k in self._keys}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._kw().items())


class InfoNCELoss(_KeywordLoss):
    """Module form of :func:`infofuse.info_nce`: ``forward(query, key, scale, target=None, labels=None,
    key_labels=None)``."""

    _keys = ("symmetric", "exclude_self", "reduction", "impl")

    def __init__(
        self, *, symmetric: bool = False, exclude_self: bool = False, reduction: str = "mean", impl: str | None = None
    ):
        super().__init__(symmetric=symmetric, exclude_self=exclude_self, reduction=reduction, impl=impl)

    def forward(self, query, key, scale, target=None, labels=None, key_labels=None):
        return info_nce(query, key, scale=scale, target=target, labels=labels, key_labels=key_labels, **self._kw())


class ClipLoss(_KeywordLoss):
    """Module form of :func:`infofuse.clip_loss`, called like open_clip's: ``forward(image, text, logit_scale)``."""

    _keys = ("reduction", "impl")

    def __init__(self, *, reduction: str = "mean", impl: str | None = None):
        super().__init__(reduction=reduction, impl=impl)

    def forward(self, image, text, logit_scale):
        return clip_loss(image, text, logit_scale, **self._kw())


class SigLipLoss(_KeywordLoss):
    """Module form of :func:`infofuse.siglip_loss`: ``forward(image, text, logit_scale, logit_bias)``."""

    _keys = ("reduction", "impl")

    def __init__(self, *, reduction: str = "mean", impl: str | None = None):
        super().__init__(reduction=reduction, impl=impl)

    def forward(self, image, text, logit_scale, logit_bias):
        return siglip_loss(image, text, logit_scale, logit_bias, **self._kw())


class NTXentLoss(_KeywordLoss):
    """Module form of :func:`infofuse.nt_xent`: ``forward(z1, z2)`` with the stored temperature."""

    _keys = ("temperature", "reduction", "impl")

    def __init__(self, temperature: float = 0.5, *, reduction: str = "mean", impl: str | None = None):
        super().__init__(temperature=temperature, reduction=reduction, impl=impl)

    def forward(self, z1, z2):
        return nt_xent(z1, z2, **self._kw())


class SupConLoss(_KeywordLoss):
    """Module form of :func:`infofuse.supcon_loss`: ``forward(features, labels)`` with the stored temperature."""

    _keys = ("temperature", "reduction", "impl")

    def __init__(self, temperature: float = 0.07, *, reduction: str = "mean", impl: str | None = None):
        super().__init__(temperature=temperature, reduction=reduction, impl=impl)

    def forward(self, features, labels):
        return supcon_loss(features, labels, **self._kw())


class LinearKLDivergence(_KeywordLoss):
    """Module form of :func:`infofuse.linear_kl_divergence` for heads owned elsewhere (the student's and the
    teacher's ``lm_head``): ``forward(student_input, student_weight, teacher_input, teacher_weight, target=None,
    student_bias=None, teacher_bias=None)`` with the stored options."""

    _keys = ("temperature", "beta", "ignore_index", "reduction", "teacher_requires_grad", "impl", "chunk_size")

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        beta: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        teacher_requires_grad: bool = False,
        impl: str | None = None,
        chunk_size: int | None = None,
    ):
        super().__init__(
            temperature=temperature,
            beta=beta,
            ignore_index=ignore_index,
            reduction=reduction,
            teacher_requires_grad=teacher_requires_grad,
            impl=impl,
            chunk_size=chunk_size,
        )

    def forward(
        self,
        student_input,
        student_weight,
        teacher_input,
        teacher_weight,
        target=None,
        student_bias=None,
        teacher_bias=None,
    ):
        return linear_kl_divergence(
            student_input,
            student_weight,
            teacher_input,
            teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            target=target,
            **self._kw(),
        )

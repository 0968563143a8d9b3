"""``nn.Module`` wrappers: each stores its keyword arguments and calls the matching function."""

from __future__ import annotations

import torch
from torch import nn

from .info_nce import clip_loss, info_nce, nt_xent, siglip_loss, supcon_loss
from .linear_cross_entropy import linear_cross_entropy

__all__ = ["ClipLoss", "InfoNCELoss", "LinearCrossEntropyLoss", "NTXentLoss", "SigLipLoss", "SupConLoss"]


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`infofuse.linear_cross_entropy`; takes the same keyword arguments.

    ``forward(input, linear_weight, target, linear_bias=None)`` — the argument order of
    ``F.linear`` followed by ``F.cross_entropy``. A class-weight tensor is registered as a buffer, so it
    follows ``.to(device)``.
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

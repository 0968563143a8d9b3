"""``nn.Module`` wrappers: each stores its keyword arguments and calls the matching function."""

from __future__ import annotations

import torch
from torch import nn

from .linear_cross_entropy import linear_cross_entropy

__all__ = ["LinearCrossEntropyLoss"]


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
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            softcap=self.softcap, return_lse=self.return_lse, impl=self.impl, chunk_size=self.chunk_size,
        )  # fmt: skip

    def extra_repr(self) -> str:
        keys = ("reduction", "ignore_index", "label_smoothing", "z_loss", "softcap", "impl")
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in keys)

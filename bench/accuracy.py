"""Accuracy of a peer's loss and gradients against the case's ground truth (float64 by default), computed from its
first (warm-up) call: |loss - ref| / |ref| and ‖g - g_ref‖ / ‖g_ref‖ per gradient."""

from __future__ import annotations

import math

import torch

__all__ = ["errors"]


def errors(loss: torch.Tensor, leaves, ref: tuple[float, list[torch.Tensor]] | None, labels) -> dict:
    """The loss, and with a ground truth ``ref`` = (loss, gradients) its errors; ``labels`` name the gradients."""
    value = loss.detach().double().item()
    out = {"loss": value}
    if ref is None:
        return out
    ref_loss, ref_grads = ref
    out["loss_ref"] = ref_loss
    out["loss_abs_err"] = abs(value - ref_loss)
    out["loss_rel_err"] = abs(value - ref_loss) / abs(ref_loss) if ref_loss != 0 else math.inf
    rel = {}
    for label, leaf, g_ref in zip(labels, leaves, ref_grads, strict=True):
        if leaf.grad is None:
            rel[label] = None
            continue
        g = leaf.grad.to(g_ref.dtype)
        rel[label] = ((g - g_ref).norm() / g_ref.norm()).item()
    out["grad_rel_err"] = rel
    return out

"""Plain-PyTorch references: the definition of correct for every infofuse op.

They materialise everything (the N×V logits included), run in any dtype, float64 included, and get their
gradients from PyTorch's autograd. Every kernel in the package is tested against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["linear_cross_entropy_reference"]


def linear_cross_entropy_reference(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float32,
):
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias).float(), target, ...)`` plus the extras.

    ``input`` (..., D), ``linear_weight`` (V, D), ``target`` (...) integer, ``linear_bias`` (V,), ``weight`` (V,)
    per-class rescaling. The logits are cast to ``compute_dtype`` (float32, as infofuse's kernels accumulate; pass
    float64 with float64 inputs for a ground truth). With ``softcap`` c, the logits become c·tanh(z/c).
    ``z_loss`` λ adds λ·lse² per non-ignored token, not class-weighted; "mean" divides that term by the number of
    non-ignored tokens (the cross-entropy term keeps PyTorch's divisor, Σ weight[target]).
    ``reduction="none"`` returns the per-token loss in ``target``'s shape (0 at ignored tokens);
    ``return_lse=True`` returns ``(loss, lse)`` with the per-token log-sum-exp in ``target``'s shape.
    """
    logits = F.linear(input, linear_weight, linear_bias).to(compute_dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    v = logits.shape[-1]
    logits = logits.reshape(-1, v)
    flat_target = target.reshape(-1).long()
    class_weight = None if weight is None else weight.to(compute_dtype)
    loss = F.cross_entropy(
        logits,
        flat_target,
        weight=class_weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    lse = torch.logsumexp(logits, dim=-1)
    if z_loss != 0.0:
        valid = flat_target != ignore_index
        z_term = z_loss * lse.square() * valid
        if reduction == "mean":
            # clamp: with no valid token the loss is already NaN (PyTorch's 0/0) and the gradients stay 0
            loss = loss + z_term.sum() / valid.sum().clamp(min=1)
        elif reduction == "sum":
            loss = loss + z_term.sum()
        else:
            loss = loss + z_term
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if return_lse:
        return loss, lse.reshape(target.shape)
    return loss

"""What the Triton strategies of linear cross-entropy share: availability, input checks, per-call statistics."""

from __future__ import annotations

import os

import torch


def triton_usable(device: torch.device) -> str | None:
    """None if the Triton backends can run on ``device``, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not installed ({exc})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None
    return f"the Triton backends need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"


def check_triton_input(input: torch.Tensor, impl: str) -> None:
    """Device and dtype checks of the Triton strategies: by the public function, and by the ops themselves."""
    reason = triton_usable(input.device)
    if reason is not None:
        raise RuntimeError(f"impl={impl!r} cannot run: {reason}")
    if input.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"impl={impl!r} takes float32, bfloat16 or float16 inputs, got {input.dtype}")


def target_weight(target, weight32, valid, v):
    """weight[target] per row (1 without class weights), 0 at ignored rows."""
    if weight32 is None:
        return valid.to(torch.float32)
    return torch.where(valid, weight32[target.clamp(0, v - 1)], 0.0)


def prepare(target, weight, v, ignore_index, reduction, device):
    """Class weights in float32 and [ce_scale, z_scale, Σ weight] on the device; the target range check."""
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= v))
    if device.type == "cpu":
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"target[{i}] = {int(target[i])} is outside [0, V) with V = {v} and is not ignore_index")
    else:
        torch._assert_async(~bad.any(), "infofuse.linear_cross_entropy: a target is outside [0, V)")
    n_valid = valid.sum(dtype=torch.float32)
    if weight is not None:
        weight = weight.to(device=device, dtype=torch.float32).contiguous()
        w_all = weight.sum()
    else:
        w_all = torch.full((), float(v), device=device)
    w_valid = target_weight(target, weight, valid, v).sum()
    if reduction == 1:
        scales = torch.stack([1.0 / w_valid, 1.0 / n_valid, w_all])
    else:
        scales = torch.stack([torch.ones_like(w_all), torch.ones_like(w_all), w_all])
    return weight, scales.contiguous()


def reduce_loss(ce: torch.Tensor, zl: torch.Tensor, scales: torch.Tensor, reduction: int, z_loss: float):
    """The returned loss from the per-row cross-entropy and z-loss terms (``scales`` from ``prepare``)."""
    if reduction == 0:
        return ce + zl
    if reduction == 1:
        loss = ce.sum() * scales[0]
        return loss + zl.sum() * scales[1] if z_loss != 0.0 else loss
    return ce.sum() + zl.sum()

"""Per-token log-probabilities and entropy of a linear layer's softmax, without the N×V logits."""

from __future__ import annotations

import numbers

import torch

from ._ops import _triton_common
from .linear_cross_entropy import _class_index_loss, _default_impl
from .reference import linear_log_probs_reference

__all__ = ["linear_log_probs"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _validate(input, weight, target, linear_bias, temperature, softcap, ignore_index, impl, chunk_size):
    for name, value in (("input", input), ("weight", weight), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if input.dim() < 1:
        raise ValueError("input must have shape (..., D), got a 0-dim tensor")
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"weight must be 2-D (V, D) with D = input.shape[-1] = {input.shape[-1]}, got shape {tuple(weight.shape)}"
        )
    v = weight.shape[0]
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"target must have shape input.shape[:-1] = {tuple(input.shape[:-1])} (token ids), "
            f"got {tuple(target.shape)}"
        )
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer token ids, got {target.dtype}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float32, bfloat16, float16 or float64, got {input.dtype}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight must have input's dtype {input.dtype}, got {weight.dtype}")
    if linear_bias is not None:
        if not isinstance(linear_bias, torch.Tensor):
            raise TypeError(f"linear_bias must be None or a torch.Tensor, got {type(linear_bias).__name__}")
        if tuple(linear_bias.shape) != (v,):
            raise ValueError(f"linear_bias must have shape (V,) = ({v},), got {tuple(linear_bias.shape)}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias must have input's dtype {input.dtype}, got {linear_bias.dtype}")
    tensors = {"input": input, "weight": weight, "target": target, "linear_bias": linear_bias}
    if len({t.device for t in tensors.values() if t is not None}) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in tensors.items() if t is not None)
        raise ValueError(f"all tensors must be on one device, got {where}")
    if (
        not isinstance(temperature, numbers.Real)
        or isinstance(temperature, bool)
        or not 0.0 < float(temperature) < float("inf")
    ):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    if softcap is not None and (not isinstance(softcap, numbers.Real) or not 0.0 < float(softcap) < float("inf")):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if impl is not None and impl not in ("cpu", "chunked", "fused", "reference"):
        raise ValueError(f"impl must be None, 'cpu', 'chunked', 'fused' or 'reference', got {impl!r}")
    if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if target.device.type == "cpu" and target.numel() and not torch.compiler.is_compiling():
        t = target.reshape(-1)
        bad = (t != ignore_index) & ((t < 0) | (t >= v))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"target[{i}] (flattened) = {int(t[i])} is outside [0, V) with V = {v} and is not "
                f"ignore_index ({ignore_index})"
            )


def linear_log_probs(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    ignore_index: int = -100,
    impl: str | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probability of ``target`` (and the entropy) under ``softmax(input @ weight.T + linear_bias)``,
    without materialising the N×V logits.

    Equivalent PyTorch (the reference, ``infofuse.reference.linear_log_probs_reference``)::

        z = F.linear(input, weight, linear_bias).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        log_p = torch.log_softmax(z / temperature, dim=-1)
        log_probs = log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)   # 0 where target == ignore_index
        entropy = -(log_p.exp() * log_p).sum(-1)                           # 0 where target == ignore_index

    This is the quantity RL post-training (PPO, GRPO) asks of the policy on every step: the log-probability of
    each sampled token, with its gradient, and the policy's per-token entropy. It runs on the same kernels as
    ``linear_cross_entropy`` with ``reduction="none"`` (log p(target) is minus the per-token loss): one pass over
    the logits, chunk by chunk, in forward (the lse and, with ``return_entropy``, the entropy beside it), and a
    recomputing pass in backward (4 GEMMs in all; at most one chunk of logits exists at a time).

    Args:
        input: (..., D) float32, bfloat16, float16 (or float64) hidden states.
        weight: (V, D) head weight (``lm_head.weight``), same dtype as ``input``.
        target: (...) = ``input.shape[:-1]`` integer token ids in [0, V), or ``ignore_index``.
        linear_bias: optional (V,) bias, same dtype as ``input``.
        temperature: T > 0; the logits are divided by it after the softcap (sampling temperature: evaluate the
            log-probabilities of tokens sampled at temperature T under the same distribution). Gradients carry
            the 1/T.
        softcap: c > 0 replaces the raw logits z by c·tanh(z/c) (Gemma-2) before the temperature.
        return_entropy: also return each token's entropy H(p) = −Σ_v p_v·log p_v, differentiable (its gradient
            with respect to the logits ℓ = z/T is −p_v·(log p_v + H)).
        ignore_index: tokens whose target equals it get 0 log-probability and 0 entropy, and no gradient from
            either (padding, prompt tokens).
        impl, chunk_size: as in ``linear_cross_entropy`` (None picks "cpu" for CPU tensors, "chunked" on CUDA).

    Returns:
        ``log_probs`` in ``input.shape[:-1]``, float32 (float64 for float64 inputs); with ``return_entropy`` the
        tuple ``(log_probs, entropy)``. Gradients flow to ``input``, ``weight`` and ``linear_bias``, each in its
        own dtype, accumulated in float32. Double backward is supported by ``impl="reference"`` only.

    Example: a GRPO/PPO clipped policy-gradient step, with an entropy bonus, from the policy's last hidden
    states (no logits anywhere)::

        hidden = model.model(input_ids).last_hidden_state[:, :-1]        # (B, L-1, D)
        labels = input_ids[:, 1:].masked_fill(~completion_mask, -100)      # score the completion tokens only
        logp, entropy = infofuse.linear_log_probs(
            hidden, model.lm_head.weight, labels, temperature=0.7, return_entropy=True
        )
        ratio = torch.exp(logp - old_logp)                                 # old_logp: same call, no grad
        clipped = torch.clamp(ratio, 1 - eps_clip, 1 + eps_clip)
        per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
        mask = (labels != -100).float()
        loss = ((per_token - ent_coef * entropy) * mask).sum() / mask.sum()
        loss.backward()
    """
    with torch.profiler.record_function("infofuse::linear_log_probs"):
        _validate(input, weight, target, linear_bias, temperature, softcap, ignore_index, impl, chunk_size)
        batch_shape = input.shape[:-1]
        softcap = None if softcap is None else float(softcap)
        temperature = float(temperature)
        if impl is None:
            impl = _default_impl(input.device)
        if impl == "reference":
            out = linear_log_probs_reference(
                input,
                weight,
                target,
                linear_bias,
                temperature=temperature,
                softcap=softcap,
                return_entropy=return_entropy,
                ignore_index=int(ignore_index),
                compute_dtype=torch.float64 if input.dtype == torch.float64 else torch.float32,
            )
            return out
        if impl in ("chunked", "fused"):
            _triton_common.check_triton_input(input, impl)
        loss, _lse, _argmax, entropy = _class_index_loss(
            input,
            weight,
            target,
            linear_bias,
            None,
            "none",
            int(ignore_index),
            0.0,
            0.0,
            softcap,
            impl,
            chunk_size,
            False,
            temperature=temperature,
            want_entropy=bool(return_entropy),
        )
        log_probs = (-loss).reshape(batch_shape)  # log p(t) = −(lse − ℓ_t); ignored tokens: −0 = 0
        if return_entropy:
            return log_probs, entropy.reshape(batch_shape)
        return log_probs

"""Plain-PyTorch references: the definition of correct for every infofuse op.

They materialise everything (the N×V logits included), run in any dtype, float64 included, and get their
gradients from PyTorch's autograd. Every kernel in the package is tested against them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "info_nce_reference",
    "knn_reference",
    "info_nce_rows_reference",
    "linear_cross_entropy_reference",
    "linear_log_probs_reference",
    "linear_kl_divergence_reference",
    "siglip_reference",
    "siglip_rows_reference",
]


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

    A floating-point ``target`` of shape ``input.shape[:-1] + (V,)`` holds class probabilities and goes to
    ``F.cross_entropy`` as such (cast to ``compute_dtype``, so it gets a gradient if it requires one): "mean" then
    divides by the number of rows, the z-loss term too, and the loss and lse have shape ``input.shape[:-1]``.
    """
    logits = F.linear(input, linear_weight, linear_bias).to(compute_dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    v = logits.shape[-1]
    batch_shape = input.shape[:-1]
    logits = logits.reshape(-1, v)
    soft = target.is_floating_point() and tuple(target.shape) == (*batch_shape, v)
    if soft:  # class probabilities: F.cross_entropy's probability-target definition (no ignore_index)
        flat_target = target.reshape(-1, v).to(compute_dtype)
    else:
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
        valid = torch.ones_like(lse, dtype=torch.bool) if soft else flat_target != ignore_index
        z_term = z_loss * lse.square() * valid
        if reduction == "mean":
            # clamp: with no valid token the loss is already NaN (PyTorch's 0/0) and the gradients stay 0
            loss = loss + z_term.sum() / valid.sum().clamp(min=1)
        elif reduction == "sum":
            loss = loss + z_term.sum()
        else:
            loss = loss + z_term
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    if return_lse:
        return loss, lse.reshape(batch_shape)
    return loss


def linear_log_probs_reference(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    ignore_index: int = -100,
    compute_dtype: torch.dtype = torch.float32,
):
    """Per-token ``log p(target)`` and entropy ``H(p)`` of ``p = softmax(logits)``, from the full logits.

    ``z = F.linear(input, linear_weight, linear_bias)`` cast to ``compute_dtype``; with ``softcap`` c,
    ``z = c·tanh(z/c)``; ``logits = z / temperature``. Returns ``log_softmax(logits)[..., target]`` in ``target``'s
    shape, and with ``return_entropy`` the tuple ``(log_probs, entropy)``, ``entropy = −Σ_v p_v·log p_v``.
    Tokens whose target is ``ignore_index`` get 0 in both, and no gradient.
    """
    logits = F.linear(input, linear_weight, linear_bias).to(compute_dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    valid = target != ignore_index
    picked = log_p.gather(-1, torch.where(valid, target, 0).long().unsqueeze(-1)).squeeze(-1)
    zero = log_p.new_zeros(())
    log_probs = torch.where(valid, picked, zero)
    if not return_entropy:
        return log_probs
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_probs, torch.where(valid, entropy, zero)


def _scores(query, key, scale, compute_dtype):
    """scale·(query @ keyᵀ): the product in the inputs' dtype (as dense PyTorch code computes it), then
    ``compute_dtype`` (None: float64 for float64 inputs, else float32)."""
    scale = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale), dtype=torch.float64)
    if compute_dtype is None:  # float64 for float64 embeddings, else float32
        compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return (query @ key.T).to(compute_dtype) * scale.to(device=query.device, dtype=compute_dtype)


def info_nce_rows_reference(
    query,
    key,
    scale,
    target,
    labels=None,
    key_labels=None,
    col_target=None,
    *,
    mode=0,
    exclude_self=False,
    want_cols=False,
    compute_dtype=None,
):
    """Per-row (and per-column) InfoNCE terms, densely: what the ``infofuse::info_nce_forward`` op returns.

    S = scale·Q Kᵀ. mode 0: row i's softmax runs over the allowed columns — all but j = i with ``exclude_self``,
    and, with ``labels``/``key_labels``, all but the columns j ≠ target[i] whose label equals row i's; its loss is
    lse_i − S[i, target[i]]. With ``want_cols`` (M = N, ``col_target`` the inverse permutation of ``target``) the
    same for the columns: lse over the allowed rows of column j, minus S[col_target[j], j]. mode 1 (SupCon):
    j = i leaves the softmax, the positives are P(i) = {j ≠ i: key_labels[j] = labels[i]}, the loss is
    lse_i − mean_{P(i)} S_ij, and 0 for rows with no positive. Returns (row_loss, row_lse, col_loss, col_lse), the
    last two None without ``want_cols``.
    """
    s = _scores(query, key, scale, compute_dtype)
    n, m = s.shape
    rows = torch.arange(n, device=s.device)
    cols = torch.arange(m, device=s.device)
    eye = rows[:, None] == cols[None, :]
    if mode == 1:
        same = labels[:, None] == key_labels[None, :]
        positive = same & ~eye
        count = positive.sum(1)
        lse = torch.logsumexp(s.masked_fill(eye, float("-inf")), 1)
        pos_mean = (s * positive).sum(1) / count.clamp(min=1)
        loss = torch.where(count > 0, lse - pos_mean, torch.zeros_like(lse))
        return loss, lse, None, None
    blocked = eye if exclude_self else torch.zeros_like(eye)
    if labels is not None:
        is_target = cols[None, :] == target[:, None]
        blocked = blocked | ((labels[:, None] == key_labels[None, :]) & ~is_target)
    masked = s.masked_fill(blocked, float("-inf"))
    row_lse = torch.logsumexp(masked, 1)
    row_loss = row_lse - s.gather(1, target[:, None]).squeeze(1)
    if not want_cols:
        return row_loss, row_lse, None, None
    col_lse = torch.logsumexp(masked, 0)
    col_loss = col_lse - s.gather(0, col_target[None, :]).squeeze(0)
    return row_loss, row_lse, col_loss, col_lse


def info_nce_reference(
    query,
    key,
    *,
    scale,
    target=None,
    labels=None,
    key_labels=None,
    symmetric=False,
    exclude_self=False,
    reduction="mean",
    supcon=False,
    compute_dtype=None,
):
    """Pairwise InfoNCE, densely (the N×M scores, PyTorch's autograd): the definition ``infofuse.info_nce`` and
    its thin wrappers are tested against. See ``info_nce_rows_reference`` for the per-row terms.

    "mean" averages the per-row losses (SupCon: over the rows that have a positive; 0 if none has);
    ``symmetric`` averages the row and column losses, per index for "none". ``supcon`` selects mode 1.
    """
    n = query.shape[0]
    if target is None and not supcon:
        target = torch.arange(n, device=query.device)
    if labels is not None and key_labels is None:
        key_labels = labels
    col_target = torch.argsort(target) if symmetric else None
    row, _, col, _ = info_nce_rows_reference(
        query,
        key,
        scale,
        target,
        labels,
        key_labels,
        col_target,
        mode=1 if supcon else 0,
        exclude_self=exclude_self,
        want_cols=symmetric,
        compute_dtype=compute_dtype,
    )
    if symmetric:
        row = 0.5 * (row + col)
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    if supcon:
        count = (labels[:, None] == key_labels[None, :]).sum(1) - 1
        return row.sum() / (count > 0).sum().clamp(min=1)
    return row.mean()


def siglip_rows_reference(query, key, scale, bias, *, compute_dtype=None):
    """Per-row SigLIP loss Σ_j softplus(−y_ij·(S_ij + bias)), y_ij = +1 where i = j, −1 elsewhere: what the
    ``infofuse::siglip_forward`` op returns."""
    s = _scores(query, key, scale, compute_dtype)
    bias = bias if isinstance(bias, torch.Tensor) else torch.tensor(float(bias), dtype=torch.float64)
    z = s + bias.to(device=s.device, dtype=s.dtype)
    eye = torch.arange(s.shape[0], device=s.device)[:, None] == torch.arange(s.shape[1], device=s.device)[None, :]
    return -F.logsigmoid(torch.where(eye, z, -z)).sum(1)


def siglip_reference(query, key, *, scale, bias, reduction="mean", compute_dtype=None):
    """open_clip's ``SigLipLoss`` on one device: −Σ log σ(y·(scale·Q Kᵀ + bias)) / N ("mean"); "sum" is the
    plain sum, "none" the per-row sums."""
    row = siglip_rows_reference(query, key, scale, bias, compute_dtype=compute_dtype)
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    return row.sum() / query.shape[0]


def _pairwise_distances(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """(B, N, M) distances by direct differences (never ‖a‖² + ‖b‖² − 2a·b), in x's dtype."""
    if metric == "euclidean":
        return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    if metric == "chebyshev":
        if x.shape[-1] == 0:
            return x.new_zeros(x.shape[:-1] + (y.shape[-2],))
        return (x[..., :, None, :] - y[..., None, :, :]).abs().amax(-1)
    if metric == "cosine":  # cos(0, ·) = 0; rows divided by their largest |coordinate| first (no overflow)
        xn = F.normalize(x / x.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny), dim=-1)
        yn = F.normalize(y / y.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(y.dtype).tiny), dim=-1)
        return 1.0 - xn @ yn.transpose(-1, -2)
    raise ValueError(f"unknown metric {metric!r}")


def knn_reference(x: torch.Tensor, y: torch.Tensor | None = None, k: int = 1, *, metric: str = "euclidean"):
    """The k nearest neighbours by brute force: the N×M distance matrix and a stable sort.

    x (N, d) or (B, N, d); y likewise, or None for x against itself with each point excluded from its own
    neighbours by index. Returns (distances, indices), (…, N, k), ascending; ties go to the smaller index.
    bf16/fp16 inputs are computed in float32. Cosine distance is 1 − cos(x_i, y_j), with cos(0, y) = cos(x, 0) = 0
    (``F.cosine_similarity``'s value): 1 from a zero vector to every vector, zero vectors included.
    """
    squeeze = x.dim() == 2
    xs = x[None] if squeeze else x
    ys = xs if y is None else (y[None] if squeeze else y)
    if xs.dtype in (torch.bfloat16, torch.float16):
        xs, ys = xs.float(), ys.float()
    dist = _pairwise_distances(xs, ys, metric)
    if y is None:
        n = dist.shape[-1]
        dist = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=dist.device), float("inf"))
    values, indices = torch.sort(dist, dim=-1, stable=True)  # stable: equal distances keep index order
    values, indices = values[..., :k], indices[..., :k]
    if squeeze:
        values, indices = values[0], indices[0]
    return values, indices


def linear_kl_divergence_reference(
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
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The generalised Jensen–Shannon divergence between two linear heads, from their full logits.

    P = softmax(F.linear(teacher_input, teacher_weight, teacher_bias) / temperature) (the teacher), Q the same
    for the student; per token, over the vocabulary (docs/kl_divergence.md):

    * ``beta == 0``: KL(P‖Q) = Σ_j p_j (log p_j − log q_j)   (forward KL)
    * ``beta == 1``: KL(Q‖P)                                (reverse KL)
    * otherwise:     β·KL(P‖M) + (1 − β)·KL(Q‖M) with M = β·P + (1 − β)·Q

    Tokens whose ``target`` equals ``ignore_index`` count 0 (``target=None``: none ignored). "mean" divides the
    sum over tokens by the number of tokens not ignored ("batchmean"), "sum" adds them, "none" returns them in
    ``student_input.shape[:-1]``. The logits are cast to ``compute_dtype`` before the softmaxes.
    """
    z_s = F.linear(student_input, student_weight, student_bias).to(compute_dtype) / temperature
    z_t = F.linear(teacher_input, teacher_weight, teacher_bias).to(compute_dtype) / temperature
    log_q = z_s.log_softmax(-1)
    log_p = z_t.log_softmax(-1)
    if beta == 0.0:
        per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    elif beta == 1.0:
        per_token = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        kl_pm = F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
        kl_qm = F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
        per_token = beta * kl_pm + (1.0 - beta) * kl_qm
    if target is None:
        valid = torch.ones_like(per_token, dtype=torch.bool)
    else:
        valid = target.reshape(per_token.shape) != ignore_index
    per_token = torch.where(valid, per_token, 0.0)
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum()

"""Data-parallel InfoNCE, CLIP, SigLIP, NT-Xent and SupCon: each rank passes its local rows, the loss is the
single-process loss of the global batch (every rank's rows concatenated in rank order).

Each rank computes only its own rows' terms against the other side of the whole batch — and, for a symmetric loss,
its own keys' column terms — so no rank computes the whole N×M block and no N×M tensor exists anywhere. Two
schedules bring the other side to the rank:

* ``"all_gather"``: the other side is gathered with ``_dist.gather_rows`` (its gradient reduce-scatters back to the
  owners) and the local block goes through the single-process kernels (``infofuse::info_nce_forward`` etc.); a
  symmetric loss's column terms are the transposed problem (the rank's keys against the gathered queries);
* ``"ring"``: the key shards pass around the ring with ``_dist.send_recv`` while the rank computes on the shard it
  holds (``_Ring``): a running log-sum-exp per row (and, symmetric, per column of the shard, travelling behind it to
  its owner) in forward, and in backward a second ring that recomputes the blocks and carries each shard's gradient
  accumulator on to its owner. Memory O(local·chunk); each block computed once.

The value returned on every rank is the global loss, ``_dist.all_reduce_sum(local part, grad_scale=W)``: after
DistributedDataParallel averages the gradients over the W ranks, every parameter's gradient is the single-process
gradient of the global loss (docs/distributed.md, "Data-parallel contrastive losses").
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers

import torch

from . import _dist
from ._ops import info_nce as _ops
from .reference import info_nce_rows_reference, siglip_rows_reference

# the single-process module (``infofuse.info_nce`` the attribute is its function of that name)
_sp = importlib.import_module(".info_nce", __package__)

__all__ = ["clip_loss", "info_nce", "nt_xent", "siglip_loss", "supcon_loss"]

_SCHEDULES = ("all_gather", "ring")
# The ring's score block per row chunk: at most this many elements (rows × the largest shard).
_CHUNK_ELEMENTS = 1 << 21


# ----------------------------------------------------------------------------------------------------------------
# one more primitive: the gradient scale of a rank-local output


class _ScaleGradient(torch.autograd.Function):
    """Forward: the identity. Backward: the gradient times ``factor``.

    For ``reduction="none"``, whose per-row values stay on their rank: with ``factor`` = W, DDP's average over
    ranks of the parameter gradients is the gradient of the sum over ranks of whatever each rank computes from its
    rows (the same role as ``all_reduce_sum``'s ``grad_scale`` for the reduced losses)."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


# ----------------------------------------------------------------------------------------------------------------
# the handshake


def _rows_of(t) -> int:
    return int(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() >= 1 else -1


def _trailing(t):
    return tuple(t.shape[1:]) if isinstance(t, torch.Tensor) else None


def _dtype_of(t):
    return t.dtype if isinstance(t, torch.Tensor) else None


def _scalar_token(value):
    """What the ranks must agree on of a scale, temperature or bias: a float's value; for a tensor its dtype and
    shape (its value lives on the device; a replicated parameter, as DDP keeps it, is the same on every rank)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape))
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return ("invalid", type(value).__name__)


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _check_schedule(schedule, impl):
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be 'all_gather' or 'ring', got {schedule!r}")
    if schedule == "ring" and impl is not None:
        raise ValueError(
            f"impl selects the single-process kernel of schedule='all_gather'; the ring computes its blocks with "
            f"ATen GEMMs: pass impl=None with schedule='ring', got impl={impl!r}"
        )


def _handshake(op, group, device, check, replicated: dict, local: dict):
    """Run this rank's validation ``check`` and the handshake; every rank raises if any rank's check failed or
    the ranks disagree on ``replicated``. Returns ``local``'s values by rank."""
    error = None
    try:
        check()
    except (ValueError, TypeError) as e:
        error = e
    return _dist.agree(op, group, device, replicated, local, error=error)


def _device(t) -> torch.device:
    return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class _World:
    group: object
    size: int
    rank: int


def _world(group, op: str) -> _World:
    group = _dist.resolve_group(group, op)
    return _World(group, _dist.world_size(group), _dist.rank(group))


def _gather_ints(world: _World, parts, device) -> list[torch.Tensor]:
    """Every rank's integer vectors, in one all-gather: ``parts`` is a list of (local vector, its length on each
    rank); returns, for each part, the concatenation over ranks in rank order."""
    if not parts:
        return []
    local = torch.cat([p.reshape(-1).to(device=device, dtype=torch.long) for p, _ in parts])
    per_rank = [sum(sizes[r] for _, sizes in parts) for r in range(world.size)]
    full = _dist.gather_rows(local, per_rank, world.group).split(per_rank)
    out = [[] for _ in parts]
    for r in range(world.size):
        for i, piece in enumerate(full[r].split([sizes[r] for _, sizes in parts])):
            out[i].append(piece)
    return [torch.cat(pieces) for pieces in out]


# ----------------------------------------------------------------------------------------------------------------
# a rank's rows against the whole other side


@dataclasses.dataclass(frozen=True)
class _Rows:
    """This rank's rows ``query`` against the key side, whose rows are the ranks' shards ``key`` (``sizes`` by
    rank) concatenated: the key positions. Indices are key positions.

    Row i's own position is ``self_start + i`` (the rank's rows are contiguous in the key positions of every loss
    here). kind "nce": row i's loss is lse over its allowed positions − S[i, target[i]]; its own position (if
    ``self_start`` is given) leaves the softmax, and with ``labels`` every position j ≠ target[i] whose
    ``key_labels[j]`` equals ``labels[i]`` too. kind "supcon": the softmax runs over all positions but its own,
    the positives are the other positions with row i's label, the loss is lse − their mean score (0 without a
    positive; ``count`` holds their number). kind "siglip": Σ_j softplus(−y_ij (S_ij + bias)), y_ij = +1 at its
    own position."""

    kind: str
    sizes: tuple
    target: torch.Tensor | None = None
    self_start: int | None = None
    labels: torch.Tensor | None = None
    key_labels: torch.Tensor | None = None
    count: torch.Tensor | None = None


def _self_first(start: int, n: int, total: int, device) -> torch.Tensor:
    """A permutation of the key positions that puts row i's own position ``start + i`` at i (the single-process
    kernels' diagonal), the others after them in order."""
    return torch.cat(
        [
            torch.arange(start, start + n, device=device),
            torch.arange(0, start, device=device),
            torch.arange(start + n, total, device=device),
        ]
    )


def _nce_kernel(impl, query, key, scale, target, labels, key_labels, exclude_self):
    if impl == "reference":
        acc = _ops.acc_dtype(query.dtype)
        out = info_nce_rows_reference(
            query, key, scale, target, labels, key_labels, exclude_self=exclude_self, compute_dtype=acc
        )
        return out[0]
    op = getattr(torch.ops.infofuse, _sp._op_name(impl, "info_nce", "forward"))
    return op(query, key, scale, target, labels, key_labels, None, _ops.MODE_INFO_NCE, exclude_self, False)[0]


def _gathered_keys(rows: _Rows, query, key, world: _World):
    """The key side gathered (its gradient reduce-scattered back to the owners), in self-first order where a
    diagonal matters (the kernels' diagonal is each row's own position): (keys, target, key_labels, inverse), the
    target and key labels moved to that order and ``inverse`` the permutation back (None without one)."""
    keys = _dist.gather_rows(key, rows.sizes, world.group)
    target, key_labels = rows.target, rows.key_labels
    if rows.self_start is None:
        return keys, target, key_labels, None
    perm = _self_first(rows.self_start, query.shape[0], keys.shape[0], query.device)
    inverse = torch.argsort(perm)
    target = None if target is None else inverse[target]
    key_labels = None if key_labels is None else key_labels[perm]
    return keys.index_select(0, perm), target, key_labels, inverse


def _rows_all_gather(rows: _Rows, query, key, scale, bias, impl, world: _World) -> torch.Tensor:
    """The rows' terms with the key side gathered (its gradient reduce-scattered back to the owners)."""
    keys, target, key_labels, _ = _gathered_keys(rows, query, key, world)
    if rows.kind == "siglip":
        if impl == "reference":
            return siglip_rows_reference(query, keys, scale, bias, compute_dtype=scale.dtype)
        op = getattr(torch.ops.infofuse, _sp._op_name(impl, "siglip", "forward"))
        return op(query, keys, scale, bias)
    if rows.kind == "nce":
        return _nce_kernel(impl, query, keys, scale, target, rows.labels, key_labels, rows.self_start is not None)
    return _supcon_all_gather(rows, query, keys, scale, key_labels, impl)


def _symmetric_all_gather(rows: _Rows, query, key, scale, impl, world: _World) -> torch.Tensor:
    """Σ_i row_i + Σ_j col_j of a symmetric loss over the global batch, from ONE block per rank: this rank's
    queries against the gathered keys (gradient reduce-scattered back to the owners).

    The block's row pass gives each own row's whole loss. Its column pass gives, for every global column j, the
    log-sum-exp over this rank's rows only (``col_target`` c_j, any row of the block but the column's own: the
    kernels' column loss is then lse_r,j − S[c_j, j], and S[c_j, j] is added back by a differentiable dot product,
    which also cancels the kernels' positive-term gradient there). The C++ kernel masks a column by the row
    pass's masks, which is right for any c_j; the Triton kernels mask a column by labels with c_j as its
    positive, which is right only without labels, and need a c_j other than the column's own row: the caller
    takes this path only where that holds. The partial column lse's are stacked over ranks (O(M) floats) and combined by
    a log-sum-exp: the column softmax of every entry of every block, each rank's gradient for its own block
    coming back through ``gather_replicated``'s own slice. The column positives sum to the row positives
    (the targets are a permutation), Σ_i S[i, target[i]], each from its own rank's dot products. So each rank
    forms its block once (4 GEMMs with the backward, not 8 for a second, transposed block) and sends only the
    keys and their gradients, half of the two-block way.

    Returns this rank's part (W × its gradient through ``all_reduce_sum`` in the caller) plus, gradient-scaled
    by W, the replicated column lse sum divided by W, so that the all-reduced total counts it once."""
    keys, target, key_labels, unpermute = _gathered_keys(rows, query, key, world)
    total = keys.shape[0]
    acc = scale.dtype
    n = query.shape[0]
    if n > 0:
        op = getattr(torch.ops.infofuse, _sp._op_name(impl, "info_nce", "forward"))
        col_target = torch.zeros(total, dtype=torch.long, device=query.device)
        if rows.self_start is not None:  # never a column's own row (the Triton kernels mask it)
            col_target[:n] = (torch.arange(n, device=query.device) + 1) % n
        row_loss, _, col_loss, _ = op(
            query,
            keys,
            scale,
            target,
            rows.labels,
            key_labels,
            col_target,
            _ops.MODE_INFO_NCE,
            rows.self_start is not None,
            True,
        )
        first = (query.index_select(0, col_target).to(acc) * keys.to(acc)).sum(1) * scale
        partial = col_loss + first
        positives = (query.to(acc) * keys.index_select(0, target).to(acc)).sum(1) * scale
        own = row_loss.sum() - positives.sum()
    else:  # no rows here: no row term, and an empty part of every column's softmax
        partial = torch.full((total,), float("-inf"), dtype=acc, device=query.device)
        own = (keys.sum() * 0 + query.sum() * 0).to(acc) + scale * 0  # every leaf in the graph, as elsewhere
    if unpermute is not None:
        partial = partial.index_select(0, unpermute)
    stacked = _dist.gather_replicated(partial, world.group)
    columns = torch.logsumexp(stacked, 0).sum()
    return own + _ScaleGradient.apply(columns, float(world.size)) / world.size


def _supcon_all_gather(rows: _Rows, query, keys, scale, key_labels, impl) -> torch.Tensor:
    """SupCon's rows against the gathered keys in self-first order, through the InfoNCE kernel (the SupCon mode of
    the kernels needs a square block): lse_i over j ≠ i is the kernel's row loss with exclude_self plus the score
    of the (any) target it was given; the positives' mean score is q_i · (their feature sum) from per-label sums
    of the keys — O((N + M)·D), no block."""
    n, total = query.shape[0], keys.shape[0]
    acc = scale.dtype
    count = rows.count
    if total < 2:  # no other key: no positive, no softmax
        return (query.sum() * 0).to(acc).expand(n).clone()
    other = (torch.arange(n, device=query.device) + 1) % total  # any position but the row's own
    row = _nce_kernel(impl, query, keys, scale, other, None, None, True)
    other_score = (query.to(acc) * keys.index_select(0, other).to(acc)).sum(1) * scale
    unique, inverse = torch.unique(key_labels, return_inverse=True)
    sums = keys.new_zeros((unique.shape[0], keys.shape[1]), dtype=acc).index_add_(0, inverse, keys.to(acc))
    positives = sums.index_select(0, inverse[:n]) - keys[:n].to(acc)  # own label's sum without the row itself
    pos_mean = (query.to(acc) * positives).sum(1) * scale / count.clamp(min=1).to(acc)
    return torch.where(count > 0, row + other_score - pos_mean, torch.zeros_like(row))


# ----------------------------------------------------------------------------------------------------------------
# the ring


def _buffer(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A fresh (rows, ...) buffer holding ``t`` in its first rows (zeros after): the ring receives into its
    buffers, so never the caller's tensor itself."""
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


@dataclasses.dataclass(frozen=True)
class _RingSpec:
    rows: _Rows
    world: _World
    # symmetric (one ring for both directions): every key position's positive query (global), and where this
    # rank's queries start among the global queries
    col_target: torch.Tensor | None = None
    row_start: int = 0


def _block(spec: _RingSpec, a: int, b: int, shard: torch.Tensor, offset: int, query: torch.Tensor, scale):
    """Rows a:b of this rank against one key shard: the raw products, the scores, the blocked pairs (None: none)
    and, by kind, the target indicator / the positives / the signs."""
    rows = spec.rows
    acc = scale.dtype
    raw = (query[a:b] @ shard.T).to(acc)  # the product in the inputs' dtype, as the reference computes it
    score = raw * scale
    cols = torch.arange(offset, offset + shard.shape[0], device=query.device)
    own = None
    if rows.self_start is not None:
        own = torch.arange(rows.self_start + a, rows.self_start + b, device=query.device)[:, None] == cols[None, :]
    if rows.kind == "siglip":
        return raw, score, None, own
    same = None
    if rows.labels is not None:
        same = rows.labels[a:b, None] == rows.key_labels[cols][None, :]
    if rows.kind == "supcon":
        positive = same & ~own
        return raw, score, own, positive
    is_target = rows.target[a:b, None] == cols[None, :]
    blocked = own
    if same is not None:
        masked = same & ~is_target
        blocked = masked if blocked is None else blocked | masked
    return raw, score, blocked, is_target


def _column_target(spec: _RingSpec, a: int, b: int, offset: int, m: int, device) -> torch.Tensor:
    """Symmetric: whether row a + i is the positive of column offset + j (the column terms' target indicator)."""
    ct = spec.col_target[offset : offset + m]
    return torch.arange(spec.row_start + a, spec.row_start + b, device=device)[:, None] == ct[None, :]


def _chunk(spec: _RingSpec) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, max(spec.rows.sizes)))


def _shifted(new_max: torch.Tensor) -> torch.Tensor:
    """The running maximum to subtract before exp: 0 where it is −inf (nothing allowed yet), so no inf − inf."""
    return torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))


def _merge_states(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Two partial column states (max, Σ exp(s − max), target score) merged, as MATH.md's online log-sum-exp."""
    new = torch.maximum(x[:, 0], y[:, 0])
    shift = _shifted(new)
    total = x[:, 1] * torch.exp(x[:, 0] - shift) + y[:, 1] * torch.exp(y[:, 0] - shift)
    return torch.stack([new, total, x[:, 2] + y[:, 2]], 1)


class _Ring(torch.autograd.Function):
    """The rows' terms with the key shards passed around the ring; returns the per-row losses and, for a symmetric
    loss (``spec.col_target``), this rank's keys' column losses (else an empty vector).

    Forward: W steps; at step s this rank holds the shard of rank (r − s) mod W, posts the send of it to r + 1 and
    the receive of the next from r − 1, and meanwhile folds the block (row chunks × the shard) into running
    per-row maxima and sums of exponentials (online log-sum-exp), target scores or positive sums. A symmetric loss
    also folds the block into the shard's column states (max, sum, target score), which travel round the ring
    behind the shard and reach its owner, as the backward's accumulators do: each (query, key) score is computed
    once. Saved: the local inputs and the per-row (and own columns') lse only.

    Backward: a second ring recomputes each block from the saved lse (a symmetric loss sends each shard's column
    lse and column gradients with it). The shard's gradient accumulator travels after it: at each step the rank
    adds its part Gᵀ·q and sends the sum on; after W − 1 sends it reaches the owner, who returns it as its key's
    gradient (the ring's reduce-scatter). The query gradient G·k and the scale and bias gradients (this rank's
    terms only) stay local."""

    @staticmethod
    def forward(ctx, query, key, scale, bias, spec):
        rows, world = spec.rows, spec.world
        symmetric = spec.col_target is not None
        n = query.shape[0]
        acc = scale.dtype
        run_max = torch.full((n,), float("-inf"), dtype=acc, device=query.device)
        run_sum = torch.zeros(n, dtype=acc, device=query.device)
        picked = torch.zeros(n, dtype=acc, device=query.device)  # target scores / positive sums / SigLIP sums
        offsets = _dist.offsets(rows.sizes)
        chunk = _chunk(spec)

        def visit(src, shards):
            shard = shards[0]
            m = shard.shape[0]
            state = None
            if symmetric:
                state = torch.zeros((m, 3), dtype=acc, device=query.device)
                state[:, 0] = float("-inf")
            for a in range(0, n if m else 0, chunk):
                b = min(n, a + chunk)
                raw, score, blocked, extra = _block(spec, a, b, shard, offsets[src], query, scale)
                if rows.kind == "siglip":
                    z = score + bias
                    picked[a:b] += torch.nn.functional.softplus(torch.where(extra, -z, z)).sum(1)
                    continue
                masked = score if blocked is None else score.masked_fill(blocked, float("-inf"))
                new = torch.maximum(run_max[a:b], masked.amax(1))
                shift = _shifted(new)
                run_sum[a:b] = run_sum[a:b] * torch.exp(run_max[a:b] - shift) + torch.exp(masked - shift[:, None]).sum(
                    1
                )
                run_max[a:b] = new
                picked[a:b] += torch.where(extra, score, torch.zeros_like(score)).sum(1)
                if symmetric:
                    new = torch.maximum(state[:, 0], masked.amax(0))
                    shift = _shifted(new)
                    state[:, 1] = state[:, 1] * torch.exp(state[:, 0] - shift) + torch.exp(masked - shift[None, :]).sum(
                        0
                    )
                    state[:, 0] = new
                    is_target = _column_target(spec, a, b, offsets[src], m, query.device)
                    state[:, 2] += torch.where(is_target, score, torch.zeros_like(score)).sum(0)
            return state

        own_state = _ring([key], rows.sizes, world, visit, _merge_states if symmetric else None)
        ctx.spec = spec
        if rows.kind == "siglip":
            ctx.save_for_backward(query, key, scale, bias, None, None)
            return picked, picked.new_zeros(0)
        lse = run_max + torch.log(run_sum)
        if rows.kind == "nce":
            loss = lse - picked
        else:
            count = rows.count.to(acc)
            loss = torch.where(rows.count > 0, lse - picked / count.clamp(min=1), torch.zeros_like(lse))
        col_loss, col_lse = picked.new_zeros(0), None
        if symmetric:
            col_lse = own_state[:, 0] + torch.log(own_state[:, 1])
            col_loss = col_lse - own_state[:, 2]
        ctx.save_for_backward(query, key, scale, bias, lse, col_lse)
        return loss, col_loss

    @staticmethod
    def backward(ctx, grad, grad_col):
        query, key, scale, bias, lse, col_lse = ctx.saved_tensors
        spec = ctx.spec
        rows = spec.rows
        symmetric = spec.col_target is not None
        n = query.shape[0]
        acc = scale.dtype
        grad = grad.to(acc)
        if rows.kind == "supcon":
            count = rows.count.to(acc).clamp(min=1)
            grad = torch.where(rows.count > 0, grad, torch.zeros_like(grad))
        d_query = torch.zeros(query.shape, dtype=acc, device=query.device)
        d_scale = torch.zeros((), dtype=acc, device=query.device)
        d_bias = torch.zeros((), dtype=acc, device=query.device)
        offsets = _dist.offsets(rows.sizes)
        chunk = _chunk(spec)
        query_acc = query.to(acc)
        travel = [key]
        if symmetric:  # each shard's column lse and column gradients go round with it
            travel.append(torch.stack([col_lse, grad_col.to(acc)], 1))

        def visit(src, shards):
            nonlocal d_scale, d_bias
            shard = shards[0]
            shard_acc = shard.to(acc)
            part = torch.zeros(shard.shape, dtype=acc, device=shard.device)
            for a in range(0, n if shard.shape[0] else 0, chunk):
                b = min(n, a + chunk)
                raw, score, blocked, extra = _block(spec, a, b, shard, offsets[src], query, scale)
                if rows.kind == "siglip":
                    z = score + bias
                    sign = torch.where(extra, 1.0, -1.0).to(acc)
                    g = -sign * torch.sigmoid(-sign * z) * grad[a:b, None]
                    d_bias = d_bias + g.sum()
                else:
                    masked = score if blocked is None else score.masked_fill(blocked, float("-inf"))
                    p = torch.exp(masked - lse[a:b, None])
                    if rows.kind == "nce":
                        g = (p - extra.to(acc)) * grad[a:b, None]
                    else:
                        g = (p - extra.to(acc) / count[a:b, None]) * grad[a:b, None]
                    if symmetric:
                        column_lse, column_grad = shards[1][:, 0], shards[1][:, 1]
                        is_target = _column_target(spec, a, b, offsets[src], shard.shape[0], query.device)
                        g = g + (torch.exp(masked - column_lse[None, :]) - is_target.to(acc)) * column_grad[None, :]
                d_query[a:b] += (g @ shard_acc) * scale
                part += (g.T @ query_acc[a:b]) * scale
                d_scale = d_scale + (g * raw).sum()
            return part

        d_key = _ring(travel, rows.sizes, spec.world, visit, torch.add)
        d_bias_out = d_bias if rows.kind == "siglip" else None
        return d_query.to(query.dtype), d_key.to(key.dtype), d_scale, d_bias_out, None


def _ring(travel, sizes, world: _World, visit, combine=None):
    """Pass the shards ``travel`` (tensors whose rows are this rank's shard, ``sizes`` by rank) around the ring:
    at step s this rank holds rank (r − s)'s, posts their sends to r + 1 and the receives of the next ones from
    r − 1, and calls ``visit(src, shards)`` while they are in flight.

    With ``combine``, ``visit`` returns this rank's part of a per-row result for the shard it holds (a gradient,
    column states), and the parts are combined on their way to the shard's owner: a shard's accumulator starts
    at the rank after its owner (step 1), collects each rank's part, and after W − 1 sends (a reduce-scatter's
    count) reaches the owner, who combines it with its own part (kept from step 0); the receive of an accumulator
    overlaps the next block. The messages between two ranks are posted in the same order on every rank, so they
    match in order. Returns this rank's combined result (None without ``combine``)."""
    most = max(sizes)
    cur = [_buffer(t, most) for t in travel]
    nxt = [torch.empty_like(c) for c in cur]
    to, frm = (world.rank + 1) % world.size, (world.rank - 1) % world.size
    pending: list = []
    own = incoming = outgoing = None
    for step in range(world.size):
        src = (world.rank - step) % world.size
        reqs = []
        if step < world.size - 1:
            for c, x in zip(cur, nxt, strict=True):
                reqs += _dist.send_recv(c, x, to, frm, world.group)
        part = visit(src, [c[: sizes[src]] for c in cur])
        if combine is not None:
            if incoming is None:
                incoming = part.new_empty((most, *part.shape[1:]))
            for req in pending:
                req.wait()
            if step == 0:
                own = part
            else:
                total = part if step == 1 else combine(incoming[: sizes[src]], part)
                outgoing = _buffer(total, most)  # referenced until its send is waited for
                pending = _dist.send_recv(outgoing, incoming, to, frm, world.group)
        for req in reqs:
            req.wait()
        cur, nxt = nxt, cur
    if combine is None:
        return None
    for req in pending:
        req.wait()
    del outgoing
    return combine(incoming[: sizes[world.rank]], own)


# ----------------------------------------------------------------------------------------------------------------
# the losses


def _rows_terms(rows: _Rows, query, key, scale, bias, schedule, impl, world: _World) -> torch.Tensor:
    if schedule == "ring":
        if bias is None:
            bias = scale.new_zeros(())
        return _Ring.apply(query, key, scale, bias, _RingSpec(rows, world))[0]
    return _rows_all_gather(rows, query, key, scale, bias, impl, world)


def _reduce(local_terms, reduction, count, world: _World):
    """The global loss from this rank's terms: Σ over ranks (all-reduced, gradient ×W), divided by ``count`` for
    "mean" (an int, or a tensor that is summed over ranks with it); "none": the local terms, gradient ×W."""
    if reduction == "none":
        return _ScaleGradient.apply(local_terms, float(world.size))
    total = local_terms.sum()
    if isinstance(count, torch.Tensor) and reduction == "mean":
        both = _dist.all_reduce_sum(torch.stack([total, count.to(total.dtype)]), world.group, world.size)
        return both[0] / both[1].clamp(min=1)
    total = _dist.all_reduce_sum(total, world.group, world.size)
    return total / count if reduction == "mean" else total


def _target_errors(target, n_global, m_global, symmetric, exclude_self):
    """The checks of the global target, made by every rank on the same gathered vector (the same error on all)."""
    bad = (target < 0) | (target >= m_global)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target[{i}] = {int(target[i])} (global row {i}) is outside [0, M) with M = {m_global}")
    if symmetric and not torch.equal(torch.sort(target).values, torch.arange(n_global, device=target.device)):
        raise ValueError("symmetric=True needs target to be a permutation of 0 … N − 1 (global rows)")
    if exclude_self:
        hit = target == torch.arange(n_global, device=target.device)
        if bool(hit.any()):
            i = int(hit.nonzero()[0, 0])
            raise ValueError(f"exclude_self=True removes each row's own column, but target[{i}] = {i} (global row)")


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
    group=None,
    schedule: str = "all_gather",
    impl: str | None = None,
) -> torch.Tensor:
    """``infofuse.info_nce`` of the global batch, each rank passing its local rows (data parallel).

    Equivalent single-process call (Q, K, T, L, KL: every rank's ``query``, ``key``, ``target``, ``labels``,
    ``key_labels`` concatenated in rank order)::

        infofuse.info_nce(Q, K, scale=scale, target=T, labels=L, key_labels=KL, symmetric=symmetric,
                          exclude_self=exclude_self, reduction=reduction)

    Args:
        query: (n_r, D) this rank's queries; key: (m_r, D) its keys (n_r and m_r may differ between ranks; the
            global key rows beyond N are extra negatives). Same D, dtype and options on every rank.
        scale: as in ``infofuse.info_nce``; the same on every rank (a replicated parameter).
        target: (n_r,) integer, GLOBAL key indices of this rank's queries' positives (default: the query's own
            global row index, which needs M >= N globally).
        labels: (n_r,) and key_labels: (m_r,) this rank's labels (false-negative masking against the whole batch).
        symmetric, exclude_self: as in ``infofuse.info_nce``, on the global batch (M == N globally).
        reduction: "mean" / "sum": the global loss, the same value on every rank; "none": this rank's queries'
            terms (with ``symmetric``, each rank must hold as many keys as queries: the averages of row i's and
            column i's losses, for its own rows).
        group: the process group (default: the world).
        schedule: "all_gather" (gather the keys, single-process kernel on the local rows) or "ring" (pass key
            shards around the ring, O(local·chunk) memory). See docs/distributed.md.
        impl: the single-process kernel for ``schedule="all_gather"`` (as ``infofuse.info_nce``'s).

    Gradient contract: the returned value's backward leaves on each rank W times this rank's part of the gradient,
    and the gathered keys' gradients are summed back to their owners; after DistributedDataParallel averages the
    parameter gradients over the W ranks, every one of them (encoders, a learnable scale) is the single-process
    gradient of the global loss. Every rank must call it (and backward) together.
    """
    world = _world(group, "info_nce")
    return _info_nce_family(
        "info_nce",
        world,
        query,
        key,
        scale,
        target,
        labels,
        key_labels,
        symmetric,
        exclude_self,
        reduction,
        schedule,
        impl,
        ("query", "key"),
        "scale",
    )


def _info_nce_family(
    op,
    world,
    query,
    key,
    scale,
    target,
    labels,
    key_labels,
    symmetric,
    exclude_self,
    reduction,
    schedule,
    impl,
    names,
    scale_name,
    local_impl=None,
):
    def check():
        _sp._check_embeddings(query, key, *names)
        _sp._check_common(reduction, impl)
        _check_schedule(schedule, impl)
        if schedule == "all_gather":
            _sp._resolve_impl(impl, query)
        device = query.device
        if key.device != device:
            raise ValueError(f"{names[1]} must be on {names[0]}'s device {device}, got {key.device}")
        _sp._check_scalar(scale_name, scale, device, _ops.acc_dtype(query.dtype), positive=True)
        n, m = query.shape[0], key.shape[0]
        if target is not None:
            _sp._check_index_vector("target", target, n, "n_r (this rank's queries)", device)
        if labels is not None:
            _sp._check_index_vector("labels", labels, n, "n_r (this rank's queries)", device)
        if key_labels is not None:
            if labels is None:
                raise ValueError("key_labels needs labels")
            _sp._check_index_vector("key_labels", key_labels, m, "m_r (this rank's keys)", device)

    replicated = {
        "D": _trailing(query),
        "key D": _trailing(key),
        "dtype": _dtype_of(query),
        scale_name: _scalar_token(scale),
        "target given": target is not None,
        "labels given": labels is not None,
        "key_labels given": key_labels is not None,
        "symmetric": bool(symmetric),
        "exclude_self": bool(exclude_self),
        "reduction": reduction,
        "schedule": schedule,
        "impl": impl,
        "requires grad": _wants_grad(query, key, scale),
    }
    sizes = _handshake(op, world.group, _device(query), check, replicated, {"n": _rows_of(query), "m": _rows_of(key)})
    if world.size == 1:  # one rank: the single-process op itself, bit for bit
        if local_impl is not None:
            return local_impl()
        return _sp.info_nce(
            query,
            key,
            scale=scale,
            target=target,
            labels=labels,
            key_labels=key_labels,
            symmetric=symmetric,
            exclude_self=exclude_self,
            reduction=reduction,
            impl=impl,
        )
    n_sizes, m_sizes = sizes["n"], sizes["m"]
    n_all, m_all = sum(n_sizes), sum(m_sizes)
    prefix = f"infofuse.distributed.{op}"
    if target is None and m_all < n_all:
        raise ValueError(
            f"{prefix}: the default target (each query's global row) needs M >= N, got N = {n_all}, M = {m_all}"
        )
    if labels is not None and key_labels is None and m_all != n_all:
        raise ValueError(f"{prefix}: labels with M != N (N = {n_all}, M = {m_all}) need key_labels")
    if (symmetric or exclude_self) and m_all != n_all:
        what = "symmetric=True" if symmetric else "exclude_self=True"
        raise ValueError(f"{prefix}: {what} needs as many keys as queries globally, got N = {n_all}, M = {m_all}")
    if symmetric and reduction == "none" and n_sizes != m_sizes:
        raise ValueError(
            f"{prefix}: symmetric=True with reduction='none' needs each rank to hold as many keys as queries "
            f"(the per-index average of row and column terms), got queries {n_sizes} and keys {m_sizes}"
        )
    device = query.device
    impl = _sp._resolve_impl(impl, query) if schedule == "all_gather" else None
    me = world.rank
    n_off, m_off = _dist.offsets(n_sizes)[me], _dist.offsets(m_sizes)[me]
    n, m = n_sizes[me], m_sizes[me]

    parts = []
    if target is not None:
        parts.append((target, n_sizes))
    if labels is not None:
        parts.append((labels, n_sizes))
    if key_labels is not None:
        parts.append((key_labels, m_sizes))
    gathered = iter(_gather_ints(world, parts, device))
    target_all = next(gathered) if target is not None else None
    labels_all = next(gathered) if labels is not None else None
    key_labels_all = next(gathered) if key_labels is not None else labels_all
    if target_all is not None:
        _target_errors(target_all, n_all, m_all, symmetric, exclude_self)
    else:
        target_all = torch.arange(n_all, device=device)

    s = _sp._scale_tensor(scale, query)
    row_problem = _Rows(
        "nce",
        tuple(m_sizes),
        target=target_all[n_off : n_off + n],
        self_start=n_off if exclude_self else None,
        labels=None if labels_all is None else labels_all[n_off : n_off + n],
        key_labels=key_labels_all,
    )
    if symmetric and schedule == "ring":  # one ring: each block's row and column terms at once
        spec = _RingSpec(row_problem, world, col_target=torch.argsort(target_all), row_start=n_off)
        terms, col_terms = _Ring.apply(query, key, s, s.new_zeros(()).detach(), spec)
    elif (
        symmetric
        and reduction != "none"
        and impl != "reference"
        and (impl == "cpu" or (labels is None and not (exclude_self and 1 in n_sizes)))
    ):  # one block per rank (the same choice on every rank: it decides the collectives)
        part = _symmetric_all_gather(row_problem, query, key, s, impl, world)
        total = _dist.all_reduce_sum(0.5 * part, world.group, world.size)
        return total / n_all if reduction == "mean" else total
    elif symmetric:  # this rank's keys' column terms: the transposed problem against every query
        terms = _rows_terms(row_problem, query, key, s, None, schedule, impl, world)
        col_target = torch.argsort(target_all)
        col_problem = _Rows(
            "nce",
            tuple(n_sizes),
            target=col_target[m_off : m_off + m],
            self_start=m_off if exclude_self else None,
            labels=None if key_labels_all is None else key_labels_all[m_off : m_off + m],
            key_labels=labels_all,
        )
        col_terms = _rows_terms(col_problem, key, query, s, None, schedule, impl, world)
    else:
        terms = _rows_terms(row_problem, query, key, s, None, schedule, impl, world)
    if symmetric:
        if reduction == "none":
            return _reduce(0.5 * (terms + col_terms), reduction, n_all, world)
        terms = 0.5 * torch.cat([terms, col_terms])
    return _reduce(terms, reduction, n_all, world)


def clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale,
    *,
    reduction: str = "mean",
    group=None,
    schedule: str = "all_gather",
    impl: str | None = None,
) -> torch.Tensor:
    """``infofuse.clip_loss`` of the global batch: each rank passes its (n_r, D) image and text rows, matched row
    by row (n_r may differ between ranks). The positives are the global pairs; the value is the same on every
    rank; "none" returns this rank's pairs' terms. ``schedule``, ``group``, ``impl`` and the gradient contract as
    in ``infofuse.distributed.info_nce``.

    Equivalent single-process call: ``infofuse.clip_loss(cat(images), cat(texts), logit_scale)``.
    """
    world = _world(group, "clip_loss")
    return _info_nce_family(
        "clip_loss",
        world,
        image,
        text,
        logit_scale,
        None,
        None,
        None,
        True,
        False,
        reduction,
        schedule,
        impl,
        ("image", "text"),
        "logit_scale",
        local_impl=lambda: _sp.clip_loss(image, text, logit_scale, reduction=reduction, impl=impl),
    )


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature,
    *,
    reduction: str = "mean",
    group=None,
    schedule: str = "all_gather",
    impl: str | None = None,
) -> torch.Tensor:
    """``infofuse.nt_xent`` of the global batch: each rank passes its two views z1, z2 (b_r, D) of its b_r samples.

    Equivalent single-process call: ``infofuse.nt_xent(cat(z1s), cat(z2s), temperature)``: 2B anchors, each one's
    positive its other view, every other of the 2B embeddings a negative. "none" returns this rank's 2 b_r anchors'
    terms, its z1 rows then its z2 rows. ``temperature`` the same on every rank. ``schedule``, ``group``, ``impl``
    and the gradient contract as in ``infofuse.distributed.info_nce``.
    """
    world = _world(group, "nt_xent")

    def check():
        _sp._check_embeddings(z1, z2, "z1", "z2")
        if z1.shape[0] != z2.shape[0]:
            raise ValueError(f"z2 must have z1's shape {tuple(z1.shape)}, got {tuple(z2.shape)}")
        if z2.device != z1.device:
            raise ValueError(f"z2 must be on z1's device {z1.device}, got {z2.device}")
        _sp._check_common(reduction, impl)
        _check_schedule(schedule, impl)
        _sp._check_scalar(
            "temperature", temperature, z1.device, _ops.acc_dtype(z1.dtype), positive=True, reciprocal=True
        )

    replicated = {
        "D": _trailing(z1),
        "z2 D": _trailing(z2),
        "dtype": _dtype_of(z1),
        "temperature": _scalar_token(temperature),
        "reduction": reduction,
        "schedule": schedule,
        "impl": impl,
        "requires grad": _wants_grad(z1, z2, temperature),
    }
    sizes = _handshake("nt_xent", world.group, _device(z1), check, replicated, {"b": _rows_of(z1)})["b"]
    if world.size == 1:
        return _sp.nt_xent(z1, z2, temperature, reduction=reduction, impl=impl)
    impl = _sp._resolve_impl(impl, z1) if schedule == "all_gather" else None
    b, off = sizes[world.rank], _dist.offsets(sizes)[world.rank]
    device = z1.device
    z = torch.cat([z1, z2])  # key positions: rank by rank, each rank's z1 rows then its z2 rows
    local = torch.arange(b, device=device)
    rows = _Rows(
        "nce",
        tuple(2 * s for s in sizes),
        target=2 * off + torch.cat([local + b, local]),
        self_start=2 * off,
    )
    scale = _sp._scale_tensor(1.0 / temperature, z)
    terms = _rows_terms(rows, z, z, scale, None, schedule, impl, world)
    return _reduce(terms, reduction, 2 * sum(sizes), world)


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature,
    *,
    reduction: str = "mean",
    group=None,
    schedule: str = "all_gather",
    impl: str | None = None,
) -> torch.Tensor:
    """``infofuse.supcon_loss`` of the global batch: each rank passes its (n_r, D) features (or (b_r, V, D), V
    views, flattened view-major on the rank) and their labels; every other same-label row of the whole batch is a
    positive, every other row a negative.

    Equivalent single-process call: ``infofuse.supcon_loss(cat(features), cat(labels), temperature)`` (the loss
    does not depend on the order of the rows, so the rank-wise view-major flattening gives the same value).
    "mean" averages over the global rows that have a positive; "none" returns this rank's rows' terms.
    ``schedule``, ``group``, ``impl`` and the gradient contract as in ``infofuse.distributed.info_nce``.
    """
    world = _world(group, "supcon_loss")
    flat, flat_labels = features, labels
    if isinstance(features, torch.Tensor) and features.dim() == 3:
        views = features.shape[1]
        flat = torch.cat(features.unbind(1)) if views else features.reshape(0, features.shape[2])
        if isinstance(labels, torch.Tensor) and labels.dim() == 1:
            flat_labels = labels.repeat(views)

    def check():
        _sp._check_embeddings(flat, flat, "features", "features")
        _sp._check_common(reduction, impl)
        _check_schedule(schedule, impl)
        _sp._check_scalar(
            "temperature", temperature, flat.device, _ops.acc_dtype(flat.dtype), positive=True, reciprocal=True
        )
        if not isinstance(flat_labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(flat_labels).__name__}")
        _sp._check_index_vector("labels", flat_labels, flat.shape[0], "the rank's rows", flat.device)

    replicated = {
        "D": _trailing(flat),
        "dtype": _dtype_of(flat),
        "temperature": _scalar_token(temperature),
        "reduction": reduction,
        "schedule": schedule,
        "impl": impl,
        "requires grad": _wants_grad(flat, temperature),
    }
    sizes = _handshake("supcon_loss", world.group, _device(flat), check, replicated, {"n": _rows_of(flat)})["n"]
    if world.size == 1:
        return _sp.supcon_loss(features, labels, temperature, reduction=reduction, impl=impl)
    impl = _sp._resolve_impl(impl, flat) if schedule == "all_gather" else None
    n, off = sizes[world.rank], _dist.offsets(sizes)[world.rank]
    device = flat.device
    labels_all = _gather_ints(world, [(flat_labels, sizes)], device)[0]
    own_labels = labels_all[off : off + n]
    ordered = labels_all.sort().values  # |P(i)| = rows of row i's label, itself excluded
    count = torch.searchsorted(ordered, own_labels, right=True) - torch.searchsorted(ordered, own_labels) - 1
    rows = _Rows("supcon", tuple(sizes), self_start=off, labels=own_labels, key_labels=labels_all, count=count)
    scale = _sp._scale_tensor(1.0 / temperature, flat)
    terms = _rows_terms(rows, flat, flat, scale, None, schedule, impl, world)
    return _reduce(terms, reduction, (rows.count > 0).sum(), world)


def siglip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    reduction: str = "mean",
    group=None,
    schedule: str = "all_gather",
    impl: str | None = None,
) -> torch.Tensor:
    """``infofuse.siglip_loss`` of the global batch: each rank passes its (n_r, D) images and (m_r, D) texts; the
    positive of global image i is global text i, every other pair a negative (global text rows beyond N are extra
    negatives; the global batch needs M >= N).

    Equivalent single-process call: ``infofuse.siglip_loss(cat(images), cat(texts), logit_scale, logit_bias)``.
    "mean" is open_clip's Σ/N over the global N; "none" returns this rank's images' sums. ``logit_scale`` and
    ``logit_bias`` the same on every rank. ``schedule``, ``group``, ``impl`` and the gradient contract (which
    covers the bias) as in ``infofuse.distributed.info_nce``.
    """
    world = _world(group, "siglip_loss")

    def check():
        _sp._check_embeddings(image, text, "image", "text")
        _sp._check_common(reduction, impl)
        _check_schedule(schedule, impl)
        if text.device != image.device:
            raise ValueError(f"text must be on image's device {image.device}, got {text.device}")
        acc = _ops.acc_dtype(image.dtype)
        _sp._check_scalar("logit_scale", logit_scale, image.device, acc, positive=False)
        _sp._check_scalar("logit_bias", logit_bias, image.device, acc, positive=False)

    replicated = {
        "D": _trailing(image),
        "text D": _trailing(text),
        "dtype": _dtype_of(image),
        "logit_scale": _scalar_token(logit_scale),
        "logit_bias": _scalar_token(logit_bias),
        "reduction": reduction,
        "schedule": schedule,
        "impl": impl,
        "requires grad": _wants_grad(image, text, logit_scale, logit_bias),
    }
    sizes = _handshake(
        "siglip_loss", world.group, _device(image), check, replicated, {"n": _rows_of(image), "m": _rows_of(text)}
    )
    if world.size == 1:
        return _sp.siglip_loss(image, text, logit_scale, logit_bias, reduction=reduction, impl=impl)
    n_sizes, m_sizes = sizes["n"], sizes["m"]
    n_all, m_all = sum(n_sizes), sum(m_sizes)
    if m_all < n_all:
        raise ValueError(
            f"infofuse.distributed.siglip_loss needs at least as many texts as images in the global batch, got "
            f"N = {n_all} images and M = {m_all} texts"
        )
    impl = _sp._resolve_impl(impl, image) if schedule == "all_gather" else None
    off = _dist.offsets(n_sizes)[world.rank]
    rows = _Rows("siglip", tuple(m_sizes), self_start=off)
    scale = _sp._scale_tensor(logit_scale, image)
    bias = _sp._scale_tensor(logit_bias, image)
    terms = _rows_terms(rows, image, text, scale, bias, schedule, impl, world)
    return _reduce(terms, reduction, n_all, world)

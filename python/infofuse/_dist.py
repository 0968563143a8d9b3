"""What every op of ``infofuse.distributed`` shares: the agreement handshake, differentiable collectives over
rows, and an account of the bytes each collective sends.

The collectives are torch.distributed's functional collectives (``torch.distributed._functional_collectives``)
inside our own ``torch.autograd.Function``s, so that their backward formulas are ours and stated next to them
(the forward of one is the backward of another), and so that they run on any backend: NCCL on GPUs, gloo on CPUs.

Byte accounting: every collective adds what this rank *sends* under the ring algorithm to a per-process counter
(all-gather or reduce-scatter of a total of S bytes: (W − 1)/W · S; all-reduce: 2 (W − 1)/W · S; a point-to-point
send: its size). ``comm_stats()`` reads it; the benchmark compares it with each op's analytic minimum.
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct
import zlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

# The handshake's vector: a header (op, field names, error flag) and one int64 per field, padded to this length
# so that ranks whose code paths differ (one passed a bias, another did not) still take part in one collective
# of one shape and then see the difference, instead of hanging.
_HANDSHAKE_LEN = 64
_HEADER = 3


@dataclasses.dataclass
class CommStats:
    """Bytes this rank sent and collectives it joined, since the ``comm_stats()`` block began."""

    bytes_sent: int = 0
    calls: int = 0
    by_kind: dict = dataclasses.field(default_factory=dict)


_STATS: list[CommStats] = []


@contextlib.contextmanager
def comm_stats() -> Iterator[CommStats]:
    """Count what this rank sends inside the block (nested blocks each count everything inside them)::

    with infofuse.distributed.comm_stats() as stats:
        loss = infofuse.distributed.clip_loss(q, k, scale)
        loss.backward()
    print(stats.bytes_sent)
    """
    stats = CommStats()
    _STATS.append(stats)
    try:
        yield stats
    finally:
        _STATS.remove(stats)


def _account(kind: str, nbytes: float) -> None:
    for stats in _STATS:
        stats.bytes_sent += int(nbytes)
        stats.calls += 1
        stats.by_kind[kind] = stats.by_kind.get(kind, 0) + int(nbytes)


def _funcol():
    import torch.distributed._functional_collectives as funcol

    return funcol


def _wait(t: torch.Tensor) -> torch.Tensor:
    return _funcol().wait_tensor(t)


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """Functional all-gather along dim 0: ``all_gather_single`` where torch has it (it deprecates
    ``all_gather_tensor``), else ``all_gather_tensor`` (older torch)."""
    funcol = _funcol()
    fn = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    return _wait(fn(t, 0, group))


def _reduce_scatter(t: torch.Tensor, group) -> torch.Tensor:
    """Functional reduce-scatter (sum) along dim 0, by whichever name this torch has."""
    funcol = _funcol()
    fn = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor
    return _wait(fn(t, "sum", 0, group))


# ----------------------------------------------------------------------------------------------------------------
# groups


def resolve_group(group, op: str):
    """The process group to use (the default group for None); a clear error when torch.distributed is not set up."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"infofuse.distributed.{op} needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group); for one process, use infofuse." + op
        )
    return dist.group.WORLD if group is None else group


def world_size(group) -> int:
    return dist.get_world_size(group)


def rank(group) -> int:
    return dist.get_rank(group)


# ----------------------------------------------------------------------------------------------------------------
# the handshake


def _encode(value) -> int:
    """One int64 standing for a value: integers and bools as themselves, floats by their bits, anything else by
    the CRC-32 of its repr (dtypes, strings, None, tuples)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return struct.unpack("<q", struct.pack("<d", value))[0]
    return zlib.crc32(repr(value).encode()) | (1 << 40)


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def agree(
    op: str,
    group,
    device: torch.device,
    replicated: dict,
    local: dict | None = None,
    error: BaseException | None = None,
) -> dict[str, list[int]]:
    """One small all-gather before any kernel: every rank raises the same error when the ranks disagree.

    ``replicated``: what must be equal on every rank (trailing shapes, dtypes, options), name → value.
    ``local``: integers that may differ (each rank's number of rows), name → int; returned as name → list by rank.
    ``error``: this rank's own validation error, if any: every rank then raises (this one its own error, the
    others a ``ValueError`` naming the rank), so that one rank's bad input never leaves the others waiting in a
    collective.

    It needs the exchanged values on the host, so under ``torch.compile`` it is a graph break (and
    ``fullgraph=True`` fails): an op that must compile whole has to get what it needs from the other ranks by
    traceable collectives instead (as the vocabulary-parallel op does), never by assuming the ranks agree.
    """
    local = dict(local or {})
    names = list(replicated) + ["|"] + list(local)
    fields = [_encode(v) for v in replicated.values()] + [int(v) for v in local.values()]
    if _HEADER + len(fields) > _HANDSHAKE_LEN:
        raise AssertionError(f"{op}: {len(fields)} handshake fields; raise _HANDSHAKE_LEN")
    vec = torch.zeros(_HANDSHAKE_LEN, dtype=torch.int64)
    vec[0] = _crc(op)
    vec[1] = _crc(",".join(names))
    vec[2] = int(error is not None)
    vec[_HEADER : _HEADER + len(fields)] = torch.tensor(fields, dtype=torch.int64)
    w = world_size(group)
    out = _all_gather(vec.to(device), group)
    _account("handshake", (w - 1) * vec.numel() * 8)
    table = out.cpu().view(w, _HANDSHAKE_LEN)
    me = rank(group)
    prefix = f"infofuse.distributed.{op}"
    failed = [r for r in range(w) if table[r, 2] != 0]
    if failed:
        if error is not None:
            raise error
        raise ValueError(f"{prefix}: rank(s) {failed} of the group rejected their input (see their error)")
    if not bool((table[:, :2] == table[0, :2]).all()):
        raise ValueError(
            f"{prefix}: the ranks call it differently (different operations, or different optional arguments "
            f"given: this rank passed {names[: names.index('|')]})"
        )
    for i, name in enumerate(names[: len(replicated)]):
        col = table[:, _HEADER + i]
        if not bool((col == col[0]).all()):
            groups: dict[int, list[int]] = {}
            for r, v in enumerate(col.tolist()):
                groups.setdefault(v, []).append(r)
            parts = " vs ".join(f"ranks {rs}" for rs in groups.values())
            raise ValueError(
                f"{prefix}: the ranks disagree on `{name}` ({parts}; this rank, rank {me}, has "
                f"{replicated[name]!r}); it must be the same on every rank of the group"
            )
    base = _HEADER + len(replicated)
    return {name: table[:, base + i].tolist() for i, name in enumerate(local)}


# ----------------------------------------------------------------------------------------------------------------
# collectives with their backward formulas


def offsets(sizes: Sequence[int]) -> list[int]:
    """Exclusive prefix sums: where each rank's rows start in the concatenation."""
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += int(s)
    return out


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def _all_gather_rows(t: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    w, most = len(sizes), max(sizes)
    padded = _pad_rows(t, most)
    out = _all_gather(padded, group)
    _account("all_gather", (w - 1) * padded.numel() * padded.element_size())
    if all(s == most for s in sizes):
        return out
    return torch.cat([out[r * most : r * most + s] for r, s in enumerate(sizes)])


def _reduce_scatter_rows(t: torch.Tensor, sizes: Sequence[int], group, me: int) -> torch.Tensor:
    w, most = len(sizes), max(sizes)
    if all(s == most for s in sizes):
        padded = t.contiguous()
    else:
        padded = torch.cat([_pad_rows(part, most) for part in t.split(list(sizes))])
    out = _reduce_scatter(padded, group)
    _account("reduce_scatter", (w - 1) * out.numel() * out.element_size())
    return out[: sizes[me]]


class _GatherRows(torch.autograd.Function):
    """Forward: the concatenation of every rank's rows. Backward: each rank's slice of the sum over ranks of the
    gradients (a reduce-scatter), so the owner of rows receives every rank's gradient for them."""

    @staticmethod
    def forward(ctx, t, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _all_gather_rows(t, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad, ctx.sizes, ctx.group, rank(ctx.group)), None, None


def gather_rows(t: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Every rank's rows of ``t`` concatenated in rank order (``sizes``: rows by rank; uneven allowed), with the
    gradients of the result summed over ranks back onto their owner's rows."""
    return _GatherRows.apply(t, tuple(int(s) for s in sizes), group)


class _AllReduceSum(torch.autograd.Function):
    """Forward: the sum over ranks. Backward: the incoming gradient times ``grad_scale``, no communication.

    For a loss that every rank computes in part (L = Σ_r L_r): every rank returns L, and rank r's graph
    carries ``grad_scale`` · ∂L_r. With ``grad_scale`` = W, DistributedDataParallel's average over ranks of the
    parameter gradients is exactly ∂L/∂θ (the gradients of shared inputs gathered from other ranks come back by
    ``gather_rows``' reduce-scatter)."""

    @staticmethod
    def forward(ctx, t, group, grad_scale):
        ctx.grad_scale = grad_scale
        out = _wait(_funcol().all_reduce(t.contiguous(), "sum", group))
        w = world_size(group)
        _account("all_reduce", 2 * (w - 1) / w * t.numel() * t.element_size())
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.grad_scale, None, None


def all_reduce_sum(t: torch.Tensor, group, grad_scale: float = 1.0) -> torch.Tensor:
    return _AllReduceSum.apply(t, group, float(grad_scale))


class _SumGradients(torch.autograd.Function):
    """Forward: the identity. Backward: the sum over ranks of the gradients (an all-reduce).

    For an input that every rank holds whole and uses for its part of the output (the activations entering a
    vocabulary-parallel head): the all-reduce completes ∂L/∂input on every rank."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        w = world_size(ctx.group)
        out = _wait(_funcol().all_reduce(grad.contiguous(), "sum", ctx.group))
        _account("all_reduce", 2 * (w - 1) / w * grad.numel() * grad.element_size())
        return out, None


def sum_gradients(t: torch.Tensor, group) -> torch.Tensor:
    return _SumGradients.apply(t, group)


class _GatherReplicated(torch.autograd.Function):
    """Forward: every rank's ``t`` stacked, (W, ...). Backward: this rank's slice of the gradient, no
    communication — right when every rank computes the same function of the stack (the same loss from the same
    gathered statistics), so that each rank's gradient for its own slice is already the whole gradient."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        w = world_size(group)
        out = _all_gather(t.contiguous(), group)
        _account("all_gather", (w - 1) * t.numel() * t.element_size())
        return out.view(w, *t.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad[rank(ctx.group)], None


def gather_replicated(t: torch.Tensor, group) -> torch.Tensor:
    return _GatherReplicated.apply(t, group)


def send_recv(send: torch.Tensor, recv: torch.Tensor, to_rank: int, from_rank: int, group) -> list:
    """Post a ring step: send ``send`` to ``to_rank`` and receive into ``recv`` from ``from_rank`` (group ranks);
    returns the requests to wait on. Counts the bytes sent."""
    ops = [
        dist.P2POp(dist.isend, send.contiguous(), dist.get_global_rank(group, to_rank), group),
        dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, from_rank), group),
    ]
    _account("send", send.numel() * send.element_size())
    return dist.batch_isend_irecv(ops)

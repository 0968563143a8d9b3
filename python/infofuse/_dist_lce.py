"""Vocabulary-parallel linear cross-entropy: the V×D head sharded by rows over the ranks of a group.

Every rank holds the same activations ``input`` (..., D) and the same global ``target``, and its own rows
W_r (V_r × D) of the head (rank order, uneven shards allowed, a rank may hold none). The loss is the single-process
``infofuse.linear_cross_entropy`` of the concatenated head, for every option, computed from per-row statistics:

* each rank runs the single-process kernels on its shard (they chunk: no logit row beyond the shard is ever
  held). Without label smoothing one pass gives the shard's log-sum-exp lse_r and, for the rows whose target the
  shard owns (the others ignored), lse_r − ẑ_t, hence the target logit ẑ_t. With smoothing ε the pass runs with
  ``label_smoothing=1`` (its per-row loss is then A_r / V_r, A_r = Σ_{v∈r} w_v (lse_r − ẑ_v), whatever the
  target) and the owned rows' ẑ_t = cap(x·W[t] + b[t]) are computed directly by row chunks (O(N·D));
* one all-gather of these (k, N) statistics (k = 2, + 1 with smoothing, + 1 with class weights: w_t of the owned
  rows), after which every rank forms, in plain torch on (N,) vectors, lse = logsumexp_r lse_r,
  Σ_v w_v (lse − ẑ_v) = Σ_r [A_r + (Σ_{v∈r} w_v)(lse − lse_r)] and the loss of MATH.md.

Gradients: the statistics come back through ``gather_replicated`` (every rank computes the same function of the
same stack, so each rank's gradient for its own slice is complete), the shard's kernels turn them into
``linear_weight.grad`` / ``linear_bias.grad`` of the shard, and ``input`` enters through ``sum_gradients``, whose
backward all-reduces ∂L/∂input: the whole gradient lands on every rank, as a column-parallel head needs.
"""

from __future__ import annotations

import numbers

import torch

from . import _dist
from .linear_cross_entropy import _validate
from .linear_cross_entropy import linear_cross_entropy as _local_lce

__all__ = ["linear_cross_entropy", "min_bytes", "sent_bytes"]

_OP = "linear_cross_entropy"


def min_bytes(n: int, d: int, world: int, dtype: torch.dtype = torch.float32) -> float:
    """The analytic minimum of the bytes one rank sends for one forward + backward (ring accounting, as
    ``comm_stats`` counts): the all-reduce of the N×D input gradient, 2(W − 1)/W · N·D·b (b bytes per element of
    ``dtype``), which a column-parallel head cannot avoid, plus one all-reduce of N float32 values, 2(W − 1)/W · 4N,
    the least that merges the ranks' per-row log-sum-exps. A lower bound: the target logits (and smoothing terms)
    that the loss also needs from other ranks are not counted."""
    if world <= 1:
        return 0.0
    b = torch.empty((), dtype=dtype).element_size()
    return 2 * (world - 1) / world * (n * d * b + 4 * n)


def sent_bytes(
    n: int,
    d: int,
    world: int,
    dtype: torch.dtype = torch.float32,
    *,
    label_smoothing: bool = False,
    class_weights: bool = False,
    input_grad: bool = True,
) -> float:
    """What this implementation sends per rank for one forward + backward, as ``comm_stats`` counts it: the
    handshake ((W − 1)·64·8), the all-gather of k·N + 1 statistics ((W − 1)(kN + 1)·s, s = 8 for float64 inputs,
    else 4; k = 2 + [label smoothing] + [class weights]) and, when ``input`` requires a gradient, the N×D
    input-gradient all-reduce (2(W − 1)/W · N·D·b)."""
    if world <= 1:
        return 0.0
    b = torch.empty((), dtype=dtype).element_size()
    s = 8 if dtype == torch.float64 else 4
    k = 2 + int(label_smoothing) + int(class_weights)
    out = (world - 1) * _dist._HANDSHAKE_LEN * 8 + (world - 1) * (k * n + 1) * s
    if input_grad:
        out += 2 * (world - 1) / world * n * d * b
    return out


# ----------------------------------------------------------------------------------------------------------------
# DTensor arguments


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _shard0_local(name: str, t, mesh):
    """The local shard of a DTensor sharded on dim 0 over ``mesh`` (1-D), differentiable (its gradient arrives as
    the DTensor's grad)."""
    from torch.distributed.tensor import Shard

    if t.device_mesh.ndim != 1:
        raise ValueError(f"{name}: a DTensor must live on a 1-D device mesh, got a {t.device_mesh.ndim}-D mesh")
    if mesh is not None and t.device_mesh != mesh:
        raise ValueError(f"{name}: a DTensor must live on linear_weight's device mesh")
    if tuple(t.placements) != (Shard(0),):
        raise ValueError(f"{name}: a DTensor must be sharded on dim 0 (placements (Shard(0),)), got {t.placements}")
    return t.to_local()


def _replicated_local(name: str, t):
    from torch.distributed.tensor import Replicate

    if not all(isinstance(p, Replicate) for p in t.placements):
        raise ValueError(f"{name}: a DTensor must be replicated (every rank holds the same {name}), got {t.placements}")
    return t.to_local()


def _unwrap(group, input, linear_weight, target, linear_bias, weight, token_weight):
    """Plain local tensors and the group: a DTensor head (Shard(0) on a 1-D mesh) brings its group."""
    mesh = None
    if _is_dtensor(linear_weight):
        mesh = linear_weight.device_mesh
        linear_weight = _shard0_local("linear_weight", linear_weight, None)
        mesh_group = mesh.get_group()
        if group is not None and group != mesh_group:
            raise ValueError("group must be None or linear_weight's mesh group when linear_weight is a DTensor")
        group = mesh_group
    if _is_dtensor(linear_bias):
        linear_bias = _shard0_local("linear_bias", linear_bias, mesh)
    if _is_dtensor(weight):
        weight = _shard0_local("weight", weight, mesh)
    if _is_dtensor(input):
        input = _replicated_local("input", input)
    if _is_dtensor(target):
        target = _replicated_local("target", target)
    if _is_dtensor(token_weight):
        token_weight = _replicated_local("token_weight", token_weight)
    return group, input, linear_weight, target, linear_bias, weight, token_weight


# ----------------------------------------------------------------------------------------------------------------
# validation and the handshake


def _fingerprint(t: torch.Tensor | None) -> int:
    """An int64 hash of an integer or floating tensor's values (bitwise for floats), to check it is replicated."""
    if t is None:
        return 0
    flat = t.detach().reshape(-1)
    if flat.is_floating_point():
        flat = flat.to(torch.float64).view(torch.int64)
    flat = flat.to(torch.int64)
    # position-dependent odd multipliers; int64 arithmetic wraps, identically on every rank
    mult = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) * 2654435761 + 40503
    return int((flat * mult).sum()) if flat.numel() else 0


def _handshake_device(group, input) -> torch.device:
    if isinstance(input, torch.Tensor) and not _is_dtensor(input):
        return input.device
    if torch.distributed.get_backend(group) == "nccl":  # pragma: no cover - GPU machines
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_local(
    input,
    linear_weight,
    target,
    linear_bias,
    weight,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    token_weight,
    impl,
    chunk_size,
):
    """This rank's own validation (the single-process op's, with the target's range left for later: it is global)."""
    for name, t in (("input", input), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if target.dtype.is_floating_point:
        raise ValueError(
            "infofuse.distributed.linear_cross_entropy takes class-index targets only (integer (...) = "
            f"input.shape[:-1]); got a floating-point target of dtype {target.dtype} (class probabilities are not "
            "supported vocabulary-parallel)"
        )
    if ignore_index is not None and (not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool)):
        raise TypeError(f"ignore_index must be None or an int, got {type(ignore_index).__name__}")
    if target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    # the single-process checks on the shard, with a stand-in target of the same shape and dtype that passes the
    # range check (the real range is [0, Σ_r V_r), checked after the handshake)
    stand_in = torch.full_like(target, -100 if ignore_index is None else ignore_index)
    _validate(
        input,
        linear_weight,
        stand_in,
        linear_bias,
        weight,
        reduction,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        impl,
        chunk_size,
        token_weight,
        None,
    )


def _agree(group, input, linear_weight, target, linear_bias, weight, token_weight, options, error):
    """The handshake: one all-gather; returns every rank's V_r. Every rank raises the same error on a
    disagreement or on any rank's own validation error."""
    device = _handshake_device(group, input)
    if error is not None:
        _dist.agree(_OP, group, device, {}, {}, error=error)
        raise AssertionError("unreachable: agree raises when a rank reports an error")  # pragma: no cover
    grad_on = torch.is_grad_enabled()
    replicated = {
        "D (input.shape[-1])": input.shape[-1],
        "input.shape[:-1]": tuple(input.shape[:-1]),
        "input.dtype": input.dtype,
        "device type": input.device.type,
        "input requires grad": bool(grad_on and input.requires_grad),
        "target.dtype": target.dtype,
        "target (its values)": _fingerprint(target),
        "linear_bias given": linear_bias is not None,
        "weight given": weight is not None,
        "weight.dtype": None if weight is None else weight.dtype,
        "token_weight given": token_weight is not None,
        "token_weight (its values)": _fingerprint(token_weight),
        **options,
    }
    try:
        fields = _dist.agree(_OP, group, device, replicated, {"V_r": linear_weight.shape[0]})
    except ValueError as e:
        if "disagree" not in str(e):
            raise
        raise ValueError(f"{e} (vocabulary parallel: only the head's shards differ between ranks)") from None
    return fields["V_r"]


def _check_targets(target: torch.Tensor, ignore_index: int, v: int) -> None:
    """Targets in [0, V) or ignore_index (V = Σ_r V_r). The target is the same on every rank (the handshake
    compared its fingerprint), so every rank raises the same error."""
    if torch.compiler.is_compiling() or target.numel() == 0:
        return
    t = target.reshape(-1)
    bad = (t != ignore_index) & ((t < 0) | (t >= v))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"infofuse.distributed.linear_cross_entropy: target[{i}] (flattened) = {int(t[i])} is outside [0, V) "
            f"with V = Σ_r V_r = {v} (the whole head) and is not ignore_index ({ignore_index})"
        )


# ----------------------------------------------------------------------------------------------------------------
# target logits (with label smoothing, where the shard's kernel pass cannot also give them)

_TARGET_ROWS = 1024  # rows per chunk: the temporaries of the target logits are _TARGET_ROWS × D


class _TargetLogits(torch.autograd.Function):
    """ẑ_t,i = cap(x_i·W[idx_i] + b[idx_i]) for the ``owned`` rows, 0 for the others, accumulated in float32
    (float64 for float64 inputs), by chunks of rows: no N×D temporary, nothing N×D saved beyond ``x`` itself.

    Backward, with g'_i = g_i·owned_i·(1 − (ẑ_i/c)²) (the last factor with softcap c only):
    dx_i = g'_i·W[idx_i], dW[j] = Σ_{i: idx_i = j} g'_i·x_i, db[j] = Σ_{i: idx_i = j} g'_i."""

    @staticmethod
    def forward(ctx, x, w, b, idx, owned, softcap):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        n = x.shape[0]
        z = torch.empty(n, dtype=acc, device=x.device)
        for s in range(0, n, _TARGET_ROWS):
            e = min(n, s + _TARGET_ROWS)
            z[s:e] = torch.linalg.vecdot(x[s:e].to(acc), w.index_select(0, idx[s:e]).to(acc))
        if b is not None:
            z = z + b.to(acc).index_select(0, idx)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = torch.where(owned, z, 0.0)
        ctx.save_for_backward(x, w, idx, owned, z)
        ctx.softcap, ctx.bias = softcap, None if b is None else (b.shape, b.dtype)
        return z

    @staticmethod
    def backward(ctx, g):
        x, w, idx, owned, z = ctx.saved_tensors
        acc = z.dtype
        g = torch.where(owned, g.to(acc), 0.0)
        if ctx.softcap is not None:
            g = g * (1.0 - (z / ctx.softcap).square())
        n = x.shape[0]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            for s in range(0, n, _TARGET_ROWS):
                e = min(n, s + _TARGET_ROWS)
                dx[s:e] = (g[s:e, None] * w.index_select(0, idx[s:e]).to(acc)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            acc_w = torch.zeros(w.shape, dtype=acc, device=w.device)  # float32 sums of the rows, as the kernels
            for s in range(0, n, _TARGET_ROWS):
                e = min(n, s + _TARGET_ROWS)
                acc_w.index_add_(0, idx[s:e], g[s:e, None] * x[s:e].to(acc))
            dw = acc_w.to(w.dtype)
        if ctx.bias is not None and ctx.needs_input_grad[2]:
            shape, dtype = ctx.bias
            db = torch.zeros(shape, dtype=acc, device=g.device).index_add_(0, idx, g).to(dtype)
        return dx, dw, db, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# the op


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    group=None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    token_weight: torch.Tensor | None = None,
    return_lse: bool = False,
    impl: str | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``infofuse.linear_cross_entropy`` of the head whose rows are sharded over the ranks of ``group``.

    Equivalent, on every rank (``cat`` over the ranks of the group, in rank order)::

        infofuse.linear_cross_entropy(input, cat(linear_weight), target, linear_bias=cat(linear_bias),
                                      weight=cat(weight), reduction=reduction, ...)

    Args:
        input: (..., D) activations, the same on every rank (float32, bfloat16, float16 or float64).
        linear_weight: this rank's rows of the V×D head, (V_r, D), input's dtype; V = Σ_r V_r, shards in rank order,
            uneven allowed, V_r = 0 allowed. Or a ``DTensor`` sharded on dim 0 (``Shard(0)``) over a 1-D device
            mesh: the group is then the mesh's, and the gradient arrives as the DTensor's grad.
        target: (...) = ``input.shape[:-1]`` integer class indices into the whole head, [0, V) or
            ``ignore_index``, the same on every rank. Class-probability targets are not supported.
        linear_bias: this rank's (V_r,) slice of the bias (or a Shard(0) DTensor on the head's mesh).
        group: the process group the head is sharded over (None: the default group; with a DTensor head, None or
            its mesh's group).
        weight: this rank's (V_r,) slice of the class weights (or a Shard(0) DTensor); receives no gradient.
        reduction, ignore_index, label_smoothing, z_loss, softcap, token_weight, return_lse, impl, chunk_size: as
            in ``infofuse.linear_cross_entropy`` (``token_weight`` the same on every rank; ``return_lse`` returns
            the log-sum-exp over the whole vocabulary; ``impl`` / ``chunk_size`` pick the kernels run on the shard).

    Returns:
        The same loss on every rank (float32, float64 for float64 inputs), and with ``return_lse`` the global
        lse. Gradients: ``input.grad`` is the whole ∂L/∂input on every rank (all-reduced inside), each rank's
        ``linear_weight.grad`` / ``linear_bias.grad`` its shard's rows of the whole gradient, ``token_weight.grad``
        whole on every rank. Under DDP/FSDP2 do not average the head's or the input's gradient over this group:
        they are already complete.

    Before any kernel the ranks compare, in one small all-gather, D, the batch shape, the dtypes, every option,
    which optional tensors are given, fingerprints of ``target`` and ``token_weight``, and whether ``input``
    requires a gradient; a disagreement, or any rank's invalid argument, raises a ValueError on every rank.
    """
    with torch.profiler.record_function("infofuse::distributed::linear_cross_entropy"):
        group, input, linear_weight, target, linear_bias, weight, token_weight = _unwrap(
            group, input, linear_weight, target, linear_bias, weight, token_weight
        )
        group = _dist.resolve_group(group, _OP)
        if _dist.rank(group) < 0:
            raise ValueError(
                "infofuse.distributed.linear_cross_entropy: this process is not a member of `group`; only the ranks "
                "that hold a shard of the head call it"
            )
        error = None
        options = {}
        try:
            _check_local(
                input,
                linear_weight,
                target,
                linear_bias,
                weight,
                reduction,
                ignore_index,
                label_smoothing,
                z_loss,
                softcap,
                token_weight,
                impl,
                chunk_size,
            )
            options = {
                "reduction": reduction,
                "ignore_index": -100 if ignore_index is None else int(ignore_index),
                "label_smoothing": float(label_smoothing),
                "z_loss": float(z_loss),
                "softcap": None if softcap is None else float(softcap),
                "return_lse": bool(return_lse),
                "impl": impl,
                "chunk_size": chunk_size,
            }
        except (ValueError, TypeError) as e:
            # the single-process checks name the shard's size V: say that it is this rank's
            rows = linear_weight.shape[0] if isinstance(linear_weight, torch.Tensor) else "?"
            where = f"infofuse.distributed.linear_cross_entropy, rank {_dist.rank(group)} (V = V_r = {rows}, its shard)"
            error = type(e)(f"{where}: {e}")
        if torch.compiler.is_compiling():
            # no handshake under torch.compile (it needs host values): the shard sizes come from a traceable
            # all-gather inside _forward, the checks across ranks are the caller's
            if error is not None:
                raise error
            sizes = None
        else:
            sizes = _agree(group, input, linear_weight, target, linear_bias, weight, token_weight, options, error)
            if sum(sizes) == 0:
                raise ValueError("infofuse.distributed.linear_cross_entropy: the head has no rows on any rank (V = 0)")
            _check_targets(target, options["ignore_index"], sum(sizes))
        ignore_index = options["ignore_index"]
        if _dist.world_size(group) == 1:
            # one rank holds the whole head: the single-process op itself, bit for bit
            return _local_lce(
                input,
                linear_weight,
                target,
                linear_bias=linear_bias,
                weight=weight,
                reduction=reduction,
                ignore_index=ignore_index,
                label_smoothing=options["label_smoothing"],
                z_loss=options["z_loss"],
                softcap=options["softcap"],
                token_weight=token_weight,
                return_lse=bool(return_lse),
                impl=impl,
                chunk_size=chunk_size,
            )
        return _forward(
            input,
            linear_weight,
            target,
            linear_bias,
            weight,
            token_weight,
            group,
            sizes,
            reduction,
            ignore_index,
            options["label_smoothing"],
            options["z_loss"],
            options["softcap"],
            bool(return_lse),
            impl,
            chunk_size,
        )


def _forward(
    input,
    linear_weight,
    target,
    linear_bias,
    weight,
    token_weight,
    group,
    sizes,
    reduction,
    ignore_index,
    eps,
    z_loss,
    softcap,
    return_lse,
    impl,
    chunk_size,
):
    me, world = _dist.rank(group), _dist.world_size(group)
    v_r = linear_weight.shape[0]
    batch_shape = input.shape[:-1]
    d = input.shape[-1]
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    t = target.reshape(-1).long()
    n = t.numel()
    # the input's gradient is summed over the ranks (each rank's part comes from its shard)
    x = _dist.sum_gradients(input, group).reshape(n, d)

    # every rank's V_r as a tensor (the handshake's values; under torch.compile a traceable all-gather), so that
    # the shard offsets stay tensors and the traced graph holds for any split of the head
    if sizes is None:
        sizes_t = _dist.gather_replicated(torch.full((1,), v_r, dtype=torch.int64, device=t.device), group).view(-1)
    else:
        sizes_t = torch.tensor(sizes, dtype=torch.int64, device=t.device)
    local_t = t - sizes_t[:me].sum()
    valid = t != ignore_index
    owned = valid & (local_t >= 0) & (local_t < v_r)  # rows whose target class lies in this shard
    idx = torch.where(owned, local_t, 0)

    # this shard's statistics: lse_r; the target logit ẑ_t of the owned rows (0 elsewhere); with smoothing
    # A_r = Σ_{v∈r} w_v (lse_r − ẑ_v); with class weights w_t of the owned rows (0 elsewhere)
    rows = []
    if v_r > 0 and eps == 0.0:
        # one kernel pass: the shard's cross-entropy of the owned rows (the others ignored) is lse_r − ẑ_t
        part, lse_r = _local_lce(
            x,
            linear_weight,
            torch.where(owned, local_t, -100),
            linear_bias=linear_bias,
            reduction="none",
            softcap=softcap,
            return_lse=True,
            impl=impl,
            chunk_size=chunk_size,
        )
        lse_r = lse_r.to(acc)
        rows += [lse_r, torch.where(owned, lse_r - part.to(acc), 0.0)]
    elif v_r > 0:
        # the op with label_smoothing=1 returns A_r / V_r for any target (class 0 of the shard here); ẑ_t by rows
        part, lse_r = _local_lce(
            x,
            linear_weight,
            torch.zeros(n, dtype=torch.int64, device=t.device),
            linear_bias=linear_bias,
            weight=weight,
            reduction="none",
            label_smoothing=1.0,
            softcap=softcap,
            return_lse=True,
            impl=impl,
            chunk_size=chunk_size,
        )
        z_t = _TargetLogits.apply(x, linear_weight, linear_bias, idx, owned, softcap)
        rows += [lse_r.to(acc), z_t, part.to(acc) * v_r]
    else:
        # no rows here: lse_r = −inf, ẑ_t = A_r = 0; the input still enters the graph so that this rank joins the
        # backward all-reduce of the input gradient like every other rank (and the empty weight and bias too, so
        # that their gradients are (0, D) / (0,) tensors, not None)
        zero = x[:, :0].sum(-1).to(acc) + linear_weight.sum().to(acc)
        if linear_bias is not None:
            zero = zero + linear_bias.sum().to(acc)
        rows += [zero - torch.inf, zero] + ([zero] if eps > 0 else [])
    if weight is not None:
        w_t = torch.where(owned, weight.to(acc)[idx], 0.0) if v_r > 0 else torch.zeros_like(rows[0])
        rows.append(w_t.detach())
    sum_w = (weight.to(acc).sum() if weight is not None else torch.tensor(float(v_r), dtype=acc)).reshape(1)

    # one all-gather of the (k, N) statistics [lse_r, ẑ_t, (A_r), (w_t)] and Σ_{v∈r} w_v
    k = len(rows)
    packed = torch.cat([torch.stack(rows).reshape(-1), sum_w.to(device=x.device, dtype=acc)])
    gathered = _dist.gather_replicated(packed, group)  # (W, k·N + 1)
    stats = gathered[:, : k * n].reshape(world, k, n)
    sum_ws = gathered[:, k * n]
    lse_rs = stats[:, 0]
    lse = torch.logsumexp(lse_rs, dim=0)
    z_target = stats[:, 1].sum(0)

    nll = lse - z_target
    w_target = stats[:, k - 1].sum(0) if weight is not None else None
    ce = nll if w_target is None else w_target * nll
    if eps > 0:
        # Σ_v w_v (lse − ẑ_v) = Σ_r [A_r + (Σ_{v∈r} w_v)(lse − lse_r)], shards with rows only
        # (an empty shard's lse_r = −inf: masked, its forward value is NaN and its gradient 0)
        terms = stats[:, 2] + sum_ws[:, None] * (lse - lse_rs)
        smooth = torch.where((sizes_t > 0)[:, None], terms, 0.0).sum(0)
        ce = (1.0 - eps) * ce + (eps / sizes_t.sum().to(acc)) * smooth
    ce = torch.where(valid, ce, 0.0)
    z_term = torch.where(valid, z_loss * lse.square(), 0.0) if z_loss != 0.0 else None
    if token_weight is not None:
        tau = token_weight.reshape(-1).to(acc)
        ce = ce * tau
        z_term = None if z_term is None else z_term * tau

    if reduction == "none":
        loss = ce if z_term is None else ce + z_term
        loss = loss.reshape(batch_shape)
    elif reduction == "sum":
        loss = ce.sum() if z_term is None else ce.sum() + z_term.sum()
    else:
        n_valid = valid.sum().to(acc)
        divisor = n_valid if w_target is None else torch.where(valid, w_target, 0.0).sum()
        loss = ce.sum() / divisor
        if z_term is not None:
            # the z-loss part is divided by the number of valid tokens (clamped: with none, the loss is NaN anyway)
            loss = loss + z_term.sum() / n_valid.clamp(min=1)
    if return_lse:
        return loss, lse.reshape(batch_shape)
    return loss

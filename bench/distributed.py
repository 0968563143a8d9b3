"""``python -m infofuse bench --distributed``: the ops of ``infofuse.distributed`` on W spawned CPU ranks (gloo).

Each rank builds its own shard of the same global problem from the same seed and runs every peer of every case
in turn: warm-up steps, then timed forward + backward steps between barriers (the time of a step is the slowest
rank's), one step inside ``comm_stats()`` (bytes this rank sent, ring accounting) and one step for the peak
memory above the step's start (VmHWM after resetting it through ``/proc/self/clear_refs``, less the gradients
the step produced, as ``bench.memory`` measures a single process). The table gives the median time, its ratio to
the fastest peer, the largest per-rank peak and bytes sent, and the bytes beside each case's analytic minimum:

- ``lce`` (vocabulary parallel, N×D input on every rank, V/W head rows each): the input gradient's all-reduce,
  2 (W−1)/W · N·D·4 bytes, plus O(N) statistics;
- ``clip`` (data parallel, N/W image and text rows each): what any exact method must move — one side's features
  to every rank and their gradients back, 2 (W−1) · (N/W)·D·4 bytes — plus O(N);
- ``knn`` (sharded points, N/W each, ``knn_entropy`` forward and backward): every shard visits every rank once,
  (W−1) · (N/W)·d·4 bytes, and each query's neighbour gradient goes back to its owner, (W−1)/W · (N/W)·d·4 bytes.

Peers: infofuse's ops (both schedules of the contrastive loss), a Megatron-style vocabulary-parallel loss that
materialises each rank's N×(V/W) logits (written here on the same collectives), and open_clip's ``ClipLoss`` with
``gather_with_grad=True`` — the whole N×N block on every rank (``local_loss=False``, as the issue names it) and
its own rows only (``local_loss=True``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import os
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .info_nce import open_clip_loss_module
from .memory import _malloc_trim, _status_kb

CASES = ("lce", "clip", "knn")
_DEFAULT_SHAPES = {
    # lce: N, D, V (global); clip: N (global), D; knn: N (global), d, k
    "lce": (2048, 1024, 32768),
    "clip": (8192, 512),
    "knn": (65536, 16, 4),
}
_QUICK_SHAPES = {"lce": (64, 32, 256), "clip": (96, 16), "knn": (600, 4, 2)}


# ----------------------------------------------------------------------------------------------------------------
# the problems: each rank's shard of one global problem


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _split(n: int, world: int) -> list[int]:
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


def _lce_peers(shape, rank, world, group):
    import infofuse.distributed as idist
    from infofuse import _dist

    n, d, v = shape
    g = _generator(1)
    x = torch.randn(n, d, generator=g) / d**0.5
    w_full = torch.randn(v, d, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    sizes = _split(v, world)
    start = sum(sizes[:rank])
    w = w_full[start : start + sizes[rank]].clone()
    del w_full

    def ours():
        return idist.linear_cross_entropy(x, w, t, group=group)

    def megatron():
        # every rank's logits N×(V/W) in memory, max / sum-exp / target logit all-reduced
        logits = _dist.sum_gradients(x, group) @ w.T
        with torch.no_grad():
            m = logits.max(1).values
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = (logits - m[:, None]).exp()
        mine = (t >= start) & (t < start + w.shape[0])
        z_t = torch.where(mine, logits.gather(1, (t - start).clamp(0, w.shape[0] - 1)[:, None])[:, 0], 0.0)
        s = _dist.all_reduce_sum(torch.stack([e.sum(1), z_t]), group)
        return (s[0].log() + m - s[1]).mean()

    leaves = [x.requires_grad_(), w.requires_grad_()]
    min_bytes = 2 * (world - 1) / world * n * d * 4
    return leaves, {"infofuse": ours, "megatron-style (logits)": megatron}, min_bytes, f"N={n} D={d} V={v}"


def _clip_peers(shape, rank, world, group):
    import infofuse.distributed as idist

    n, d = shape
    sizes = _split(n, world)
    g = _generator(2)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(n, d, generator=g), dim=1)
    start = sum(sizes[:rank])
    img = img[start : start + sizes[rank]].clone()
    txt = txt[start : start + sizes[rank]].clone()
    scale = torch.tensor(14.0)
    peers = {
        "infofuse all_gather": lambda: idist.clip_loss(img, txt, scale, group=group, schedule="all_gather"),
        "infofuse ring": lambda: idist.clip_loss(img, txt, scale, group=group, schedule="ring"),
    }
    try:
        ClipLoss = open_clip_loss_module().ClipLoss
        full = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world)
        local = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        peers["open_clip gather_with_grad"] = lambda: full(img, txt, scale)
        peers["open_clip local_loss"] = lambda: local(img, txt, scale)
    except (ImportError, FileNotFoundError, importlib.metadata.PackageNotFoundError):
        pass
    scale.requires_grad_()
    min_bytes = 2 * (world - 1) * max(sizes) * d * 4
    return [img.requires_grad_(), txt.requires_grad_(), scale], peers, min_bytes, f"N={n} D={d}"


def _knn_peers(shape, rank, world, group):
    import infofuse.distributed as idist

    n, d, k = shape
    sizes = _split(n, world)
    g = _generator(3)
    x = torch.randn(n, d, generator=g)
    start = sum(sizes[:rank])
    x = x[start : start + sizes[rank]].clone().requires_grad_()
    # the search: every shard visits every rank once; the gradient: each query's k-th neighbour's gradient back to
    # its owner, who is another rank for a fraction (W - 1)/W of the queries
    min_bytes = (world - 1) * max(sizes) * d * 4 + (world - 1) / world * max(sizes) * d * 4
    peers = {"infofuse knn_entropy": lambda: idist.knn_entropy(x, k=k, group=group)}
    return [x], peers, min_bytes, f"N={n} d={d} k={k}"


_BUILDERS = {"lce": _lce_peers, "clip": _clip_peers, "knn": _knn_peers}


# ----------------------------------------------------------------------------------------------------------------
# one rank


def _clear(leaves) -> None:
    for t in leaves:
        t.grad = None


def _step(fn, leaves) -> None:
    loss = fn()
    loss.backward()
    del loss


@contextlib.contextmanager
def _counting_c10d(group):
    """Count, into infofuse's ``comm_stats``, what the peers send through torch.distributed's c10d functions
    (open_clip's gather goes through ``torch.distributed.nn``, which calls them); infofuse's own collectives are
    functional collectives and count themselves."""
    from infofuse import _dist

    w = dist.get_world_size(group)
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    rules = {
        "all_gather": lambda out, t, *a, **k: (w - 1) * nbytes(t),
        "all_gather_into_tensor": lambda out, t, *a, **k: (w - 1) * nbytes(t),
        "all_reduce": lambda t, *a, **k: 2 * (w - 1) / w * nbytes(t),
        "reduce_scatter": lambda out, ts, *a, **k: (w - 1) * nbytes(out),
        "reduce_scatter_tensor": lambda out, t, *a, **k: (w - 1) * nbytes(out),
        "all_to_all": lambda outs, ins, *a, **k: sum(nbytes(t) for t in ins) * (w - 1) / w,
        # torch.distributed.nn's all-to-all on gloo: W scatters, each rank the source of one
        "scatter": lambda out, lst=None, *a, **k: (w - 1) * nbytes(out) if (lst or k.get("scatter_list")) else 0,
    }
    saved = {name: getattr(dist, name) for name in rules}

    def wrap(name, original):
        def counted(*args, **kwargs):
            _dist._account(name, rules[name](*args, **kwargs))
            return original(*args, **kwargs)

        return counted

    for name, original in saved.items():
        setattr(dist, name, wrap(name, original))
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)


def _measure(fn, leaves, reps: int, warmup: int, memory: bool, group) -> dict:
    from infofuse import _dist

    for _ in range(warmup):
        _step(fn, leaves)
        _clear(leaves)
    times = []
    for _ in range(reps):
        dist.barrier(group)
        t0 = time.perf_counter()
        _step(fn, leaves)
        times.append(time.perf_counter() - t0)
        _clear(leaves)
    with _dist.comm_stats() as stats, _counting_c10d(group):
        _step(fn, leaves)
    _clear(leaves)
    out = {"times": times, "bytes": stats.bytes_sent}
    if memory:
        gc.collect()
        _malloc_trim()
        dist.barrier(group)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        _step(fn, leaves)
        hwm = _status_kb("VmHWM")
        grads = sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None)
        out["peak"] = (hwm - base) * 1024 - grads
        _clear(leaves)
    return out


def _rank_main(rank, world, port, spec, queue):
    torch.set_num_threads(spec["threads"])
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=spec["timeout"]),
        )
        group = dist.group.WORLD
        rows = []
        for case in spec["cases"]:
            shape = tuple(spec["shapes"][case])
            leaves, peers, min_bytes, label = _BUILDERS[case](shape, rank, world, group)
            for name, fn in peers.items():
                try:
                    res = _measure(fn, leaves, spec["reps"], spec["warmup"], spec["memory"], group)
                    rows.append(dict(case=case, shape=label, peer=name, min_bytes=min_bytes, **res))
                except Exception as exc:  # noqa: BLE001 - one peer's failure is a row, not the end of the run
                    rows.append(dict(case=case, shape=label, peer=name, error=f"{type(exc).__name__}: {exc}"[:200]))
                    dist.barrier(group)
            del leaves, peers
            gc.collect()
        queue.put((rank, True, rows))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        queue.put((rank, False, traceback.format_exc()))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, spec: dict) -> list[list[dict]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    env_before = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # as bench.memory: RSS follows live tensors
    try:
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, spec, queue)) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        if env_before is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = env_before
    results, errors = {}, []
    for _ in range(world):
        r, ok, value = queue.get(timeout=spec["timeout"] * 4)
        (results.__setitem__(r, value) if ok else errors.append(f"rank {r}:\n{value}"))
    for p in procs:
        p.join(timeout=30)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]


# ----------------------------------------------------------------------------------------------------------------
# the table


def combine(by_rank: list[list[dict]]) -> list[dict]:
    """One row per (case, peer): the slowest rank's time per step (median over steps), the largest per-rank peak
    memory and bytes sent."""
    rows = []
    for i, first in enumerate(by_rank[0]):
        mine = [ranks[i] for ranks in by_rank]
        row = dict(case=first["case"], shape=first["shape"], peer=first["peer"])
        errors = [m["error"] for m in mine if "error" in m]
        if errors:
            row["error"] = errors[0]
        else:
            steps = [max(ts) for ts in zip(*(m["times"] for m in mine), strict=True)]
            row["ms"] = 1e3 * statistics.median(steps)
            row["bytes"] = max(m["bytes"] for m in mine)
            row["min_bytes"] = first["min_bytes"]
            if all("peak" in m for m in mine):
                row["peak"] = max(m["peak"] for m in mine)
        rows.append(row)
    for case in {r["case"] for r in rows}:
        timed = [r for r in rows if r["case"] == case and "ms" in r]
        if timed:
            best = min(r["ms"] for r in timed)
            for r in timed:
                r["ratio"] = r["ms"] / best
    return rows


def table(rows: list[dict], world: int, title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("case", "shape", "peer", "ms / step", "× fastest", "peak MiB / rank", "sent MiB / rank", "× min"):
        t.add_column(col, justify="left" if col in ("case", "shape", "peer") else "right")
    for r in rows:
        if "error" in r:
            t.add_row(r["case"], r["shape"], r["peer"], "failed", "", "", "", "")
            continue
        peak = f"{r['peak'] / 2**20:.1f}" if "peak" in r else "-"
        t.add_row(
            r["case"],
            r["shape"],
            r["peer"],
            f"{r['ms']:.1f}",
            f"{r['ratio']:.2f}",
            peak,
            f"{r['bytes'] / 2**20:.2f}",
            f"{r['bytes'] / r['min_bytes']:.2f}" if r["min_bytes"] else "-",
        )
    return t


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m infofuse bench --distributed",
        description="infofuse.distributed on W spawned CPU ranks (gloo): time per step, peak memory and bytes sent "
        "per rank beside the analytic minimum, beside the peers.",
    )
    p.add_argument("--world", type=int, default=2, help="number of ranks (default 2)")
    p.add_argument("--op", default=",".join(CASES), help=f"comma-separated cases (default {','.join(CASES)})")
    p.add_argument("--reps", type=int, default=5, help="timed steps per peer (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--quick", action="store_true", help="tiny shapes and 2 steps, for smoke tests")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default bench-out/)")
    for case in CASES:
        p.add_argument(f"--{case}-shape", default=None, help=f"{case} shape (default {_DEFAULT_SHAPES[case]})")
    return p


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from .environment import environment

    a = build_parser().parse_args(argv)
    cases = [c.strip() for c in a.op.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or a.world < 1:
        print(f"infofuse bench --distributed: error: unknown case(s) {unknown} or --world < 1", file=sys.stderr)
        return 2
    shapes = dict(_QUICK_SHAPES if a.quick else _DEFAULT_SHAPES)
    for case in CASES:
        given = getattr(a, f"{case}_shape")
        if given:
            shapes[case] = tuple(int(v) for v in given.replace("x", ",").split(","))
    spec = dict(
        cases=cases,
        shapes=shapes,
        reps=2 if a.quick else a.reps,
        warmup=a.warmup,
        threads=a.threads,
        memory=not a.no_memory,
        timeout=600,
    )
    env = environment("cpu")
    console = Console(width=150)
    console.print(
        f"infofuse.distributed on {a.world} gloo ranks × {a.threads} thread(s); {env.get('device_name', '')}; "
        f"torch {torch.__version__}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    )
    rows = combine(run_ranks(a.world, spec))
    console.print(table(rows, a.world, f"infofuse.distributed, world size {a.world}"))
    for r in rows:
        if "error" in r:
            console.print(f"{r['case']} / {r['peer']} failed: {r['error']}")
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "distributed.json", "a") as f:
        for r in rows:
            f.write(json.dumps(dict(r, world=a.world, env=env)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

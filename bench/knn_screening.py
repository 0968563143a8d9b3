"""CPU model of the Triton k-NN screening's tiers: how many queries each tier certifies, by data model.

The GPU search screens every query with TF32 distances, screens the queries its bound cannot certify again in
3×TF32, and searches the rest with the direct kernel (``infofuse._ops.knn``). Which tier a query ends in depends on
the data (the gap between its k-th and KP-th neighbour against the bound), not on the GPU, so it can be measured
here: the matrix unit's operands are modelled by truncating float32 to TF32 (10 mantissa bits; 3×TF32 as a TF32
part plus a TF32 remainder), the products summed in float32, on a sample of queries against all N candidates,
through the package's own centring, bound and certificate. The model's neighbours are checked against float64
brute force.

    python -m infofuse.bench.knn_screening [--queries 512] [--models gaussian,offset,cone,clusters] [--shapes N,d,k;…]
    python -m infofuse.bench.knn_screening --models gaussian --kp 8,16,32   # weigh other margins (KP per query)
    python -m infofuse.bench.knn_screening --gpu --kp 16,32                # and time them
    python -m infofuse.bench.knn_screening --gpu     # the real search's tiers and time on the GPU, same data
    python -m infofuse.bench.knn_screening --gpu --configs --models gaussian   # each kernel configuration timed
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

__all__ = ["MODELS", "config_label", "gpu_configs", "gpu_tiers", "tier_fractions"]


def _gaussian(n, d, g):
    return torch.randn(n, d, generator=g)


def _offset(n, d, g):  # a common offset of 3 standard deviations in every coordinate
    return torch.randn(n, d, generator=g) + 3.0


def _cone(n, d, g):  # unit embeddings sharing a direction: mean cosine about 0.5, as trained embeddings often have
    u = F.normalize(torch.randn(d, generator=g), dim=0)
    return F.normalize(u + torch.randn(n, d, generator=g) / d**0.5, dim=-1)


def _clusters(n, d, g):  # unit embeddings in 64 tight clusters: neighbours much closer than the norms
    centres = torch.randn(64, d, generator=g)
    return F.normalize(centres[torch.randint(64, (n,), generator=g)] + 0.15 * torch.randn(n, d, generator=g), dim=-1)


MODELS = {"gaussian": _gaussian, "offset": _offset, "cone": _cone, "clusters": _clusters}


def _tf32(v: torch.Tensor) -> torch.Tensor:
    return (v.view(torch.int32) & ~0x1FFF).view(torch.float32)


def _screen(a: torch.Tensor, b: torch.Tensor, na: torch.Tensor, nb: torch.Tensor, precision: str) -> torch.Tensor:
    """float32 ‖a‖² + ‖b‖² − 2·dot as the screening computes it, the dot in the precision's model."""
    a_big, b_big = _tf32(a), _tf32(b)
    if precision == "tf32":
        dot = a_big @ b_big.T
    else:
        a_small, b_small = _tf32(a - a_big), _tf32(b - b_big)
        dot = (a_small @ b_big.T + a_big @ b_small.T) + a_big @ b_big.T
    return na[:, None] + nb[None, :] - 2.0 * dot


def _tier(x, q_rows, k, kp, mu, nx, precision, exclude_self):
    """Model one screening tier for the queries x[q_rows]: their k best (exact float32 distances) and whether each
    is certified. With exclude_self False the query is a candidate and dropped after the search (tier 2)."""
    from infofuse._ops.knn import _certified, _rerank
    from infofuse.triton_kernels.knn import screen_error_bound

    centred = x if mu is None else x - mu
    s = _screen(centred[q_rows], centred, nx[q_rows].float(), nx.float(), precision)
    if exclude_self:
        s[torch.arange(len(q_rows)), q_rows] = float("inf")
    screened, cand = torch.topk(s, kp, dim=1, largest=False, sorted=True)
    cand = cand.masked_fill(cand == q_rows[:, None], -1)  # the query itself: no candidate (tier 2)
    dist = _rerank(x[q_rows][None], x[None], cand[None], k, 0)[0][0]  # the package's exact re-ranking
    bound = screen_error_bound(nx[q_rows][None], nx[None], x.shape[1], precision)[0]
    return dist, _certified(dist, screened, bound, k)


def tier_fractions(
    x: torch.Tensor, k: int, queries: int, seed: int = 0, chunk: int = 128, kp: int | None = None
) -> dict:
    """Fractions of sampled queries certified by TF32, by 3×TF32, and left to the direct kernel (x against itself),
    and how many certified queries differ from float64 brute force (``wrong``: must be 0). ``kp``: the candidates
    kept per query in both tiers instead of the package's (``screen_slots``), to weigh other margins. ``first``:
    the tier the search's probe would start a large search in, from the TF32 share (the shares are those of a
    search started in TF32)."""
    from infofuse._ops.knn import PROBE_MIN_SHARE, SCREEN_TIERS
    from infofuse.triton_kernels.knn import screen_centre, screen_slots

    n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    sample = torch.randperm(n, generator=g)[:queries]
    mu, nx = screen_centre(x[None])
    mu = None if mu is None else mu[0]
    nx = nx[0]
    kp, kp2 = (screen_slots(k), screen_slots(k + 1)) if kp is None else (kp, kp)  # tier 2: one more (the query)
    counts = {"tf32": 0, "tf32x3": 0, "direct": 0, "wrong": 0}
    for r0 in range(0, len(sample), chunk):
        rows = sample[r0 : r0 + chunk]
        dist, done = _tier(x, rows, k, kp, mu, nx, "tf32", True)
        counts["tf32"] += int(done.sum())
        again = ~done
        if again.any():
            dist[again], ok2 = _tier(x, rows[again], k, kp2, mu, nx, "tf32x3", False)
            counts["tf32x3"] += int(ok2.sum())
            counts["direct"] += int((~ok2).sum())
            done[again] = ok2
        full = torch.cdist(x[rows].double(), x.double())
        full[torch.arange(len(rows)), rows] = float("inf")
        want = torch.topk(full, k, dim=1, largest=False).values[done]
        counts["wrong"] += int(((dist[done].double() - want).abs() > 1e-5 * want).any(dim=1).sum())
    wrong = counts.pop("wrong")
    shares = {key: value / len(sample) for key, value in counts.items()}
    first = SCREEN_TIERS[0] if shares["tf32"] >= PROBE_MIN_SHARE else SCREEN_TIERS[1]  # as the search's probe decides
    return {"centred": mu is not None, "kp": kp, "wrong": wrong, "first": first} | shares


def gpu_tiers(x: torch.Tensor, k: int, kp: int | None = None) -> dict:
    """The real search on the GPU (``impl="triton"``): the tiers its queries ended in, and its time after a first
    call that compiles and autotunes. ``kp``: keep that many candidates per query in every tier instead of the
    package's choice (``screen_slots``, replaced for the call), to time other margins."""
    import infofuse
    import infofuse.triton_kernels.knn as tk
    from infofuse._ops.knn import last_search_tiers

    x = x.cuda()
    chosen = tk.screen_slots
    if kp is not None:
        tk.screen_slots = lambda _k: kp
    try:
        used = tk.screen_slots(k)
        search = partial(infofuse.knn, x, k=k, impl="triton")
        search()  # compiles, autotunes
        ms = tk.elapsed_ms(search)
    finally:
        tk.screen_slots = chosen
    n = last_search_tiers["queries"]
    again, direct = last_search_tiers["tf32x3"], last_search_tiers["direct"]
    return {
        "centred": tk.screen_centre(x[None])[0] is not None,
        "kp": used,
        "wrong": 0,
        "tf32": (n - again) / n,
        "tf32x3": (again - direct) / n,
        "direct": direct / n,
        "first": last_search_tiers["first"],
        "ms": ms,
    }


def config_label(config) -> str:
    kw = config.kwargs
    return f"{kw['BLOCK_Q']}x{kw['BLOCK_C']}, {config.num_warps} warps{', prefetch' if kw['PREFETCH'] else ''}"


def gpu_configs(x: torch.Tensor, k: int) -> list[dict]:
    """The screening of every query of x against itself (``knn_candidates``: norms, centring, kernel) in each
    precision, once with each GPU configuration of the kernel and once autotuned (the search's way); each timed on
    its second run. The autotuned row names the configuration the autotuner chose."""
    import infofuse.triton_kernels.knn as tk

    x = x.cuda()[None]
    kp = tk.screen_slots(k)
    rows = []
    for precision in tk.SCREEN_PRECISIONS:
        for config in [*tk.screen_configs(kp), None]:
            run = partial(tk.knn_candidates, x, x, k, 0, True, precision=precision, config=config)
            run()  # compiles (autotunes)
            ms = tk.elapsed_ms(run)
            if config is None:
                chosen = getattr(tk._knn_screen_tuned, "best_config", None) if kp <= 32 else tk._SCREEN_LARGE_KP
                label = f"autotuned: {config_label(chosen) if chosen else '?'}"
            else:
                label = config_label(config)
            rows.append({"precision": precision, "config": label, "ms": ms})
    return rows


def main(argv=None) -> None:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=512)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--shapes", default="1048576,128,10;1048576,16,3", help="N,d,k;…")
    p.add_argument("--gpu", action="store_true", help="run the real search on the GPU instead of the model")
    p.add_argument(
        "--kp",
        default="",
        help="keep these candidates per query (comma-separated, each above k + 1) "
        "instead of the package's choice, in the model or, with --gpu, in the real search",
    )
    p.add_argument(
        "--configs",
        action="store_true",
        help="with --gpu: time the screening kernel in each of its configurations instead",
    )
    args = p.parse_args(argv)
    if args.configs:
        _print_configs(args)
        return
    kps = [int(v) for v in args.kp.split(",") if v] or [None]
    what = "the Triton search on " + torch.cuda.get_device_name() if args.gpu else f"CPU model, {args.queries} queries"
    table = Table(title=f"Triton k-NN screening tiers ({what}, x against itself)")
    cols = ["data", "N", "d", "k", "KP", "centred", "first tier", "TF32 certifies", "3×TF32 certifies", "direct kernel"]
    for col in [*cols, "search ms" if args.gpu else "s"]:
        table.add_column(col, justify="left" if col == "data" else "right")
    console = Console(width=150)
    for shape in args.shapes.split(";"):
        n, d, k = (int(v) for v in shape.split(","))
        for name in args.models.split(","):
            x = MODELS[name](n, d, torch.Generator().manual_seed(1)).float().contiguous()
            for kp in kps:
                if kp is not None and kp <= k + 1:
                    continue
                t0 = time.time()
                f = gpu_tiers(x, k, kp) if args.gpu else tier_fractions(x, k, args.queries, kp=kp)
                if f["wrong"]:
                    raise AssertionError(f"{name} {shape}: {f['wrong']} certified queries differ from brute force")
                shares = [f"{f[tier]:.1%}" for tier in ("tf32", "tf32x3", "direct")]
                centred = "yes" if f["centred"] else "no"
                last = f"{f['ms']:.0f}" if args.gpu else f"{time.time() - t0:.0f}"
                table.add_row(name, str(n), str(d), str(k), str(f["kp"] or "-"), centred, f["first"], *shares, last)
                console.log(f"{name} {shape} done: {f}")
    console.print(table)


def _print_configs(args) -> None:
    from rich.console import Console
    from rich.table import Table

    if not args.gpu:
        raise SystemExit("--configs times the GPU kernel: it needs --gpu")
    table = Table(
        title=f"Triton k-NN screening by kernel configuration ({torch.cuda.get_device_name()}, x against "
        "itself, all queries)"
    )
    for col in ("data", "N", "d", "k", "precision", "configuration", "ms"):
        table.add_column(col, justify="left" if col in ("data", "configuration") else "right")
    console = Console(width=150)
    for shape in args.shapes.split(";"):
        n, d, k = (int(v) for v in shape.split(","))
        for name in args.models.split(","):
            x = MODELS[name](n, d, torch.Generator().manual_seed(1)).float().contiguous()
            for row in gpu_configs(x, k):
                console.log(f"{name} {shape}: {row}")
                table.add_row(name, str(n), str(d), str(k), row["precision"], row["config"], f"{row['ms']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()

"""Benchmark case: the Kozachenko–Leonenko entropy estimate (``knn_entropy``) of x (N, d) against itself, k-th
neighbour, each point excluded from its own neighbours; input "models" are the metric: ``euclidean`` or
``chebyshev`` (the max-norm KSG needs).

Every peer computes the same estimate and its gradient; they differ in the neighbour search: infofuse's kernels,
chunked ``torch.cdist`` + ``topk`` (4096 queries a chunk), scikit-learn's ``NearestNeighbors`` (its best
algorithm for the metric), NPEET's max-norm tree (Chebyshev, npeet-plus when installed), faiss ``IndexFlatL2``
(Euclidean, when installed). The estimate and its gradient are
then the same O(N·d) PyTorch (``infofuse.knn``'s distance recomputation), so the table compares searches. The
ground truth: float64 brute force by chunks.
"""

from __future__ import annotations

import importlib

import torch

from .case import Case, Inputs, Peer
from .floor import GemmFloor

__all__ = ["CASE", "KnnEntropyCase"]

CHUNK = 4096


def _estimate(x: torch.Tensor, idx: torch.Tensor, k: int, metric: str) -> torch.Tensor:
    """KL entropy from the k-th neighbour indices (N,), differentiable in x."""
    from infofuse.knn import _log_unit_ball, _psi

    diff = (x - x[idx]).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    eps = diff.abs().amax(-1) if metric == "chebyshev" else torch.linalg.vector_norm(diff, dim=-1)
    n, d = x.shape
    return _psi(n) - _psi(k) + _log_unit_ball(d, metric) + d * torch.log(eps).mean().double()


def _kth_other(idx: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th neighbour other than the point itself, from k + 1 neighbours (N, k + 1) of x against itself: column 0
    is the point itself unless duplicates tie with it."""
    own = idx == torch.arange(len(idx), device=idx.device)[:, None]
    return torch.where(own[:, :k].any(1), idx[:, k], idx[:, k - 1])


def _chunked_search(x: torch.Tensor, k: int, metric: str) -> torch.Tensor:
    p = float("inf") if metric == "chebyshev" else 2.0
    out = []
    for r0 in range(0, x.shape[0], CHUNK):
        dist = torch.cdist(x[r0 : r0 + CHUNK], x, p=p)
        rows = torch.arange(dist.shape[0], device=x.device)
        dist[rows, rows + r0] = float("inf")
        out.append(torch.topk(dist, k, dim=1, largest=False).indices[:, k - 1])
    return torch.cat(out)


class KnnEntropyCase(Case):
    op = "knn_entropy"
    dims = ("N", "d", "k")
    models = ("euclidean", "chebyshev")
    default_models = ("euclidean", "chebyshev")
    grad_labels = ("dX",)
    time_baseline = "torch-chunked"
    memory_baseline = "torch-chunked"
    quick_shape = (2000, 8, 3)
    probe_shape = (64, 4, 2)
    params = {"estimator": "Kozachenko-Leonenko"}

    def default_shapes(self, device: str) -> list[tuple[int, ...]]:
        if device.startswith("cuda"):
            return [(1 << 20, 128, 10), (1 << 20, 16, 3)]
        return [(20000, 16, 3)]  # the CPU target is 100000,16,3 (bench/NOTES.md has that run)

    def make_inputs(self, shape, model, dtype, device, seed) -> Inputs:
        n, d, k = shape
        gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(n, d, device=device, generator=gen).to(dtype).requires_grad_()
        return Inputs(args=(x, k, model), leaves=(x,))

    def floor_gemms(self, shape, model) -> GemmFloor | None:
        if model != "euclidean":
            return None  # the max-norm has no GEMM form
        n, d, _ = shape
        return GemmFloor(
            (n, n, d),
            fwd=1,
            both=1,  # the backward is O(N·d)
            what="brute force's distance GEMM 2·N²·d; a tree search skips pairs and is not bounded by it",
        )

    def reference(self, inputs: Inputs, dtype: torch.dtype) -> tuple[float, list[torch.Tensor]]:
        x, k, metric = inputs.args
        xr = x.detach().to(dtype).requires_grad_()
        h = _estimate(xr, _chunked_search(xr.detach(), k, metric), k, metric)
        h.backward()
        return h.item(), [xr.grad]

    def peers(self, device: str, dtype: torch.dtype) -> list[Peer]:
        import infofuse

        peers = [Peer("infofuse", lambda: lambda x, k, m: infofuse.knn_entropy(x, k, metric=m), note="impl=None")]
        if device.startswith("cuda"):
            for impl in ("triton", "cuda"):
                peers.append(
                    Peer(
                        f"infofuse-{impl}",
                        lambda impl=impl: lambda x, k, m: infofuse.knn_entropy(x, k, metric=m, impl=impl),
                        note=f"impl={impl!r}",
                    )
                )

        def chunked():
            return lambda x, k, m: _estimate(x, _chunked_search(x.detach(), k, m), k, m)

        peers.append(Peer("torch-chunked", chunked, note=f"cdist + topk, {CHUNK} queries a chunk"))
        peers.append(_sklearn_peer(device))
        peers.append(_npeet_peer(device))
        peers.append(_faiss_peer(device))
        return peers


def _cpu_library(name: str, module: str, device: str, gpu_note: str = ""):
    """(module, None) for a CPU peer's library, imported, where the peer can run; else (None, the skipped Peer)."""
    if device != "cpu":
        return None, Peer(name, None, skip=f"CPU only{gpu_note}")
    try:
        return importlib.import_module(module), None
    except Exception as exc:
        return None, Peer(name, None, skip=f"not installed ({type(exc).__name__})")


def _sklearn_peer(device: str) -> Peer:
    neighbors, skipped = _cpu_library("sklearn", "sklearn.neighbors", device)
    if skipped:
        return skipped

    def build():
        def fn(x, k, metric):
            data = x.detach().double().numpy()
            # n_jobs=-1: its queries on every core, as infofuse and faiss use them (1 job before 2026-12-07)
            nn = neighbors.NearestNeighbors(n_neighbors=k + 1, metric=metric, n_jobs=-1).fit(data)
            _, ind = nn.kneighbors(data)
            return _estimate(x, _kth_other(torch.from_numpy(ind), k), k, metric)

        return fn

    return Peer("sklearn", build, note="NearestNeighbors(n_neighbors=k + 1, metric=..., n_jobs=-1).kneighbors")


def _npeet_peer(device: str) -> Peer:
    estimators, skipped = _cpu_library("npeet", "npeet_plus.estimators", device)
    if skipped:
        return skipped

    def build():
        def fn(x, k, metric):
            # NPEET's entropy() search: its tie-breaking noise, its max-norm tree, k + 1 neighbours (self first);
            # asked for the indices too, so that the same estimate and gradient follow
            data = estimators.add_noise(x.detach().double().numpy())
            _, ind = estimators.build_tree(data).query(data, k=k + 1)
            return _estimate(x, _kth_other(torch.from_numpy(ind), k), k, metric)

        return fn

    return Peer(
        "npeet",
        build,
        models=("chebyshev",),
        note="npeet-plus: add_noise + build_tree + query (its "
        "entropy()'s search; NPEET's estimators use the max-norm only)",
    )


def _faiss_peer(device: str) -> Peer:
    # faiss-gpu cannot be carried to the GPU machine (shared/PEERS.md); faiss-cpu there is no GPU peer
    faiss, skipped = _cpu_library("faiss", "faiss", device, " (faiss-gpu is not available on the GPU machine)")
    if skipped:
        return skipped

    def build():
        faiss.cvar.distance_compute_blas_threshold = 1

        def fn(x, k, metric):
            data = x.detach().float().cpu().numpy()
            index = faiss.IndexFlatL2(data.shape[1])
            index.add(data)
            _, ind = index.search(data, k + 1)
            return _estimate(x, _kth_other(torch.from_numpy(ind).to(x.device), k), k, metric)

        return fn

    return Peer("faiss", build, models=("euclidean",), note="IndexFlatL2 exact search (BLAS threshold 1)")


CASE = KnnEntropyCase()

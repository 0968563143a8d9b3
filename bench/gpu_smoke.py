"""Every GPU kernel once, forward and backward, at small odd shapes: the program that compute-sanitizer runs.

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m infofuse.bench.gpu_smoke
    compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m infofuse.bench.gpu_smoke --only knn-cuda

Prints one line per kernel family; results are checked by the GPU tests, not here (this is for the sanitizer).
"""

from __future__ import annotations

import argparse

import torch


def _lce():
    from infofuse import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(252, 123, device="cuda", generator=g).to(dtype).requires_grad_()
        w = (torch.randn(507, 123, device="cuda", generator=g) / 4).to(dtype).requires_grad_()
        b = torch.randn(507, device="cuda", generator=g).to(dtype).requires_grad_()
        t = torch.randint(0, 507, (252,), device="cuda", generator=g)
        t[::7] = -100
        for impl in ("chunked", "fused"):
            loss = linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1, impl=impl, chunk_size=100)
            loss.backward()
    print("linear_cross_entropy: chunked, fused", flush=True)


def _info_nce():
    from infofuse import clip_loss, siglip_loss, supcon_loss

    g = torch.Generator(device="cuda").manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(67, 37, device="cuda", generator=g).to(dtype).requires_grad_()
        k = torch.randn(67, 37, device="cuda", generator=g).to(dtype).requires_grad_()
        s = torch.tensor(3.0, device="cuda", requires_grad=True)
        labels = torch.randint(0, 5, (67,), device="cuda", generator=g)
        for impl in ("chunked", "fused"):
            clip_loss(q, k, s, impl=impl).backward()
            supcon_loss(q, labels, 0.3, impl=impl).backward()
            siglip_loss(q, k, s, torch.tensor(-2.0, device="cuda"), impl=impl).backward()
    print("info_nce: chunked, fused", flush=True)


def _knn(impls):
    from infofuse import knn, knn_entropy, ksg_mutual_information

    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(1013, 37, device="cuda", generator=g)
    y = torch.randn(2027, 37, device="cuda", generator=g)
    z = torch.randn(3000, 2, device="cuda", generator=g, dtype=torch.float64)
    for impl in impls:
        for metric in ("euclidean", "chebyshev", "cosine"):
            for k in (1, 17, 64):
                knn(x, k=k, metric=metric, impl=impl)
                knn(x, y, k=k, metric=metric, impl=impl)
        knn(x.double(), k=5, impl=impl)
        xs = x[:500, :8].clone().requires_grad_()
        knn_entropy(xs, k=3, impl=impl).backward()
        ksg_mutual_information(z[:, 0], z[:, 1], k=3, impl=impl)
    print(f"knn: {', '.join(impls)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("lce", "info_nce", "knn", "knn-cuda"), default=None)
    a = p.parse_args()
    from infofuse._ops.knn import cuda_kernels_built

    knn_impls = ["triton", "cuda"] if cuda_kernels_built() else ["triton"]
    if a.only in (None, "lce"):
        _lce()
    if a.only in (None, "info_nce"):
        _info_nce()
    if a.only in (None, "knn"):
        _knn(knn_impls)
    if a.only == "knn-cuda":
        _knn(["cuda"])
    torch.cuda.synchronize()
    print("smoke: done", flush=True)


if __name__ == "__main__":
    main()

"""Numerical model of the GPU strategies' bf16 arithmetic, run on the CPU: what accuracy each design choice costs.

    python -m infofuse.bench.lce_accuracy [--shape N,D,V] [--dtype bfloat16]

Not a benchmark of our kernels: it replays, in float32/float64 with explicit rounding to the low-precision dtype,
the arithmetic a GPU does (a GEMM accumulates in float32 and rounds its output once), on the two logit models of
the benchmark, and reports errors against float64 relative to the ``torch.compile``-like path (bf16 logits, one
GEMM per gradient). Two questions:

1. Chunked strategy: summing ``grad_weight`` across k row chunks in the weight's dtype (one rounding per chunk,
   what cuBLAS's ``beta = 1`` gives) against a float32 accumulator rounded once.
2. Fused strategy: skipping tiles (64 × 128) whose softmax entries are all below ε (and hold no target): the
   fraction skipped, and the error that adds to dW — and to dX, were dX filtered too.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from .linear_cross_entropy import make_inputs

TILE_N, TILE_V = 64, 128


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(t.dtype)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def _grad(x32, w32, t, r0, r1, n, dtype, bf16_logits=True):
    z = x32[r0:r1] @ w32.T
    if bf16_logits:
        z = _rounded(z, dtype)
    g = torch.softmax(z, 1)
    g[torch.arange(r1 - r0), t[r0:r1]] -= 1.0
    return _rounded(g / n, dtype)


def chunk_table(x, w, t, dtype, chunks=(2, 4, 8, 16)):
    """grad_weight summed over k chunks in float32 or in ``dtype``; errors relative to the compile-like path."""
    n = x.shape[0]
    x64, w64 = x.double(), w.double()
    g = torch.softmax(x64 @ w64.T, 1)
    g[torch.arange(n), t] -= 1.0
    g /= n
    dw_true = g.T @ x64
    x32, w32 = x.float(), w.float()
    compile_err = _err(_rounded(_grad(x32, w32, t, 0, n, n, dtype).T @ x32, dtype), dw_true)
    rows = [("1 (compile-like)", compile_err, 1.0, compile_err, 1.0)]
    for k in chunks:
        step = -(-n // k)
        acc32 = torch.zeros_like(w32)
        acc_lo = torch.zeros_like(w32)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            part = _grad(x32, w32, t, r0, r1, n, dtype).T @ x32[r0:r1]
            acc32 += part
            acc_lo = _rounded(acc_lo + part, dtype)
        e32, elo = _err(_rounded(acc32, dtype), dw_true), _err(acc_lo, dw_true)
        rows.append((str(k), e32, e32 / compile_err, elo, elo / compile_err))
    return rows


def filter_table(x, w, t, dtype, exponents=(8, 10, 12, 14, 16)):
    """Tiles skipped by max_ij p_ij <= 2^-e and the error that alone adds to dW and to dX (float64)."""
    n, v = x.shape[0], w.shape[0]
    x64, w64 = x.double(), w.double()
    p = torch.softmax(x64 @ w64.T, 1)
    g = p.clone()
    g[torch.arange(n), t] -= 1.0
    g /= n
    dx_true, dw_true = g @ w64, g.T @ x64
    x32, w32 = x.float(), w.float()
    gc = _grad(x32, w32, t, 0, n, n, dtype)
    cx = _err(_rounded(gc @ w32, dtype), dx_true)
    cw = _err(_rounded(gc.T @ x32, dtype), dw_true)
    nt, vt = n // TILE_N, v // TILE_V
    p_tiles = p[: nt * TILE_N, : vt * TILE_V].reshape(nt, TILE_N, vt, TILE_V).amax(dim=(1, 3))
    has_target = torch.zeros(nt, vt, dtype=torch.bool)
    keep = t[: nt * TILE_N] < vt * TILE_V
    has_target[(torch.arange(nt * TILE_N) // TILE_N)[keep], t[: nt * TILE_N][keep] // TILE_V] = True
    rows = []
    for e in exponents:
        skip = (p_tiles <= 2.0**-e) & ~has_target
        mask = torch.zeros(n, v, dtype=torch.bool)
        mask[: nt * TILE_N, : vt * TILE_V] = skip.repeat_interleave(TILE_N, 0).repeat_interleave(TILE_V, 1)
        gf = g.masked_fill(mask, 0.0)
        ew, ex = _err(gf.T @ x64, dw_true), _err(gf @ w64, dx_true)
        rows.append((f"2^-{e}", skip.double().mean().item(), ew, ew / cw, ex, ex / cx))
    return rows, cx, cw


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m infofuse.bench.lce_accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="4096,256,32768", help="N,D,V (default 4096,256,32768)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    console = Console()
    console.print(f"torch {torch.__version__}; shape N,D,V = {shape}; {args.dtype}; float64 truth; CPU model")
    for model in ("gaussian", "lm"):
        x, w, t = make_inputs(shape, model, dtype, "cpu", args.seed)
        table = Table(title=f"{model}: grad_weight summed over k row chunks")
        for col in ("chunks k", "fp32 acc: err", "× compile", f"{args.dtype} acc: err", "× compile"):
            table.add_column(col, justify="right")
        for row in chunk_table(x, w, t, dtype):
            table.add_row(row[0], *(f"{v:.3e}" if i % 2 == 0 else f"{v:.2f}" for i, v in enumerate(row[1:])))
        console.print(table)
        rows, cx, cw = filter_table(x, w, t, dtype)
        table = Table(title=f"{model}: tile filter (compile-like errors dX {cx:.3e}, dW {cw:.3e})")
        for col in ("ε", "tiles skipped", "dW err added", "× compile dW", "dX err (if filtered)", "× compile dX"):
            table.add_column(col, justify="right")
        for eps, frac, ew, rw, ex, rx in rows:
            table.add_row(eps, f"{frac:.1%}", f"{ew:.2e}", f"{rw:.3f}", f"{ex:.2e}", f"{rx:.3f}")
        console.print(table)


if __name__ == "__main__":
    main()

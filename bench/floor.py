"""The GEMM floor: an op's least matrix-multiply work divided by this machine's GEMM rate, measured in the same process.

Each case names one of its GEMMs, (m, n, k) = 2·m·n·k FLOPs, and how many of them its forward pass and its forward +
backward pass need at least (``Case.floor_gemms``): linear cross-entropy 1 and 3 of (N, V, D), the symmetric CLIP
loss 1 and 3 of (N, M, D), brute-force k-NN 1 and 1 of (N, N, d) (its backward is O(N·d)). The rate is
``torch.mm(a, b.t())`` in the configuration's dtype on its device, with the thread count the peers run with, at the
op's own k and at most 2048 × 8192 of its m × n (a 64 MiB float32 output: the op's GEMMs come in chunks of about
that size), best of ``GEMM_RUNS`` runs after one warm-up (more where they are short), measured right before the
peers are timed and again right after; the floor uses the better of the two. A peer's ratio is its median time ÷
the floor of the same phase.

The ratio is partly self-normalising on a loaded machine: the GEMM rate is measured beside the same other processes
as the peers, so a machine slowed uniformly slows both. It is not wholly so: load changes between the two
measurements and during the timing, and the best of a few short GEMMs catches quiet moments more easily than a
whole step of several seconds does. So each timed step is also paired with one GEMM run right before it
(``GemmProbe``), and the "paired" ratio is the median over the steps of step time ÷ the floor at that GEMM's rate:
the closest this process can come to timing the peer and the machine under the same load.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

__all__ = [
    "GEMM_RUNS",
    "GemmFloor",
    "GemmProbe",
    "paired_fields",
    "add_floor_ratios",
    "floor_fields",
    "gemm_flops",
    "measure_gemm_rate",
    "rate_shape",
]

GEMM_RUNS = 5
MIN_SECONDS, MAX_RUNS = 0.2, 1000  # short GEMMs: more runs, so that one quiet moment is caught
MAX_M, MAX_N = 2048, 8192  # the measured GEMM's largest output block


@dataclass(frozen=True)
class GemmFloor:
    """``fwd`` and ``both`` GEMMs of shape ``gemm`` = (m, n, k) bound the forward and the forward + backward pass."""

    gemm: tuple[int, int, int]
    fwd: int
    both: int
    what: str = ""  # how the count comes about, for the table's caption

    def flops(self, phase: str) -> int:
        return getattr(self, phase) * gemm_flops(*self.gemm)


def gemm_flops(m: int, n: int, k: int) -> int:
    """Multiply-adds counted as two FLOPs: an (m, k) by (k, n) product is 2·m·n·k."""
    return 2 * m * n * k


def rate_shape(m: int, n: int, k: int) -> tuple[int, int, int]:
    """The shape whose rate is measured for an op GEMM of shape (m, n, k): the same k, at most MAX_M × MAX_N."""
    return min(m, MAX_M), min(n, MAX_N), k


def measure_gemm_rate(
    shape: tuple[int, int, int], dtype: torch.dtype, device: str, runs: int = GEMM_RUNS, seed: int = 0
) -> float:
    """GFLOP/s of ``torch.mm(a, b.t(), out=c)`` with a (m, k) and b (n, k): the best of ``runs`` runs after one
    warm-up, or of as many as fit in ``MIN_SECONDS`` where they are short (at most ``MAX_RUNS``)."""
    m, n, k = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(m, k, device=device, generator=gen).to(dtype)
    b = torch.randn(n, k, device=device, generator=gen).to(dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)
    on_gpu = device.startswith("cuda")
    best = float("inf")
    start = time.perf_counter()
    i = 0
    while i <= runs or (time.perf_counter() - start < MIN_SECONDS and i <= MAX_RUNS):
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b.t(), out=c)
        if on_gpu:
            torch.cuda.synchronize()
        if i > 0:
            best = min(best, time.perf_counter() - t0)
        i += 1
    return gemm_flops(m, n, k) / best / 1e9


class GemmProbe:
    """One run of the measured GEMM, called right before each timed step: the machine's rate beside that step."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, device: str, seed: int = 0):
        m, n, k = shape
        gen = torch.Generator(device=device).manual_seed(seed)
        self.a = torch.randn(m, k, device=device, generator=gen).to(dtype)
        self.b = torch.randn(n, k, device=device, generator=gen).to(dtype)
        self.c = torch.empty(m, n, device=device, dtype=dtype)
        self.flops = gemm_flops(m, n, k)
        self.on_gpu = device.startswith("cuda")

    def __call__(self) -> float:
        """GFLOP/s of one run."""
        if self.on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(self.a, self.b.t(), out=self.c)
        if self.on_gpu:
            torch.cuda.synchronize()
        return self.flops / (time.perf_counter() - t0) / 1e9


def paired_fields(floor: GemmFloor | None, samples: dict) -> dict:
    """From one peer's samples (``fwd``, ``both`` in ms and ``gemm``, the GFLOP/s of the probe run before each step):
    the median probe rate and the median over the steps of step time ÷ the floor at that step's rate."""
    rates = samples.get("gemm") or []
    if floor is None or not rates:
        return {"gemm_gflops_paired": None, "fwd_floor_ratio_paired": None, "both_floor_ratio_paired": None}
    out = {"gemm_gflops_paired": statistics.median(rates)}
    for phase in ("fwd", "both"):
        # t ms at r GFLOP/s is t·r·1e6 FLOPs' worth of GEMM time
        out[f"{phase}_floor_ratio_paired"] = statistics.median(
            t * r * 1e6 / floor.flops(phase) for t, r in zip(samples[phase], rates, strict=True)
        )
    return out


def floor_fields(floor: GemmFloor | None, rates: tuple[float, float] | None) -> dict:
    """The row fields of a configuration's floor: the measured rates (before and after the timing, and the better
    one) and, per phase, the FLOPs and the floor time in ms. All None where the op has no GEMM floor."""
    if floor is None or rates is None:
        return {"gemm_gflops": None, "floor_ms_fwd": None, "floor_ms_both": None}
    rate = max(rates)
    return {
        "gemm_gflops": rate,
        "gemm_gflops_before": rates[0],
        "gemm_gflops_after": rates[1],
        "gemm_rate_shape": list(rate_shape(*floor.gemm)),
        "floor_gemm": list(floor.gemm),
        "floor_gemms": {"fwd": floor.fwd, "both": floor.both},
        "floor_flops_fwd": floor.flops("fwd"),
        "floor_flops_both": floor.flops("both"),
        "floor_ms_fwd": floor.flops("fwd") / (rate * 1e9) * 1e3,
        "floor_ms_both": floor.flops("both") / (rate * 1e9) * 1e3,
    }


def add_floor_ratios(rows: list[dict]) -> None:
    """Each row's median forward and forward + backward time ÷ the floor of that phase (None without a floor)."""
    for r in rows:
        for phase in ("fwd", "both"):
            t, f = r.get(f"{phase}_ms"), r.get(f"floor_ms_{phase}")
            r[f"{phase}_floor_ratio"] = t["median"] / f if t and f else None

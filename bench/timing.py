"""Time: one step at a time, every peer in turn, summarised by median and 20/80 % quantiles.

Each iteration runs ``loss = fn(*args)`` and ``loss.backward()`` and times the two phases separately
(``time.perf_counter`` on CPU; CUDA events, with the L2 cache flushed before each iteration, on GPU). Peers take turns
within every repetition, in an order rotated from one repetition to the next, so that none of them gets a
systematically warmer (or hotter) machine. Reported: median and 20/80 % quantiles of forward, backward and their
per-iteration sum ("both") over ``reps`` iterations after ``warmup`` ones. Gradients are set to None before every
iteration. ``OtherCpu`` records how much of the CPUs other processes took meanwhile.
"""

from __future__ import annotations

import math
import os
import time

import torch

from .accuracy import errors
from .case import Inputs, Options, first_line

__all__ = ["CpuTimer", "CudaTimer", "OtherCpu", "clear_grads", "quantile", "summary", "time_round_robin"]


def clear_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


class CpuTimer:
    def step(self, fn, inputs: Inputs) -> tuple[torch.Tensor, float, float]:
        t0 = time.perf_counter()
        loss = fn(*inputs.args)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        return loss, (t1 - t0) * 1e3, (t2 - t1) * 1e3


class CudaTimer:
    def __init__(self, device: str):
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        # written before every step so that no peer finds its operands in L2 (as triton's do_bench does)
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def step(self, fn, inputs: Inputs) -> tuple[torch.Tensor, float, float]:
        start, mid, end = self.events
        self.flush.zero_()
        start.record()
        loss = fn(*inputs.args)
        mid.record()
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        return loss, start.elapsed_time(mid), mid.elapsed_time(end)


class OtherCpu:
    """The share of the machine's CPUs that other processes (or the hypervisor, as steal time) used while we were
    timing: CPU timings taken beside other work are not worth much, so every row records it."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[int, int, float] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                mine = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            return None
        busy = sum(v[:8]) - v[3] - v[4]  # all but idle and iowait; steal counts as taken from us
        return busy, int(mine[11]) + int(mine[12]), time.perf_counter()

    def fraction(self) -> float | None:
        end = self._read()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        others = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(others, 0) / self.hz / (end[2] - self.start[2]) / (os.cpu_count() or 1)


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": quantile(values, 0.5), "p20": quantile(values, 0.2), "p80": quantile(values, 0.8)}


def time_round_robin(
    fns: dict, inputs: Inputs, opts: Options, ref, labels, advance, probe=None
) -> tuple[dict, dict, dict]:
    """Times every peer ``warmup + reps`` times, taking turns. Returns (samples, accuracy, failures).

    ``probe``, if given, runs right before each timed step and its result (the GEMM rate then, see ``floor``) is kept
    beside the step's times as ``samples[peer]["gemm"]``."""
    timer = CudaTimer(opts.device) if opts.device.startswith("cuda") else CpuTimer()
    names = list(fns)
    samples = {n: {"fwd": [], "bwd": [], "both": [], "gemm": []} for n in names}
    accuracy: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for rep in range(opts.warmup + opts.reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            if name not in failed:
                clear_grads(inputs.leaves)
                rate = probe() if probe is not None and rep >= opts.warmup else None
                try:
                    loss, fwd, bwd = timer.step(fns[name], inputs)
                except Exception as exc:  # a peer that breaks at this shape is reported, not fatal
                    failed[name] = first_line(exc)
                    clear_grads(inputs.leaves)
                    advance()
                    continue
                if rep == 0:  # accuracy from the first call, outside the timed region
                    accuracy[name] = errors(loss, inputs.leaves, ref, labels)
                if rep >= opts.warmup:
                    samples[name]["fwd"].append(fwd)
                    samples[name]["bwd"].append(bwd)
                    samples[name]["both"].append(fwd + bwd)
                    if rate is not None:
                        samples[name]["gemm"].append(rate)
                del loss
                clear_grads(inputs.leaves)
                advance(f"  {name}: {'warm-up' if rep < opts.warmup else 'rep'} {rep + 1}, {fwd + bwd:.1f} ms")
                continue
            advance()
    return samples, accuracy, failed

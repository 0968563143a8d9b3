"""Benchmark case: linear KL distillation, forward KL(P‖Q) between a teacher head (P) and a student head (Q).

Eager: ``F.kl_div(log_softmax(F.linear(x_s, w_s).float()), log_softmax(F.linear(x_t, w_t).float()),
log_target=True, reduction="batchmean")``, the teacher frozen. Both heads share D here (an 8B-style pair), so the
floor is a whole number of (N, V, D) GEMMs: 2 in forward (both heads' logits), 4 with the backward (dX_s, dW_s;
the frozen teacher takes none). Inputs follow the ``gaussian`` logit model of the linear cross-entropy case (iid
logits of standard deviation 4) for each head, independently.

Peers: infofuse (its default impl), PyTorch eager, ``torch.compile`` of eager, and a hand-chunked eager loop: rows
in chunks of ``CHUNK_ROWS``, each chunk's loss under ``torch.utils.checkpoint`` so that only one chunk's logits exist
at a time in forward and in backward (how TRL and verl chunk such losses by hand); Liger's fused linear JSD on GPU
when installed. The ground truth is infofuse's plain reference in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .case import Case, Inputs, Peer
from .floor import GemmFloor

__all__ = ["CASE", "LinearKLDivergenceCase"]

LOGIT_STD = 4.0
CHUNK_ROWS = 32  # the hand-chunked loop's rows per chunk: about the rows infofuse's CPU op holds at V = 128256


def _eager(xs, ws, xt, wt):
    log_q = F.linear(xs, ws).float().log_softmax(-1)
    with torch.no_grad():
        log_p = F.linear(xt, wt).float().log_softmax(-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def _chunk_sum(xs, ws, xt, wt):
    log_q = F.linear(xs, ws).float().log_softmax(-1)
    with torch.no_grad():
        log_p = F.linear(xt, wt).float().log_softmax(-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum")


def _chunked(xs, ws, xt, wt):
    total = xs.new_zeros((), dtype=torch.float32)
    for r0 in range(0, xs.shape[0], CHUNK_ROWS):
        sl = slice(r0, r0 + CHUNK_ROWS)
        total = total + checkpoint(_chunk_sum, xs[sl], ws, xt[sl], wt, use_reentrant=False)
    return total / xs.shape[0]


class LinearKLDivergenceCase(Case):
    op = "linear_kl_divergence"
    dims = ("N", "D", "V")
    models = ("gaussian",)
    default_models = ("gaussian",)
    grad_labels = ("dX_s", "dW_s")
    time_baseline = "eager"
    memory_baseline = "eager-chunked"
    quick_shape = (64, 32, 1000)
    probe_shape = (8, 16, 32)
    params = {"beta": 0.0, "temperature": 1.0, "reduction": "mean", "teacher_requires_grad": False}

    def default_shapes(self, device: str) -> list[tuple[int, ...]]:
        if device.startswith("cuda"):
            return [(8192, 4096, 128256)]
        # small enough for `make demo` on 2 cores; the README's table is --shape 128,4096,128256 (an 8B head pair)
        return [(256, 1024, 32768)]

    def make_inputs(self, shape, model, dtype, device, seed) -> Inputs:
        n, d, v = shape
        gen = torch.Generator(device=device).manual_seed(seed)
        f32 = {"dtype": torch.float32, "device": device, "generator": gen}
        scale = LOGIT_STD / math.sqrt(d)
        xs, xt = torch.randn(n, d, **f32), torch.randn(n, d, **f32)
        ws, wt = torch.randn(v, d, **f32) * scale, torch.randn(v, d, **f32) * scale
        xs, ws, xt, wt = (t.to(dtype) for t in (xs, ws, xt, wt))
        xs.requires_grad_()
        ws.requires_grad_()
        return Inputs(args=(xs, ws, xt, wt), leaves=(xs, ws))

    def floor_gemms(self, shape, model) -> GemmFloor:
        n, d, v = shape
        return GemmFloor(
            (n, v, d), fwd=2, both=4, what="4 GEMMs of 2·N·V·D (both heads' logits, dX_s, dW_s); forward alone 2"
        )

    def reference(self, inputs: Inputs, dtype: torch.dtype) -> tuple[float, list[torch.Tensor]]:
        from infofuse.reference import linear_kl_divergence_reference

        xs, ws, xt, wt = inputs.args
        xr = xs.detach().to(dtype).requires_grad_()
        wr = ws.detach().to(dtype).requires_grad_()
        loss = linear_kl_divergence_reference(xr, wr, xt.detach().to(dtype), wt.detach().to(dtype), compute_dtype=dtype)
        loss.backward()
        return loss.item(), [xr.grad, wr.grad]

    def peers(self, device: str, dtype: torch.dtype) -> list[Peer]:
        on_gpu = device.startswith("cuda")
        peers = [_infofuse_peer(device), _infofuse_small_chunk_peer()]
        peers.append(Peer("eager", lambda: _eager, note="F.kl_div(log_softmax(...), ..., reduction='batchmean')"))
        peers.append(Peer("compile", _build_compiled, probe=False, note="torch.compile(eager, dynamic=False)"))
        peers.append(
            Peer(
                "eager-chunked", lambda: _chunked, note=f"eager per {CHUNK_ROWS}-row chunk under torch.utils.checkpoint"
            )
        )
        peers.append(_liger_peer(on_gpu))
        return peers


def _infofuse_peer(device: str) -> Peer:
    try:
        from infofuse import linear_kl_divergence
    except ImportError as exc:
        return Peer("infofuse", None, skip=f"{type(exc).__name__}: {exc}"[:160])
    return Peer("infofuse", lambda: linear_kl_divergence, note="infofuse.linear_kl_divergence, impl=None")


def _infofuse_small_chunk_peer() -> Peer:
    """infofuse with the hand-chunked loop's chunk rows: the memory end of its time / memory trade."""
    try:
        from infofuse import linear_kl_divergence
    except ImportError as exc:
        return Peer("infofuse-small-chunk", None, skip=f"{type(exc).__name__}: {exc}"[:160])

    def build():
        return lambda xs, ws, xt, wt: linear_kl_divergence(xs, ws, xt, wt, chunk_size=CHUNK_ROWS)

    return Peer("infofuse-small-chunk", build, note=f"chunk_size={CHUNK_ROWS}")


def _build_compiled():
    torch._dynamo.reset()
    return torch.compile(_eager, dynamic=False)


def _liger_peer(on_gpu: bool) -> Peer:
    if not on_gpu:
        return Peer("liger", None, skip="GPU only")
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as exc:
        return Peer("liger", None, skip=f"not installed ({type(exc).__name__})")

    def build():
        loss_fn = LigerFusedLinearJSD(jsd_beta=0.0)  # β = 0: forward KL(teacher‖student) in Liger's convention
        return lambda xs, ws, xt, wt: loss_fn(xs, ws, xt, wt)

    return Peer("liger", build, note="LigerFusedLinearJSD(jsd_beta=0.0)")


CASE = LinearKLDivergenceCase()

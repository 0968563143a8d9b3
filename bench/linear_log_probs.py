"""Benchmark case: per-token log-probabilities and entropy of a linear head, the RL post-training call.

Every peer computes, from x (N, D), w (V, D) and sampled tokens t (N,), ``log p(t)`` and the entropy ``H(p)`` of
``p = softmax(x·wᵀ / T)`` per token, then the scalar the harness differentiates,
``Σ_i a_i·log p_i(t_i) + 0.01·Σ_i H_i`` with fixed per-token weights a (advantages of a policy-gradient step, so
that no peer can fold the upstream gradient into its forward as a scalar loss could). Inputs are those of the
linear cross-entropy case (``gaussian`` / ``lm`` logit models), at temperature T = 0.7.

Peers: infofuse's ``linear_log_probs`` (its default impl for the device), PyTorch eager on the full logits,
``torch.compile`` of eager, and the best chunked alternative the RL libraries write by hand (TRL's and verl's
entropy / log-prob helpers): a loop over row chunks, each under activation checkpointing, so that one chunk of
logits lives at a time in forward and in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .case import Case, Inputs, Peer
from .floor import GemmFloor
from .linear_cross_entropy import make_inputs as lce_inputs

__all__ = ["CASE", "LinearLogProbsCase"]

TEMPERATURE = 0.7
ENTROPY_COEF = 0.01
CHUNK_ROWS = 256  # rows of logits per chunk of the hand-chunked peer (32 MiB of float32 logits at V = 32768)


def _log_probs_entropy(x, w, t):
    """Eager: the full logits, log-softmax, the target's entry and the entropy."""
    logits = F.linear(x, w).float() / TEMPERATURE
    log_p = torch.log_softmax(logits, dim=-1)
    logp_t = log_p.gather(-1, t[:, None])[:, 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logp_t, entropy


def _objective(logp, entropy, a):
    return (logp * a).sum() + ENTROPY_COEF * entropy.sum()


def _eager(x, w, t, a):
    return _objective(*_log_probs_entropy(x, w, t), a)


def _chunked_eager(x, w, t, a):
    """The hand-chunked loop: each row chunk's logits recomputed in backward (checkpoint), never all at once."""
    parts = [
        checkpoint(_log_probs_entropy, x[r0 : r0 + CHUNK_ROWS], w, t[r0 : r0 + CHUNK_ROWS], use_reentrant=False)
        for r0 in range(0, x.shape[0], CHUNK_ROWS)
    ]
    logp = torch.cat([p[0] for p in parts])
    entropy = torch.cat([p[1] for p in parts])
    return _objective(logp, entropy, a)


def _build_compiled():
    torch._dynamo.reset()
    return torch.compile(_eager, dynamic=False)


class LinearLogProbsCase(Case):
    op = "linear_log_probs"
    dims = ("N", "D", "V")
    models = ("gaussian", "lm")
    default_models = ("lm",)
    grad_labels = ("dX", "dW")
    time_baseline = "eager"
    memory_baseline = "chunked-eager"
    quick_shape = (256, 64, 1024)
    probe_shape = (8, 16, 32)
    params = {"temperature": TEMPERATURE, "entropy_coef": ENTROPY_COEF, "return_entropy": True}

    def default_shapes(self, device: str) -> list[tuple[int, ...]]:
        if device.startswith("cuda"):
            return [(8192, 4096, 128256)]  # an 8B policy's head: 8k tokens, hidden 4096, Llama-3 vocabulary
        # small enough for `make demo` on 2 cores; the README's table is --shape 1024,4096,32768 (an 8B-style head)
        return [(1024, 1024, 32768)]

    def make_inputs(self, shape, model, dtype, device, seed) -> Inputs:
        x, w, t = lce_inputs(shape, model, dtype, device, seed)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        a = torch.randn(shape[0], generator=gen, device=device)  # per-token advantages
        x.requires_grad_()
        w.requires_grad_()
        return Inputs(args=(x, w, t, a), leaves=(x, w))

    def floor_gemms(self, shape, model) -> GemmFloor:
        n, d, v = shape
        return GemmFloor(
            (n, v, d), fwd=1, both=3, what="3 GEMMs of 2·N·V·D (logits, dX, dW); forward alone 1 (infofuse runs 4)"
        )

    def reference(self, inputs: Inputs, dtype: torch.dtype) -> tuple[float, list[torch.Tensor]]:
        from infofuse.reference import linear_log_probs_reference

        x, w, t, a = inputs.args
        xr = x.detach().to(dtype).requires_grad_()
        wr = w.detach().to(dtype).requires_grad_()
        logp, ent = linear_log_probs_reference(
            xr, wr, t, temperature=TEMPERATURE, return_entropy=True, compute_dtype=dtype
        )
        loss = _objective(logp, ent, a.to(dtype))
        loss.backward()
        return loss.item(), [xr.grad, wr.grad]

    def peers(self, device: str, dtype: torch.dtype) -> list[Peer]:
        peers = []
        try:
            import infofuse

            fn = infofuse.linear_log_probs

            def build():
                def ours(x, w, t, a):
                    logp, ent = fn(x, w, t, temperature=TEMPERATURE, return_entropy=True)
                    return _objective(logp, ent, a)

                return ours

            note = f"linear_log_probs, impl=None -> {infofuse.available_impls(device)[0]!r}"
            peers.append(Peer("infofuse", build, note=note))
        except (ImportError, AttributeError) as exc:
            peers.append(Peer("infofuse", None, skip=f"{type(exc).__name__}: {exc}"[:200]))
        peers.append(Peer("eager", lambda: _eager, note="log_softmax(F.linear(x, w).float() / T), gather, entropy"))
        peers.append(Peer("compile", _build_compiled, probe=False, note="torch.compile(eager, dynamic=False)"))
        peers.append(
            Peer(
                "chunked-eager",
                lambda: _chunked_eager,
                note=f"eager over {CHUNK_ROWS}-row chunks under torch.utils.checkpoint (TRL/verl style)",
            )
        )
        return peers


CASE = LinearLogProbsCase()

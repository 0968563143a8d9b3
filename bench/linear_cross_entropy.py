"""Benchmark case: linear cross-entropy, ``F.cross_entropy(F.linear(x, w).float(), t)`` with x (N, D), w (V, D).

Inputs follow two logit models (see /work/shared/PEERS.md):

- ``gaussian``: iid logits of standard deviation 4 (x ~ N(0, 1), w ~ N(0, 16/D)); targets uniform over V.
- ``lm``: an LM-like head. Feature 0 carries a unigram prior over frequency-sorted ids, x[:, 0] = 1 and
  w[j, 0] = -1.5·log1p(j), so p_j ∝ (1+j)^-1.5; the other D-1 features are Gaussian with scales chosen so that
  the context part of the logits has standard deviation 2. Targets are drawn from the prior.

Peers: infofuse (its default impl for the device, plus its other impls on GPU), PyTorch eager, ``torch.compile``
of eager, PyTorch's own chunked ``F.linear_cross_entropy`` (torch >= 2.13), Cut Cross-Entropy and Liger-Kernel
(GPU only, when installed). The ground truth is infofuse's plain reference in float64.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .case import Case, Inputs, Peer
from .floor import GemmFloor

__all__ = ["CASE", "LinearCrossEntropyCase", "make_inputs"]

GAUSSIAN_LOGIT_STD = 4.0
LM_CONTEXT_STD = 2.0
LM_PRIOR_EXPONENT = 1.5


def make_inputs(
    shape: tuple[int, int, int],
    model: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, w, target)`` for one configuration, drawn from a generator on ``device`` seeded with ``seed``.

    Values are drawn in float32 and then cast to ``dtype``, so every dtype sees the same numbers up to rounding.
    x and w do not require grad here (the case sets that).
    """
    n, d, v = shape
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    f32 = {"dtype": torch.float32, "device": device, "generator": gen}
    if model == "gaussian":
        x = torch.randn(n, d, **f32)
        w = torch.randn(v, d, **f32) * (GAUSSIAN_LOGIT_STD / math.sqrt(d))
        target = torch.randint(0, v, (n,), device=device, generator=gen)
    elif model == "lm":
        if d < 2:
            raise ValueError("the 'lm' logit model needs D >= 2 (feature 0 carries the prior)")
        x = torch.randn(n, d, **f32)
        x[:, 0] = 1.0
        w = torch.randn(v, d, **f32) * (LM_CONTEXT_STD / math.sqrt(d - 1))
        ids = torch.arange(v, device=device, dtype=torch.float32)
        prior_logit = -LM_PRIOR_EXPONENT * torch.log1p(ids)
        w[:, 0] = prior_logit
        target = torch.multinomial(torch.softmax(prior_logit, 0), n, replacement=True, generator=gen)
    else:
        raise ValueError(f"unknown logit model {model!r}; known: gaussian, lm")
    return x.to(dtype), w.to(dtype), target


def _eager(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(x, w).float(), t)


def _as_loss(out) -> torch.Tensor:
    """Some peers return a tuple or a small output object; the loss is its first part."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "loss"):
        return out.loss
    return out[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


class LinearCrossEntropyCase(Case):
    op = "linear_cross_entropy"
    dims = ("N", "D", "V")
    models = ("gaussian", "lm")
    default_models = ("gaussian",)
    grad_labels = ("dX", "dW")
    time_baseline = "eager"
    memory_baseline = "torch-chunked"
    quick_shape = (256, 64, 1024)
    probe_shape = (8, 16, 32)
    params = {"reduction": "mean"}

    def default_shapes(self, device: str) -> list[tuple[int, ...]]:
        if device.startswith("cuda"):
            # an LLM head: 8k tokens, hidden 4096, Llama-3 vocabulary
            return [(8192, 4096, 128256)]
        # the CPU target of the issue
        return [(4096, 512, 32768)]

    def make_inputs(self, shape, model, dtype, device, seed) -> Inputs:
        x, w, t = make_inputs(shape, model, dtype, device, seed)
        x.requires_grad_()
        w.requires_grad_()
        return Inputs(args=(x, w, t), leaves=(x, w))

    def floor_gemms(self, shape, model) -> GemmFloor:
        n, d, v = shape
        return GemmFloor((n, v, d), fwd=1, both=3, what="3 GEMMs of 2·N·V·D (logits, dX, dW); forward alone 1")

    def reference(self, inputs: Inputs, dtype: torch.dtype) -> tuple[float, list[torch.Tensor]]:
        from infofuse.reference import linear_cross_entropy_reference

        x, w, t = inputs.args
        xr = x.detach().to(dtype).requires_grad_()
        wr = w.detach().to(dtype).requires_grad_()
        loss = linear_cross_entropy_reference(xr, wr, t, compute_dtype=dtype)
        loss.backward()
        return loss.item(), [xr.grad, wr.grad]

    def peers(self, device: str, dtype: torch.dtype) -> list[Peer]:
        on_gpu = device.startswith("cuda")
        peers = _infofuse_peers(device, on_gpu)
        peers.append(Peer("eager", lambda: _eager, note="F.cross_entropy(F.linear(x, w).float(), t)"))
        peers.append(Peer("compile", _build_compiled, probe=False, note="torch.compile(eager, dynamic=False)"))
        peers.append(_torch_chunked_peer())
        peers.extend(_cce_peers(on_gpu))
        peers.extend(_liger_peers(on_gpu, dtype))
        return peers


def _infofuse_peers(device: str, on_gpu: bool) -> list[Peer]:
    try:
        import infofuse

        lce = infofuse.linear_cross_entropy
    except (ImportError, AttributeError) as exc:
        # the op itself is missing: fall back to the plain reference so the rest of the table still runs
        reason = _first_line(exc)
        try:
            from infofuse.reference import linear_cross_entropy_reference as ref
        except ImportError:
            return [Peer("infofuse", None, skip=reason)]
        return [
            Peer("infofuse", None, skip=reason),
            Peer("infofuse-reference", lambda: ref, stands_in_for="infofuse", note="infofuse.reference"),
        ]

    default_note = f"impl=None -> {infofuse.available_impls(device)[0]!r}"

    def bind(impl):
        return lambda: lambda x, w, t: lce(x, w, t, impl=impl)

    peers = [
        Peer("infofuse", bind(None), note=default_note),
        Peer("infofuse-reference", bind("reference"), stands_in_for="infofuse", note="impl='reference'"),
    ]
    if on_gpu:
        for impl in ("chunked", "fused"):
            peers.append(Peer(f"infofuse-{impl}", bind(impl), note=f"impl={impl!r}"))
    return peers


def _build_compiled():
    # A fresh dynamo state per configuration: each shape compiles once (dynamic=False) and the recompile limit of
    # the shared code object is never reached. Inductor's on-disk cache makes later compiles of a shape cheap.
    torch._dynamo.reset()
    return torch.compile(_eager, dynamic=False)


def _torch_chunked_peer() -> Peer:
    fn = getattr(F, "linear_cross_entropy", None)
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if fn is None or options_cls is None:
        return Peer("torch-chunked", None, skip=f"torch {torch.__version__} has no F.linear_cross_entropy (2.13+)")

    def build():
        options = options_cls()

        def chunked(x, w, t):
            with warnings.catch_warnings():
                # it falls back to its reference path with a warning on configurations it does not support;
                # ours are supported, and a warning in the timed region would only add noise
                warnings.simplefilter("ignore")
                return fn(x, w, t, options=options)

        return chunked

    return Peer("torch-chunked", build, note="F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())")


def _cce_peers(on_gpu: bool) -> list[Peer]:
    names = ("cce", "cce-exact")
    if not on_gpu:
        return [Peer(n, None, skip="GPU only") for n in names]
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except Exception as exc:
        return [Peer(n, None, skip=f"not installed ({_first_line(exc)})") for n in names]
    return [
        Peer("cce", lambda: lambda x, w, t: cce(x, w, t), note="Cut Cross-Entropy, default gradient filter"),
        Peer(
            "cce-exact",
            lambda: lambda x, w, t: cce(x, w, t, filter_eps=None),
            note="Cut Cross-Entropy, filter_eps=None",
        ),
    ]


def _liger_peers(on_gpu: bool, dtype: torch.dtype) -> list[Peer]:
    if not on_gpu:
        return [Peer("liger", None, skip="GPU only")]
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:
        return [Peer("liger", None, skip=f"not installed ({_first_line(exc)})")]

    def bind(**kwargs):
        def build():
            loss_fn = LigerFusedLinearCrossEntropyLoss(**kwargs)
            return lambda x, w, t: _as_loss(loss_fn(w, x, t))  # Liger takes the weight first

        return build

    peers = [Peer("liger", bind(), note="LigerFusedLinearCrossEntropyLoss() defaults")]
    if dtype != torch.float32:
        # fp32 accumulation of the weight gradient (Liger #512/#827); a TypeError on versions without the option
        # shows up as a skipped row
        peers.append(Peer("liger-fp32acc", bind(accum_dtype=torch.float32), note="accum_dtype=torch.float32"))
    return peers


CASE = LinearCrossEntropyCase()

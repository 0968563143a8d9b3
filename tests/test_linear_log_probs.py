"""linear_log_probs and linear_cross_entropy(return_entropy=True): every backend against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

import infofuse
from infofuse import LinearLogProbs, linear_cross_entropy, linear_log_probs, linear_log_probs_reference
from tests.utils import assert_close, assert_graded

pytestmark = pytest.mark.skipif(not infofuse.cpp_available(), reason="needs the C++ extension infofuse._C")

IMPLS = ["cpu", "chunked", "fused"]  # the Triton strategies run under TRITON_INTERPRET=1 here (tests/conftest.py)


def make_inputs(batch, d, v, dtype=torch.float64, *, seed=0, bias=True, ignore_frac=0.2, noncontig=False):
    """Random (never zero) inputs with logits of standard deviation about 2; some targets ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    if noncontig:  # strided views of larger tensors
        x = torch.randn(*batch, 2 * d + 1, generator=g, dtype=torch.float64)[..., 1 : 2 * d + 1 : 2]
        w = torch.randn(d + 3, v, generator=g, dtype=torch.float64).t()[:, 2 : d + 2] * (2.0 / math.sqrt(d))
    else:
        x = torch.randn(*batch, d, generator=g, dtype=torch.float64)
        w = torch.randn(v, d, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(d))
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, v, batch, generator=g)
    t[torch.rand(batch, generator=g) < ignore_frac] = -100
    return x.to(dtype), w.to(dtype), t, None if b is None else b.to(dtype)


def run(fn, x, w, t, b, *, seed=1, **kw):
    """log-probs, entropy and the gradients of Σ g₁·log p + Σ g₂·H (random per-token upstream gradients)."""
    leaves = [a.detach().clone().requires_grad_() for a in (x, w) + ((b,) if b is not None else ())]
    bb = leaves[2] if b is not None else None
    logp, ent = fn(leaves[0], leaves[1], t, bb, return_entropy=True, **kw)
    g = torch.Generator().manual_seed(seed)
    g1 = torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5
    g2 = torch.randn(t.shape, generator=g, dtype=torch.float64)
    ((logp * g1.to(logp.dtype)).sum() + (ent * g2.to(ent.dtype)).sum()).backward()
    out = {"logp": logp.detach(), "entropy": ent.detach(), "dx": leaves[0].grad, "dw": leaves[1].grad}
    if b is not None:
        out["db"] = leaves[2].grad
    return out


def truth_fn(x, w, t, b, **kw):
    return linear_log_probs_reference(x.double(), w.double(), t, None if b is None else b.double(), **kw,
                                      compute_dtype=torch.float64)  # fmt: skip


def same_dtype_fn(x, w, t, b, **kw):  # PyTorch at the inputs' dtype: F.linear there, then float32
    return linear_log_probs_reference(x, w, t, b, **kw, compute_dtype=torch.float32)


OPTIONS = [
    {},
    {"temperature": 0.7},
    {"softcap": 4.0},
    {"temperature": 1.6, "softcap": 3.0},
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("case", ["bias", "no-bias-noncontiguous-3d"])
def test_matches_float64_reference(impl, opts, case):
    """Values and every gradient; the C++ backend in float64 (to rounding), the Triton ones in float32."""
    if case == "bias":
        x, w, t, b = make_inputs((37,), 23, 107, seed=2)
    else:
        x, w, t, b = make_inputs((3, 7), 19, 61, seed=3, bias=False, noncontig=True)
    assert not x.is_contiguous() or case == "bias"
    dtype, rtol = (torch.float64, 1e-9) if impl == "cpu" else (torch.float32, 2e-5)
    args = [a if a is None else a.to(dtype) for a in (x, w, t, b)]
    args[2] = t
    ours = run(linear_log_probs, *args, impl=impl, **opts)
    want = run(truth_fn, x, w, t, b, **opts)
    assert ours["logp"].dtype == dtype and ours["logp"].shape == t.shape
    for key, value in want.items():
        scale = value.abs().max().item()
        assert_close(ours[key], value, rtol=rtol, atol=rtol * scale, name=f"{key} ({impl}, {opts})")
    ignored = t == -100
    assert ignored.any() and (ours["logp"][ignored] == 0).all() and (ours["entropy"][ignored] == 0).all()
    assert (ours["dx"][ignored] == 0).all(), "ignored tokens must take no gradient"


@pytest.mark.parametrize("impl", IMPLS)
def test_log_probs_alone_and_module(impl):
    """Without return_entropy: one tensor, the same values; the module passes its options through."""
    x, w, t, b = make_inputs((29,), 16, 45, dtype=torch.float32, seed=4)
    alone = linear_log_probs(x, w, t, b, temperature=0.8, impl=impl)
    both = linear_log_probs(x, w, t, b, temperature=0.8, impl=impl, return_entropy=True)
    assert isinstance(alone, torch.Tensor)
    assert_close(alone, both[0], rtol=1e-6, atol=1e-6, name="log-probs with and without entropy")
    module = LinearLogProbs(temperature=0.8, return_entropy=True, impl=impl)
    assert "temperature=0.8" in repr(module)
    for a, e in zip(module(x, w, t, b), both, strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_graded_against_pytorch(impl, dtype):
    """bf16/fp16 inputs: error against the float64 truth within 2x PyTorch's own at the same dtype."""
    x, w, t, b = make_inputs((64,), 40, 150, dtype=dtype, seed=5, noncontig=True)
    opts = {"temperature": 0.9, "softcap": 6.0}
    ours = run(linear_log_probs, x, w, t, b, impl=impl, **opts)
    same = run(same_dtype_fn, x, w, t, b, **opts)
    truth = run(truth_fn, x, w, t, b, **opts)
    assert ours["logp"].dtype == torch.float32 and ours["dx"].dtype == dtype and ours["dw"].dtype == dtype
    for key in truth:
        floor = 1e-6 if key in ("logp", "entropy") else 1e-3
        assert_graded(ours[key], same[key], truth[key], name=f"{key} ({dtype}, {impl})", factor=2.0, floor=floor)


def test_gradcheck_float64():
    x, w, t, b = make_inputs((5,), 4, 9, seed=6)
    x, w, b = (a.requires_grad_() for a in (x, w, b))

    def fn(x_, w_, b_):
        return linear_log_probs(x_, w_, t, b_, softcap=2.0, temperature=1.3, return_entropy=True, impl="cpu")

    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("impl", ["cpu", "chunked"])
def test_torch_compile_fullgraph(impl):
    x, w, t, b = make_inputs((24,), 16, 40, dtype=torch.float32, seed=7)

    def step(x_, w_, b_):
        logp, ent = linear_log_probs(x_, w_, t, b_, temperature=0.7, return_entropy=True, impl=impl)
        ratio = torch.exp(logp - logp.detach())
        return -(torch.clamp(ratio, 0.8, 1.2) * (t != -100)).sum() - 0.01 * ent.sum()

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    got = compiled(*leaves)
    got.backward()
    eager = [a.clone().requires_grad_() for a in (x, w, b)]
    want = step(*eager)
    want.backward()
    assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-6, name="compiled objective")
    for a, e, n in zip(leaves, eager, ("dx", "dw", "db"), strict=True):
        assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-7, name=f"compiled {n}")


OP_PAIRS = {
    "cpu": ("linear_cross_entropy_forward", "linear_cross_entropy_backward"),
    "chunked": ("linear_cross_entropy_chunked_forward", "linear_cross_entropy_chunked_backward"),
    "fused": ("linear_cross_entropy_fused_forward", "linear_cross_entropy_fused_backward"),
}


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck_with_entropy_and_temperature(impl):
    fwd, bwd = (getattr(torch.ops.infofuse, name).default for name in OP_PAIRS[impl])
    x, w, t, b = make_inputs((17,), 8, 30, dtype=torch.float32, seed=8)
    opts = (None, 0, -100, 0.0, 0.0, 2.0, 4)  # weight, reduction none, ignore, smoothing, z-loss, softcap, chunk
    args = (x.requires_grad_(), w.requires_grad_(), t, b.requires_grad_(), *opts, True, True, True, False)
    torch.library.opcheck(fwd, args, {"temperature": 0.7, "want_entropy": True})
    out = fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args], temperature=0.7, want_entropy=True)
    lse, entropy = out[1], out[-1]
    assert entropy.shape == (17,) and (entropy[t == -100] == 0).all()
    bargs = (torch.rand(17) + 0.5, None, x.detach(), w.detach(), t, b.detach(), *opts, True, True, True)
    kw = {"grad_entropy": torch.randn(17), "entropy": entropy, "temperature": 0.7}
    bargs = bargs[:7] + (lse,) + bargs[7:]
    torch.library.opcheck(bwd, bargs, kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_returns_entropy(impl, reduction):
    """linear_cross_entropy(..., return_entropy=True): (loss, lse, argmax, entropy) in that order, the entropy
    differentiable (a gradient into it recomputes; without one the gradients formed in forward serve)."""
    dtype, rtol = (torch.float64, 1e-9) if impl == "cpu" else (torch.float32, 2e-5)
    x, w, t, b = make_inputs((41,), 13, 57, seed=9)
    kw = {"reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}
    outs = {}
    for name, fn_impl, dt in (("ours", impl, dtype), ("ref", "reference", torch.float64)):
        leaves = [a.to(dt).clone().requires_grad_() for a in (x, w, b)]
        loss, lse, am, ent = linear_cross_entropy(
            leaves[0], leaves[1], t, linear_bias=leaves[2], impl=fn_impl, return_lse=True, return_argmax=True,
            return_entropy=True, **kw,
        )  # fmt: skip
        assert am.dtype == torch.int64 and ent.shape == t.shape
        (loss.sum() + 0.3 * (ent * torch.arange(41, dtype=dt).sin()).sum()).backward()
        outs[name] = [loss, lse, ent, *(a.grad for a in leaves)]
        # entropy detached: the loss alone, through the gradients formed in forward for "mean"
        leaves2 = [a.to(dt).clone().requires_grad_() for a in (x, w, b)]
        loss2, ent2 = linear_cross_entropy(
            leaves2[0], leaves2[1], t, linear_bias=leaves2[2], impl=fn_impl, return_entropy=True, **kw
        )
        loss2.sum().backward()
        outs[name + "_detached"] = [loss2, ent2, *(a.grad for a in leaves2)]
    for key in ("", "_detached"):
        for i, (a, e) in enumerate(zip(outs["ours" + key], outs["ref" + key], strict=True)):
            assert_close(a, e, rtol=rtol, atol=rtol * e.abs().max().item(), name=f"output {i}{key} ({impl})")
    ref_logp, ref_ent = linear_log_probs_reference(
        x, w, t, b, softcap=5.0, return_entropy=True, compute_dtype=torch.float64
    )
    assert_close(outs["ours"][2], ref_ent, rtol=rtol, atol=rtol, name="entropy vs linear_log_probs_reference")


def test_entropy_of_known_distributions():
    """Uniform logits: H = log V exactly; one dominant logit: H -> 0, log p(top) -> 0."""
    v, d = 37, 4
    x = torch.randn(5, d, dtype=torch.float64)
    w = torch.zeros(v, d, dtype=torch.float64)
    t = torch.arange(5)
    for impl in IMPLS:
        dt = torch.float64 if impl == "cpu" else torch.float32
        logp, ent = linear_log_probs(x.to(dt), w.to(dt), t, return_entropy=True, impl=impl)
        assert_close(ent, torch.full((5,), math.log(v), dtype=dt), rtol=1e-6, atol=0, name=f"uniform H ({impl})")
        assert_close(logp, torch.full((5,), -math.log(v), dtype=dt), rtol=1e-6, atol=0, name=f"uniform ({impl})")
        bias = torch.zeros(v, dtype=dt)
        bias[t[0]] = 60.0
        logp, ent = linear_log_probs(x.to(dt), w.to(dt), t, bias, return_entropy=True, impl=impl)
        assert abs(float(ent[0])) < 1e-20 and abs(float(logp[0])) < 1e-20


def test_all_ignored_rows():
    x, w, t, b = make_inputs((6,), 5, 9, seed=10)
    t[:] = -100
    xs = x.clone().requires_grad_()
    logp, ent = linear_log_probs(xs, w, t, b, return_entropy=True, impl="cpu")
    (logp.sum() + ent.sum()).backward()
    assert (logp == 0).all() and (ent == 0).all() and (xs.grad == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": 0.0}, ValueError, "temperature must be a finite float > 0"),
        ({"temperature": -1.0}, ValueError, "temperature must be a finite float > 0"),
        ({"temperature": float("inf")}, ValueError, "temperature must be a finite float > 0"),
        ({"softcap": 0.0}, ValueError, "softcap must be None or a finite float > 0"),
        ({"impl": "gpu"}, ValueError, "impl must be None"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be None or an int >= 1"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_options(kwargs, error, match):
    x, w, t, b = make_inputs((4,), 3, 7, seed=11)
    with pytest.raises(error, match=match):
        linear_log_probs(x, w, t, b, **kwargs)


def test_bad_tensors():
    x, w, t, b = make_inputs((4,), 3, 7, seed=12)
    cases = [
        ((x, w[:, :2], t, b), ValueError, r"weight must be 2-D \(V, D\) with D = input.shape\[-1\] = 3"),
        ((x, w, t[:3], b), ValueError, r"target must have shape input.shape\[:-1\] = \(4,\)"),
        ((x, w, t.double(), b), TypeError, "target must hold integer token ids"),
        ((x, w.float(), t, b), TypeError, "weight must have input's dtype torch.float64"),
        ((x, w, t, b[:5]), ValueError, r"linear_bias must have shape \(V,\) = \(7,\)"),
        ((x.int(), w.int(), t, None), TypeError, "input must be float32, bfloat16, float16 or float64"),
        ((x, w, t.masked_fill(t == 0, 0) + 7, b), ValueError, r"outside \[0, V\) with V = 7"),
        ((x, "w", t, b), TypeError, "weight must be a torch.Tensor"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            linear_log_probs(*args)


def test_temperature_error_from_the_kernel_itself():
    """The C++ op refuses T <= 0 too (the path a direct op call takes)."""
    x, w, t, _ = make_inputs((3,), 4, 5, seed=13)
    op = torch.ops.infofuse.linear_cross_entropy_forward
    with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
        op(x, w, t, None, None, 0, -100, 0.0, 0.0, None, None, False, False, False, False, temperature=0.0)


def test_return_entropy_needs_class_indices():
    x, w, _, _ = make_inputs((4,), 3, 7, seed=14)
    with pytest.raises(ValueError, match="return_entropy is for class-index targets"):
        linear_cross_entropy(x, w, torch.rand(4, 7, dtype=torch.float64), return_entropy=True)

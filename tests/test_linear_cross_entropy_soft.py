"""Linear cross-entropy with class-probability targets (``infofuse._ops.linear_cross_entropy_soft``) against
``F.cross_entropy`` with probability targets: float64 to rounding, lower precisions graded against PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from infofuse import linear_cross_entropy_reference
from infofuse._ops.linear_cross_entropy_soft import (
    BACKWARD,
    FORWARD,
    soft_linear_cross_entropy,
    validate_soft_target,
)
from tests.utils import assert_close, assert_graded

OPTION_SETS = {  # keyword arguments of both functions, besides the tensors
    "plain": {},
    "weight": {"weight": "w"},
    "smoothing": {"label_smoothing": 0.15},
    "z_loss": {"z_loss": 3e-3},
    "softcap": {"softcap": 2.5},
    "everything": {"weight": "w", "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0},
}


def make_inputs(n, d, v, dtype=torch.float64, *, seed=0, bias=True, normalised=True, noncontig=False, scale=2.0):
    """Random (never zero) inputs with logits of standard deviation about ``scale``, and (N, V) probability
    targets: softmax rows (peaked, like distillation targets), or, with ``normalised=False``, positive values
    whose rows sum to anything between about 0.2·V and 0.8·V."""
    g = torch.Generator().manual_seed(seed)
    if noncontig:  # strided views of larger tensors
        x = torch.randn(n, 2 * d + 1, generator=g, dtype=torch.float64)[:, 1 : 2 * d + 1 : 2]
        w = torch.randn(d + 3, v, generator=g, dtype=torch.float64).t()[:, 2 : d + 2] * (scale / math.sqrt(d))
        q = torch.randn(n, v + 5, generator=g, dtype=torch.float64)[:, 3 : v + 3]
    else:
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        w = torch.randn(v, d, generator=g, dtype=torch.float64) * (scale / math.sqrt(d))
        q = torch.randn(n, v, generator=g, dtype=torch.float64)
    q = (2.0 * q).softmax(-1) if normalised else torch.rand(n, 1, generator=g, dtype=torch.float64) * 0.6 + q.sigmoid()
    if noncontig:
        q = torch.empty(n, v + 5, dtype=torch.float64)[:, 3 : v + 3].copy_(q)
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    cw = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    x, w = x.to(dtype), w.to(dtype)
    b = None if b is None else b.to(dtype)
    return x, w, q, b, cw


def resolve(opts, cw, dtype):
    return {k: (cw.to(dtype) if v == "w" else v) for k, v in opts.items()}


def ours_fn(x, w, q, *, linear_bias=None, weight=None, reduction="mean", label_smoothing=0.0, z_loss=0.0,
            softcap=None, chunk_size=None, return_lse=True):  # fmt: skip
    loss, lse = soft_linear_cross_entropy(
        x.reshape(-1, x.shape[-1]), w, q.reshape(-1, w.shape[0]), linear_bias, weight, reduction,
        label_smoothing, z_loss, softcap, chunk_size,
    )  # fmt: skip
    batch = x.shape[:-1]
    return (loss.reshape(batch) if reduction == "none" else loss), lse.reshape(batch)


def ref_fn(x, w, q, *, chunk_size=None, compute_dtype=None, **kw):
    if compute_dtype is None:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return linear_cross_entropy_reference(x, w, q, return_lse=True, compute_dtype=compute_dtype, **kw)


def run(fn, x, w, q, b, *, target_grad=False, lse_grad=None, grad_scale=1.7, **kw):
    """Loss, lse and gradients of ``fn`` with a non-trivial upstream gradient (per row for "none")."""
    xb = x.detach().clone().requires_grad_()
    wb = w.detach().clone().requires_grad_()
    bb = None if b is None else b.detach().clone().requires_grad_()
    qb = q.detach().clone().requires_grad_(target_grad)
    loss, lse = fn(xb, wb, qb, linear_bias=bb, **kw)
    if loss.dim() == 0:
        total = loss * grad_scale
    else:
        g = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        total = (loss * g).sum()
    if lse_grad is not None:
        total = total + (lse * lse_grad.to(lse.dtype)).sum()
    total.backward()
    return {
        "loss": loss.detach(),
        "lse": lse.detach(),
        "dx": xb.grad,
        "dw": wb.grad,
        "db": None if b is None else bb.grad,
        "dq": qb.grad if target_grad else None,
    }


def check_float64(x, w, q, b, **kw):
    ours = run(ours_fn, x, w, q, b, **kw)
    kw.pop("chunk_size", None)
    ref = run(ref_fn, x, w, q, b, **kw)
    for key, value in ours.items():
        if value is None:
            assert ref[key] is None, key
            continue
        assert value.dtype == ref[key].dtype, f"{key}: dtype {value.dtype} != {ref[key].dtype}"
        scale = ref[key].abs().max().item() if ref[key].numel() else 1.0
        assert_close(value, ref[key], rtol=1e-9, atol=1e-9 * max(scale, 1e-6), name=key)
    return ours


def check_graded(x, w, q, b, dtype, *, target_dtype=None, floors=(1e-6, 1e-6), **kw):
    """Our result at ``dtype`` against PyTorch at ``dtype`` (float32 logits), both against the float64 truth."""
    xs, ws = x.to(dtype), w.to(dtype)
    bs = None if b is None else b.to(dtype)
    qs = q.to(target_dtype or dtype)
    ours = run(ours_fn, xs, ws, qs, bs, **kw)
    kw.pop("chunk_size", None)
    same = run(ref_fn, xs, ws, qs, bs, **kw)
    truth = run(ref_fn, xs.double(), ws.double(), qs.double(), None if bs is None else bs.double(), **kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert ours["loss"].dtype == acc and ours["lse"].dtype == acc
    for key, value in ours.items():
        if value is None:
            continue
        want = {"dx": dtype, "dw": dtype, "db": dtype, "dq": qs.dtype}.get(key, acc)
        assert value.dtype == want, f"{key}: dtype {value.dtype}, want {want}"
        floor = floors[0] if key in ("loss", "lse") else floors[1]
        assert_graded(value, same[key], truth[key], name=f"{key} ({dtype})", factor=2.0, floor=floor)


# ---------------------------------------------------------------- the reference is F.cross_entropy


def test_reference_is_cross_entropy_with_probabilities():
    x, w, q, b, cw = make_inputs(9, 7, 11, seed=1)
    logits = F.linear(x, w, b)
    for reduction in ("mean", "sum", "none"):
        got = linear_cross_entropy_reference(
            x, w, q, linear_bias=b, weight=cw, reduction=reduction, label_smoothing=0.2, compute_dtype=torch.float64
        )
        # torch's definition written out: q' = (1 - ε) q + ε/V, loss_i = -Σ_j w_j q'_ij log p_ij, "mean" / N
        rows = -(cw * (0.8 * q + 0.2 / 11) * logits.log_softmax(-1)).sum(-1)
        want = {"mean": rows.sum() / 9, "sum": rows.sum(), "none": rows}[reduction]
        assert_close(got, want, rtol=1e-12, atol=1e-12, name=reduction)
        want_torch = F.cross_entropy(logits, q, weight=cw, reduction=reduction, label_smoothing=0.2)
        assert_close(got, want_torch, rtol=1e-12, atol=1e-12, name=reduction)


# ---------------------------------------------------------------- float64: F.cross_entropy to rounding


@pytest.mark.parametrize("option_set", sorted(OPTION_SETS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_option_float64(option_set, reduction):
    x, w, q, b, cw = make_inputs(37, 23, 123, seed=2)
    opts = resolve(OPTION_SETS[option_set], cw, torch.float64)
    check_float64(x, w, q, b, reduction=reduction, chunk_size=10, target_grad=True, **opts)


@pytest.mark.parametrize("chunk_size", [1, 10, 36, 37, None])  # ragged last chunk, one row over, whole batch
@pytest.mark.parametrize("bias", [True, False])
def test_odd_shapes_and_chunks(chunk_size, bias):
    x, w, q, b, cw = make_inputs(37, 23, 123, seed=3, bias=bias)
    check_float64(x, w, q, b, reduction="mean", label_smoothing=0.05, chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_into_lse(reduction):
    x, w, q, b, cw = make_inputs(29, 13, 57, seed=4)
    lse_grad = torch.linspace(-1.0, 2.0, 29, dtype=torch.float64)
    check_float64(x, w, q, b, reduction=reduction, weight=cw, z_loss=1e-2, chunk_size=8, lse_grad=lse_grad,
                  target_grad=True)  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_noncontiguous_and_unnormalised_targets(reduction):
    x, w, q, b, cw = make_inputs(31, 17, 45, seed=5, noncontig=True, normalised=False)
    assert not (x.is_contiguous() or w.is_contiguous() or q.is_contiguous())
    assert (q.sum(-1) - 1).abs().min() > 1.0  # rows far from summing to 1
    check_float64(x, w, q, b, reduction=reduction, weight=cw, label_smoothing=0.1, chunk_size=7, target_grad=True)


def test_batched_input_shape():
    x, w, q, b, cw = make_inputs(12, 9, 20, seed=6)
    x3, q3 = x.reshape(3, 4, 9), q.reshape(3, 4, 20)
    ours = run(ours_fn, x3, w, q3, b, reduction="none", chunk_size=5)
    ref = run(ref_fn, x3, w, q3, b, reduction="none")
    assert ours["loss"].shape == (3, 4) and ours["lse"].shape == (3, 4)
    for key in ("loss", "lse", "dx", "dw", "db"):
        assert_close(ours[key], ref[key], rtol=1e-9, atol=1e-9, name=key)


def test_empty_batch_matches_pytorch():
    x, w, q, b, cw = make_inputs(4, 6, 9, seed=7)
    x, q = x[:0], q[:0]
    for reduction in ("mean", "sum", "none"):
        ours = run(ours_fn, x, w, q, b, reduction=reduction)
        ref = run(ref_fn, x, w, q, b, reduction=reduction)
        for key in ("loss", "dx", "dw", "db"):
            assert ours[key].shape == ref[key].shape, key
            assert torch.equal(ours[key].isnan(), ref[key].isnan()), key
        assert (ours["dw"] == 0).all() and (ours["db"] == 0).all()


# ---------------------------------------------------------------- float32 / bf16 / fp16, graded against PyTorch


@pytest.mark.parametrize("option_set", ["plain", "everything"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float32_graded(option_set, reduction):
    x, w, q, b, cw = make_inputs(64, 48, 300, seed=8)
    opts = resolve(OPTION_SETS[option_set], cw, torch.float32)
    check_graded(x, w, q, b, torch.float32, reduction=reduction, chunk_size=24, target_grad=True, **opts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("option_set", ["plain", "everything"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_half_inputs_graded(dtype, option_set, reduction):
    # many chunks, so that the weight gradient is a sum of many chunk products: float32 accumulation keeps it at
    # PyTorch's accuracy (a bf16 running sum would not be)
    x, w, q, b, cw = make_inputs(96, 40, 257, seed=9)
    opts = resolve(OPTION_SETS[option_set], cw, torch.float32)
    check_graded(x, w, q, b, dtype, reduction=reduction, chunk_size=5, floors=(1e-6, 1e-3), **opts)


def test_target_dtype_differs_from_input():
    x, w, q, b, cw = make_inputs(40, 16, 70, seed=10)
    check_graded(x, w, q, b, torch.float32, target_dtype=torch.bfloat16, chunk_size=9, target_grad=True,
                 floors=(1e-6, 1e-5))  # fmt: skip


# ---------------------------------------------------------------- autograd behaviour


def test_partial_requires_grad_and_no_grad():
    x, w, q, b, cw = make_inputs(20, 8, 33, seed=11)
    want = ref_fn(x, w, q, linear_bias=b)[0]
    with torch.no_grad():
        got = ours_fn(x.requires_grad_(), w, q, linear_bias=b)[0]
    assert not got.requires_grad
    assert_close(got, want.detach(), rtol=1e-9, atol=1e-12, name="no_grad loss")
    # only the target requires grad: the formed input gradients are not needed, the target's is recomputed
    qs = q.clone().requires_grad_()
    ours_fn(x.detach(), w, qs, linear_bias=b, weight=cw)[0].backward()
    qr = q.clone().requires_grad_()
    ref_fn(x.detach(), w, qr, linear_bias=b, weight=cw)[0].backward()
    assert_close(qs.grad, qr.grad, rtol=1e-9, atol=1e-12, name="dq")
    # only the weight
    ws = w.clone().requires_grad_()
    ours_fn(x.detach(), ws, q, linear_bias=b)[0].backward()
    wr = w.clone().requires_grad_()
    ref_fn(x.detach(), wr, q, linear_bias=b)[0].backward()
    assert_close(ws.grad, wr.grad, rtol=1e-9, atol=1e-12, name="dw")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retain_graph_second_backward(reduction):
    x, w, q, b, cw = make_inputs(25, 10, 40, seed=12)
    xs = x.clone().requires_grad_()
    loss = ours_fn(xs, w, q, linear_bias=b, reduction=reduction, chunk_size=6)[0].sum()
    loss.backward(retain_graph=True)
    first = xs.grad.clone()
    xs.grad = None
    loss.backward()
    assert_close(xs.grad, first, rtol=1e-9, atol=1e-12, name="second backward")


def test_double_backward_is_refused():
    x, w, q, b, cw = make_inputs(10, 6, 15, seed=13)
    xs = x.clone().requires_grad_()
    for reduction in ("mean", "none"):
        loss = ours_fn(xs, w, q, linear_bias=b, reduction=reduction)[0].sum()
        with pytest.raises(RuntimeError, match="does not support double backward"):
            torch.autograd.grad(loss, xs, create_graph=True)


# ---------------------------------------------------------------- validation


def test_validate_soft_target():
    x = torch.randn(3, 4, 5)
    validate_soft_target(torch.rand(3, 4, 7), x, 7)
    validate_soft_target(torch.rand(7, dtype=torch.bfloat16), torch.randn(5), 7)
    with pytest.raises(ValueError, match=r"target must have shape .*\(3, 4, 7\)"):
        validate_soft_target(torch.rand(12, 7), x, 7)
    with pytest.raises(ValueError, match="target"):
        validate_soft_target(torch.rand(3, 4, 6), x, 7)
    with pytest.raises(TypeError, match="target must be float32"):
        validate_soft_target(torch.rand(3, 4, 7).to(torch.complex64), x, 7)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        validate_soft_target([[0.5, 0.5]], x, 7)
    if torch.device("meta") != x.device:
        with pytest.raises(ValueError, match="target must be on input's device"):
            validate_soft_target(torch.rand(3, 4, 7, device="meta"), x, 7)


# ---------------------------------------------------------------- custom-op machinery


def _op_args(reduction=1, flags=(True, True, True)):
    x, w, q, b, cw = make_inputs(17, 6, 23, dtype=torch.float32, seed=14)
    return (x.requires_grad_(), w.requires_grad_(), q.float().requires_grad_(), b.requires_grad_(), cw.float(),
            reduction, 0.1, 0.01, 2.0, 4, *flags)  # fmt: skip


def _op(qualified):
    return getattr(torch.ops.infofuse, qualified.split("::")[1]).default


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("flags", [(True, True, True), (False, True, False)])
def test_opcheck_forward(reduction, flags):
    torch.library.opcheck(_op(FORWARD), _op_args(reduction, flags))


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_backward(reduction):
    x, w, q, b, cw, *_ = (a.detach() if isinstance(a, torch.Tensor) else a for a in _op_args(reduction))
    lse = _op(FORWARD)(x, w, q, b, cw, reduction, 0.1, 0.01, 2.0, 4, False, False, False)[1]
    grad_loss = torch.rand(17) + 0.5 if reduction == 0 else torch.tensor(1.3)
    args = (grad_loss, torch.rand(17), x, w, q, b, cw, lse, reduction, 0.1, 0.01, 2.0, 4, True, True, True, True)
    torch.library.opcheck(_op(BACKWARD), args)


def test_fake_kernels_mirror_real_outputs():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for reduction, flags in ((0, (True, True, True)), (1, (True, False, True)), (2, (False, False, False))):
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _op_args(reduction, flags)]
        real = _op(FORWARD)(*args)
        with FakeTensorMode() as mode:
            fake = _op(FORWARD)(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        for r, f in zip(real, fake, strict=True):
            assert (r.shape, r.dtype) == (f.shape, f.dtype)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction):
    x, w, q, b, cw = make_inputs(40, 16, 64, dtype=torch.float32, seed=15)
    cw = cw.float()

    def step(x_, w_, b_, q_):
        loss, lse = ours_fn(x_, w_, q_, linear_bias=b_, weight=cw, reduction=reduction, label_smoothing=0.1,
                            z_loss=1e-3, softcap=4.0, chunk_size=16)  # fmt: skip
        return (loss * 2.0).sum() + 0.5 * lse.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [a.clone().requires_grad_() for a in (x, w, b, q)]
    got = compiled(*leaves)
    got.backward()
    eager = [a.clone().requires_grad_() for a in (x, w, b, q)]
    want = step(*eager)
    want.backward()
    assert_close(got, want, rtol=1e-6, atol=1e-6, name="compiled loss")
    for name, a, e in zip(("dx", "dw", "db", "dq"), leaves, eager, strict=True):
        assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-6, name=name)

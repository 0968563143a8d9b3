"""linear_cross_entropy as a drop-in of torch's: double backward, D = 0, ``options=``, probability targets through
the public function, per-token weights; each against plain PyTorch in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import infofuse
from infofuse import linear_cross_entropy
from tests.test_linear_cross_entropy import IMPLS, make_inputs
from tests.utils import assert_close

pytestmark = pytest.mark.skipif(not infofuse.cpp_available(), reason="needs the C++ extension infofuse._C")

ALL_IMPLS = [*IMPLS, "reference"]


def _dtype(impl):
    return torch.float64 if impl in ("cpu", "reference") else torch.float32


def _grads(loss, leaves):
    return torch.autograd.grad(loss, [t for t in leaves if t is not None])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_refused(impl, reduction):
    """create_graph=True through a kernel backend raises (it returned a gradient without requires_grad, so a
    gradient penalty silently lost its second-order term); a first-order backward of the same graph still runs."""
    x, w, t, b = make_inputs((9,), 7, 13, dtype=_dtype(impl), seed=3)
    x.requires_grad_()
    w.requires_grad_()
    loss = linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, impl=impl).sum()
    with pytest.raises(RuntimeError, match=r"infofuse\.linear_cross_entropy does not support double backward"):
        torch.autograd.grad(loss, x, create_graph=True, retain_graph=True)
    (gx,) = torch.autograd.grad(loss, x)
    ref = infofuse.linear_cross_entropy_reference(x, w, t, linear_bias=b, reduction=reduction).sum()
    (rx,) = torch.autograd.grad(ref, x)
    assert_close(gx, rx.to(gx.dtype), rtol=1e-4, atol=1e-6, name="first-order dx after the refusal")


def test_reference_supports_double_backward():
    x, w, t, b = make_inputs((5,), 4, 7, seed=4)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())

    def fn(x, w, b):
        return linear_cross_entropy(x, w, t, linear_bias=b, impl="reference", z_loss=0.1, label_smoothing=0.2)

    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("bias", [True, False])
def test_zero_features_give_the_bias_only_loss(impl, bias):
    """D = 0: torch's loss of the bias alone (zeros without a bias); it raised a reshape error."""
    dtype = _dtype(impl)
    g = torch.Generator().manual_seed(5)
    x, w = torch.empty(6, 0, dtype=dtype), torch.empty(11, 0, dtype=dtype)
    b = torch.randn(11, generator=g, dtype=dtype).requires_grad_() if bias else None
    t = torch.randint(0, 11, (6,), generator=g)
    ours = linear_cross_entropy(x, w, t, linear_bias=b, impl=impl)
    theirs = F.cross_entropy(F.linear(x, w, b).double(), t)
    assert_close(ours.double(), theirs, rtol=1e-6, atol=1e-7, name="loss")
    if bias:
        (ours_db,) = torch.autograd.grad(ours, b)
        (their_db,) = torch.autograd.grad(theirs, b)
        assert_close(ours_db.double(), their_db, rtol=1e-5, atol=1e-7, name="db")


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyOptions"), reason="torch < 2.13 has no options class")
def test_torch_options_are_accepted_and_batch_chunk_size_is_the_chunk():
    x, w, t, b = make_inputs((40,), 8, 30, seed=6)
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=7, acc_policy="compact")
    kw = {"linear_bias": b, "weight": torch.rand(30, dtype=torch.float64) + 0.5}
    ours = linear_cross_entropy(x, w, t, options=opts, **kw)
    theirs = F.linear_cross_entropy(x, w, t, options=opts, **kw)
    assert_close(ours, theirs, rtol=1e-10, atol=0.0, name="loss with options")
    seen = []
    real = torch.ops.infofuse.linear_cross_entropy_forward

    class Spy:
        def __call__(self, *args):
            seen.append(args[10])  # chunk_size
            return real(*args)

    try:
        torch.ops.infofuse.linear_cross_entropy_forward = Spy()
        linear_cross_entropy(x, w, t, options=opts, impl="cpu")
        linear_cross_entropy(x, w, t, options=opts, impl="cpu", chunk_size=3)
    finally:
        torch.ops.infofuse.linear_cross_entropy_forward = real
    assert seen == [7, 3]


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_through_the_public_function(impl, reduction):
    dtype = _dtype(impl)
    x, w, _, b = make_inputs((3, 5), 9, 17, dtype=dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    q = torch.rand(3, 5, 17, generator=g, dtype=dtype)
    kw = {"weight": torch.rand(17, generator=g, dtype=dtype) + 0.5, "label_smoothing": 0.1, "reduction": reduction}
    leaves = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_()]
    ours = linear_cross_entropy(x, w, q, linear_bias=b, impl=impl, **kw)
    theirs = F.cross_entropy(F.linear(x, w, b).double().reshape(15, 17), q.double().reshape(15, 17), **kw)
    theirs = theirs.reshape(3, 5) if reduction == "none" else theirs
    assert ours.shape == theirs.shape
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    assert_close(ours.double(), theirs, rtol=tol, atol=tol, name="loss")
    for a, c, name in zip(_grads(ours.sum(), leaves), _grads(theirs.sum(), leaves), "xwb", strict=True):
        assert_close(a.double(), c, rtol=tol * 10, atol=tol, name=f"d{name}")


def _token_weighted_truth(x, w, t, b, tau, weight, reduction, z_loss, ignore_index):
    """Per-token losses of plain PyTorch, times τ, reduced with the divisors the unweighted loss has."""
    logits = F.linear(x, w, b).double().reshape(-1, w.shape[0])
    tf = t.reshape(-1)
    valid = tf != ignore_index
    ce = F.cross_entropy(logits, tf, weight=weight, reduction="none", ignore_index=ignore_index)
    zl = z_loss * torch.logsumexp(logits, 1).square() * valid
    tau = tau.reshape(-1).double()
    if reduction == "none":
        return ((ce + zl) * tau).reshape(t.shape)
    if reduction == "sum":
        return ((ce + zl) * tau).sum()
    w_valid = valid.sum() if weight is None else weight[torch.where(valid, tf, 0)].mul(valid).sum()
    return (ce * tau).sum() / w_valid + (zl * tau).sum() / valid.sum()


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "weights_and_z_loss", "ignore_index_past_v"])
def test_token_weight(impl, reduction, options):
    dtype = _dtype(impl)
    ignore = 30 if options == "ignore_index_past_v" else -100  # an ignore_index outside [0, V) but not negative
    x, w, t, b = make_inputs((4, 6), 10, 23, dtype=dtype, seed=9, ignore_index=ignore)
    g = torch.Generator().manual_seed(10)
    tau = (torch.rand(4, 6, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    weight = torch.rand(23, generator=g, dtype=dtype) + 0.5 if options != "plain" else None
    z_loss = 0.05 if options != "plain" else 0.0
    leaves = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), tau]
    kw = {"linear_bias": b, "weight": weight, "reduction": reduction, "z_loss": z_loss, "ignore_index": ignore}
    ours = linear_cross_entropy(x, w, t, token_weight=tau, impl=impl, **kw)
    w64 = None if weight is None else weight.double()
    theirs = _token_weighted_truth(x, w, t, b, tau, w64, reduction, z_loss, ignore)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    assert ours.shape == theirs.shape
    assert_close(ours.double(), theirs, rtol=tol, atol=tol, name="loss")
    for a, c, name in zip(
        _grads(ours.sum(), leaves), _grads(theirs.sum(), leaves), ["x", "w", "b", "tau"], strict=True
    ):
        assert_close(a.double(), c, rtol=tol * 10, atol=tol, name=f"d{name}")


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("case", ["plain", "softcap_bias_chunks", "noncontiguous", "bf16"])
def test_argmax_per_token(impl, case):
    """return_argmax: each token's first index of its largest (softcapped) logit, beside an unchanged loss and lse;
    checked against float64 logits (a pick within rounding of the maximum is allowed: the backends' GEMMs round
    differently), and exact agreement away from near-ties."""
    if case == "bf16" and impl in ("cpu", "reference"):
        dtype = torch.bfloat16
    elif case == "bf16":
        dtype = torch.float16
    else:
        dtype = _dtype(impl)
    kw = {"chunk_size": 5, "softcap": 3.0} if case == "softcap_bias_chunks" else {}
    x, w, t, b = make_inputs((3, 7), 11, 300, seed=12, noncontig=case == "noncontiguous", bias=case != "plain")
    x, w = x.to(dtype), w.to(dtype)
    b = None if b is None else b.to(dtype)
    loss, lse, am = linear_cross_entropy(x, w, t, linear_bias=b, impl=impl, return_lse=True, return_argmax=True, **kw)
    loss2, lse2 = linear_cross_entropy(x, w, t, linear_bias=b, impl=impl, return_lse=True, **kw)
    assert torch.equal(loss, loss2) and torch.equal(lse, lse2)
    assert am.shape == t.shape and am.dtype == torch.int64
    z = F.linear(x.double(), w.double(), None if b is None else b.double())
    if "softcap" in kw:
        z = kw["softcap"] * torch.tanh(z / kw["softcap"])
    top = z.max(-1).values
    picked = z.gather(-1, am.unsqueeze(-1)).squeeze(-1)
    slack = 1e-9 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 0.05) * top.abs().clamp(min=1)
    assert (picked >= top - slack).all(), (picked - top).min()
    second = z.topk(2, -1).values[..., 1]
    clear = top - second > 2 * slack
    assert clear.float().mean() > 0.5
    assert torch.equal(am[clear], z.argmax(-1)[clear])


def test_argmax_takes_the_first_of_equal_logits():
    """Ties (duplicate rows of the weight) go to the first index in every backend, across tiles and chunks."""
    g = torch.Generator().manual_seed(13)
    w = torch.randn(700, 6, generator=g, dtype=torch.float64) * 0.1
    x = torch.randn(9, 6, generator=g, dtype=torch.float64)
    best = torch.tensor([3, 300, 650])
    w[best] = 5.0 * x[:3] / x[:3].norm(dim=1, keepdim=True)  # the clear winners of rows 0-2
    w[[600, 690]] = w[[3, 300]]  # equal copies later in the vocabulary
    t = torch.arange(9)
    for impl in ALL_IMPLS:
        dtype = _dtype(impl)
        _, am = linear_cross_entropy(x.to(dtype), w.to(dtype), t, impl=impl, return_argmax=True, chunk_size=4)
        assert am[:3].tolist() == best.tolist(), impl


def test_argmax_is_for_class_index_targets():
    x, w = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="return_argmax is for class-index targets"):
        linear_cross_entropy(x, w, torch.rand(4, 5), return_argmax=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_new_arguments_compile_fullgraph(impl):
    """token_weight, return_argmax, options and probability targets under torch.compile(fullgraph=True)."""
    dtype = _dtype(impl)
    x, w, t, b = make_inputs((12,), 8, 40, dtype=dtype, seed=14)
    g = torch.Generator().manual_seed(15)
    tau = torch.rand(12, generator=g, dtype=dtype)
    q = torch.rand(12, 40, generator=g, dtype=dtype)

    def step(x, w, b):
        loss, am = linear_cross_entropy(x, w, t, linear_bias=b, token_weight=tau, return_argmax=True, impl=impl)
        soft = linear_cross_entropy(x, w, q, linear_bias=b, impl=impl, z_loss=0.01)
        return loss + soft, am

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (step, compiled):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
        loss, am = fn(*leaves)
        outs.append((loss.detach(), am, *_grads(loss, leaves)))
    for a, c, name in zip(*outs, ["loss", "argmax", "dx", "dw", "db"], strict=True):
        assert_close(a, c, rtol=1e-6, atol=1e-7, name=name)

"""Pairwise InfoNCE, its wrappers and SigLIP: every backend against the dense reference."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import infofuse
from infofuse import clip_loss, info_nce, nt_xent, siglip_loss, supcon_loss
from infofuse.bench.info_nce import open_clip_loss_module
from infofuse.reference import info_nce_reference, siglip_reference
from tests.utils import GPU_IMPLS, assert_close, assert_graded, extra_cuda_bytes, rel_err, to_cuda

IMPLS = ["cpu", "chunked", "fused"]  # the Triton strategies run under TRITON_INTERPRET=1 here (tests/conftest.py)
OPS = {
    "cpu": ("info_nce_forward", "info_nce_backward", "siglip_forward", "siglip_backward"),
    "chunked": (
        "info_nce_chunked_forward",
        "info_nce_chunked_backward",
        "siglip_chunked_forward",
        "siglip_chunked_backward",
    ),
    "fused": ("info_nce_fused_forward", "info_nce_fused_backward", "siglip_fused_forward", "siglip_fused_backward"),
}


def _needs(impl):
    if impl == "cpu" and not hasattr(torch.ops.infofuse, "info_nce_forward"):
        pytest.fail("the C++ extension does not provide infofuse::info_nce_forward")


def embeddings(n, m, d, dtype=torch.float64, *, seed=0, noncontig=False):
    """Unit-norm-ish random embeddings (never zero); non-contiguous as strided views of larger tensors."""
    g = torch.Generator().manual_seed(seed)
    if noncontig:
        q = (torch.randn(n, 2 * d, generator=g, dtype=torch.float64) / math.sqrt(d)).to(dtype)[:, ::2]
        k = (torch.randn(d, m, generator=g, dtype=torch.float64) / math.sqrt(d)).to(dtype).t()
        return q, k
    q = torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    k = torch.randn(m, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return q.to(dtype), k.to(dtype)


def grads(fn, tensors, upstream_seed=1):
    """Loss and gradients of ``fn(*tensors)`` under a non-trivial upstream gradient (per row for "none")."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    loss = fn(*leaves)
    up = (
        torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
        if loss.dim()
        else 1.7
    )
    (loss * up).sum().backward()
    return [loss.detach()] + [t.grad for t in leaves if t.requires_grad]


def compare(impl, fn_ours, fn_ref, tensors, *, low_precision=None):
    """float64 tensors: the cpu backend to rounding, the Triton ones in float32 graded against PyTorch's float32
    error. ``low_precision``: also bf16/fp16 copies graded against the reference at that dtype, both against the
    float64 truth on the same (rounded) values."""
    truth = grads(fn_ref, tensors)
    if impl == "cpu":
        ours = grads(fn_ours, tensors)
        for i, (a, b) in enumerate(zip(ours, truth, strict=True)):
            assert a.dtype == b.dtype, i
            assert_close(a, b, rtol=1e-9, atol=1e-12 * max(1.0, b.abs().max().item()), name=f"output {i}")
        return
    for dtype in (torch.float32, *(low_precision or ())):
        cast = [
            t.to(dtype) if t.is_floating_point() and t.dim() == 2 else t.float() if t.is_floating_point() else t
            for t in tensors
        ]
        ours = grads(fn_ours, cast)
        same = grads(fn_ref, cast)
        truth = grads(fn_ref, [t.to(dtype).double() if t.is_floating_point() and t.dim() == 2 else t for t in tensors])
        floor = 1e-6 if dtype == torch.float32 else 1e-4
        for i, (a, b, c) in enumerate(zip(ours, same, truth, strict=True)):
            assert a.dtype == b.dtype, f"output {i}: {a.dtype} != {b.dtype}"
            assert_graded(a, b, c, name=f"output {i} ({dtype})", factor=2.0, floor=floor)


# ---------------------------------------------------------------- the references themselves


def test_reference_is_clip_and_cross_entropy():
    q, k = embeddings(9, 9, 5, seed=1)
    s = torch.tensor(3.0, dtype=torch.float64)
    logits = s * q @ k.T
    labels = torch.arange(9)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert_close(info_nce_reference(q, k, scale=s, symmetric=True), want, rtol=1e-12, atol=0, name="clip")
    t = torch.randint(0, 14, (9,), generator=torch.Generator().manual_seed(2))
    q2, k2 = embeddings(9, 14, 5, seed=3)
    want = F.cross_entropy(2.0 * q2 @ k2.T, t, reduction="none")
    assert_close(
        info_nce_reference(q2, k2, scale=2.0, target=t, reduction="none"),
        want,
        rtol=1e-12,
        atol=0,
        name="extra negatives",
    )


def test_reference_supcon_matches_its_docstring_formula():
    f, _ = embeddings(12, 12, 6, seed=4)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 1, 0, 4, 2])  # classes 3 and 4 have no positive
    t = 0.3
    logits = (f @ f.T / t).fill_diagonal_(float("-inf"))
    log_prob = logits.log_softmax(1)
    positive = (labels[:, None] == labels[None, :]).fill_diagonal_(False)
    per_row = -(log_prob.masked_fill(~positive, 0.0)).sum(1) / positive.sum(1)
    want = per_row[positive.any(1)].mean()
    got = info_nce_reference(f, f, scale=1 / t, labels=labels, supcon=True)
    assert_close(got, want, rtol=1e-12, atol=0, name="supcon")


def test_reference_siglip_and_nt_xent_formulas():
    q, k = embeddings(7, 10, 4, seed=5)
    logits = 5.0 * q @ k.T - 1.5
    y = 2 * torch.eye(7, 10, dtype=torch.float64) - 1
    want = -F.logsigmoid(y * logits).sum() / 7
    assert_close(siglip_reference(q, k, scale=5.0, bias=-1.5), want, rtol=1e-12, atol=0, name="siglip")
    z1, z2 = embeddings(6, 6, 4, seed=6)
    z = torch.cat([z1, z2])
    logits = (z @ z.T / 0.2).fill_diagonal_(float("-inf"))
    want = F.cross_entropy(logits, (torch.arange(12) + 6) % 12)
    assert_close(nt_xent(z1, z2, 0.2, impl="reference"), want, rtol=1e-12, atol=0, name="nt_xent")


# ---------------------------------------------------------------- every backend against the reference

CASES = {
    # name: (N, M, D, keywords of info_nce beyond scale)
    "extra_negatives": (67, 131, 37, {}),
    "target": (67, 131, 37, {"target": "random"}),
    "symmetric": (67, 67, 37, {"symmetric": True, "target": "permutation"}),
    "labels": (67, 131, 37, {"labels": True}),
    "labels_symmetric": (67, 67, 37, {"labels": True, "symmetric": True}),
    "exclude_self": (67, 67, 37, {"exclude_self": True, "target": "shifted"}),
    "one": (1, 1, 1, {}),
}


def _case(name, dtype=torch.float64, noncontig=False, seed=0):
    n, m, d, kw = CASES[name]
    q, k = embeddings(n, m, d, dtype, seed=seed, noncontig=noncontig)
    g = torch.Generator().manual_seed(seed + 100)
    kw = dict(kw)
    if kw.get("target") == "random":
        kw["target"] = torch.randint(0, m, (n,), generator=g)
    elif kw.get("target") == "permutation":
        kw["target"] = torch.randperm(n, generator=g)
    elif kw.get("target") == "shifted":
        kw["target"] = (torch.arange(n) + 5) % n
    if kw.pop("labels", False):
        kw["labels"] = torch.randint(0, 4, (n,), generator=g)
        if m != n:
            kw["key_labels"] = torch.randint(0, 4, (m,), generator=g)
    return q, k, kw


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_info_nce_matches_reference(impl, case, reduction):
    _needs(impl)
    q, k, kw = _case(case)
    scale = torch.tensor(4.5, dtype=torch.float64)

    def ours(q, k, s):
        return info_nce(q, k, scale=s, reduction=reduction, impl=impl, **kw)

    def ref(q, k, s):
        return info_nce_reference(q, k, scale=s, reduction=reduction, **kw)

    compare(impl, ours, ref, [q, k, scale])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["symmetric", "labels"])
def test_info_nce_low_precision_graded(impl, case):
    _needs(impl)
    q, k, kw = _case(case, seed=3)

    def ours(q, k, s):
        return info_nce(q, k, scale=s, impl=impl, **kw)

    def ref(q, k, s):
        return info_nce_reference(q, k, scale=s, **kw)

    if impl == "cpu":  # the cpu backend's float64 check is the test above; here its bf16/fp16
        for dtype in (torch.bfloat16, torch.float16):
            cast = [q.to(dtype), k.to(dtype), torch.tensor(4.5)]
            truth = grads(ref, [q.to(dtype).double(), k.to(dtype).double(), torch.tensor(4.5, dtype=torch.float64)])
            for i, (a, b, c) in enumerate(zip(grads(ours, cast), grads(ref, cast), truth, strict=True)):
                assert a.dtype == b.dtype
                assert_graded(a, b, c, name=f"output {i} ({dtype})", factor=2.0, floor=1e-4)
        return
    compare(
        impl, ours, ref, [q, k, torch.tensor(4.5, dtype=torch.float64)], low_precision=(torch.bfloat16, torch.float16)
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_info_nce_noncontiguous_inputs(impl):
    _needs(impl)
    q, k, kw = _case("labels_symmetric", noncontig=True, seed=5)
    assert not q.is_contiguous() and not k.is_contiguous()
    compare(
        impl,
        lambda q, k, s: info_nce(q, k, scale=s, impl=impl, **kw),
        lambda q, k, s: info_nce_reference(q, k, scale=s, **kw),
        [q, k, torch.tensor(2.0, dtype=torch.float64)],
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_supcon_matches_reference_with_rows_lacking_a_positive(impl, reduction):
    _needs(impl)
    f, _ = embeddings(67, 67, 37, seed=7)
    labels = torch.randint(0, 20, (67,), generator=torch.Generator().manual_seed(7))
    labels[:3] = torch.tensor([100, 101, 102])  # unique labels: no positive
    temperature = torch.tensor(0.25, dtype=torch.float64)

    def ref(f, t):
        return info_nce_reference(f, f, scale=1 / t, labels=labels, supcon=True, reduction=reduction)

    compare(
        impl,
        lambda f, t: supcon_loss(f, labels, t, reduction=reduction, impl=impl),
        ref,
        [f, temperature],
        low_precision=(torch.bfloat16,),
    )
    if reduction == "none":
        x = f if impl == "cpu" else f.float()
        got = supcon_loss(x, labels, temperature.to(x.dtype), reduction="none", impl=impl)
        assert torch.equal(got[:3], torch.zeros(3, dtype=got.dtype)), "rows without a positive must be 0"


@pytest.mark.parametrize("impl", IMPLS)
def test_supcon_without_any_positive_is_zero_not_nan(impl):
    _needs(impl)
    f, _ = embeddings(5, 5, 3, torch.float32, seed=8)
    f.requires_grad_()
    loss = supcon_loss(f, torch.arange(5), 0.5, impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(f.grad).all() and not f.grad.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_supcon_multi_view_input_matches_flattened(impl):
    _needs(impl)
    f = embeddings(18, 1, 6, torch.float32, seed=9)[0].reshape(6, 3, 6)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    flat = torch.cat(f.unbind(1))
    want = supcon_loss(flat, labels.repeat(3), 0.3, impl=impl)
    assert_close(supcon_loss(f, labels, 0.3, impl=impl), want, rtol=0, atol=0, name="multi-view")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(67, 131, 37), (67, 40, 37), (1, 1, 1)])
def test_siglip_matches_reference(impl, reduction, shape):
    _needs(impl)
    n, m, d = shape
    q, k = embeddings(n, m, d, seed=10)
    scale = torch.tensor(7.0, dtype=torch.float64)
    bias = torch.tensor(-3.0, dtype=torch.float64)

    def ref(q, k, s, b):
        return siglip_reference(q, k, scale=s, bias=b, reduction=reduction)

    compare(
        impl,
        lambda q, k, s, b: siglip_loss(q, k, s, b, reduction=reduction, impl=impl),
        ref,
        [q, k, scale, bias],
        low_precision=(torch.bfloat16,) if shape[0] > 1 else None,
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_nt_xent_and_clip_wrappers(impl):
    _needs(impl)
    z1, z2 = embeddings(33, 33, 19, seed=11)
    t = torch.tensor(0.3, dtype=torch.float64)
    compare(
        impl,
        lambda a, b, t: nt_xent(a, b, t, impl=impl),
        lambda a, b, t: nt_xent(a, b, t, impl="reference"),
        [z1, z2, t],
    )
    s = torch.tensor(10.0, dtype=torch.float64)
    compare(
        impl,
        lambda a, b, s: clip_loss(a, b, s, impl=impl),
        lambda a, b, s: clip_loss(a, b, s, impl="reference"),
        [z1, z2, s],
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_float_scale_and_empty_batch(impl):
    _needs(impl)
    q, k = embeddings(20, 30, 8, torch.float32, seed=12)
    want = info_nce(q, k, scale=3.0, impl="reference")
    assert_close(info_nce(q, k, scale=3.0, impl=impl), want, rtol=1e-5, atol=1e-6, name="float scale")
    e = torch.zeros(0, 8, requires_grad=True)
    out = info_nce(e, k, scale=3.0, impl=impl, reduction="sum")
    out.backward()
    assert out.item() == 0.0 and e.grad.shape == (0, 8)


def test_chunked_multiple_chunks(monkeypatch):
    """Row chunks smaller than N (forward, the column pass and backward) give the one-chunk result."""
    from infofuse._ops import info_nce_triton

    q, k, kw = _case("labels_symmetric", torch.float32, seed=13)
    s = torch.tensor(3.0)
    whole = grads(lambda q, k, s: info_nce(q, k, scale=s, impl="chunked", **kw), [q, k, s])
    monkeypatch.setattr(info_nce_triton, "CHUNK_BYTES", 67 * 4 * 10)  # 10 rows per chunk
    parts = grads(lambda q, k, s: info_nce(q, k, scale=s, impl="chunked", **kw), [q, k, s])
    for a, b in zip(parts, whole, strict=True):
        assert_close(a, b, rtol=1e-6, atol=1e-7, name="chunked")
    parts16 = grads(lambda q, k, s: info_nce(q, k, scale=s, impl="chunked", **kw), [q.half(), k.half(), s])
    truth = grads(
        lambda q, k, s: info_nce_reference(q, k, scale=s, compute_dtype=torch.float64, **kw),
        [q.double(), k.double(), s.double()],
    )
    same = grads(lambda q, k, s: info_nce_reference(q, k, scale=s, **kw), [q.half(), k.half(), s])
    for i, (a, b, c) in enumerate(zip(parts16, same, truth, strict=True)):
        assert_graded(a, b, c, name=f"fp16 output {i}", factor=2.0, floor=1e-4)


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_fused_deterministic_mode_is_reproducible(deterministic):
    q, k, kw = _case("labels_symmetric", torch.float32, seed=14)
    s = torch.tensor(3.0)
    first = grads(lambda q, k, s: info_nce(q, k, scale=s, impl="fused", **kw), [q, k, s])
    again = grads(lambda q, k, s: info_nce(q, k, scale=s, impl="fused", **kw), [q, k, s])
    truth = grads(
        lambda q, k, s: info_nce_reference(q, k, scale=s, compute_dtype=torch.float64, **kw),
        [q.double(), k.double(), s.double()],
    )
    for i, (a, b, c) in enumerate(zip(first, again, truth, strict=True)):
        assert torch.equal(a, b), f"output {i} differs between two deterministic runs"
        assert rel_err(a, c) < 1e-5, f"output {i}"


@pytest.mark.parametrize("impl", ["cpu"])
def test_gradcheck_float64(impl):
    _needs(impl)
    q, k, kw = _case("labels_symmetric", seed=15)
    q, k = q[:9], k[:9]
    kw = {"labels": kw["labels"][:9], "symmetric": True}
    s = torch.tensor(2.0, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, s)]
    assert torch.autograd.gradcheck(lambda q, k, s: info_nce(q, k, scale=s, impl=impl, **kw), leaves)
    labels = torch.tensor([0, 1, 0, 1, 2, 0, 3, 1, 2])
    assert torch.autograd.gradcheck(lambda f, t: supcon_loss(f, labels, t, impl=impl), (leaves[0], leaves[2]))
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, s, b: siglip_loss(q, k, s, b, impl=impl), (*leaves, b))


# ---------------------------------------------------------------- double backward


def _contrastive(loss, impl, dtype, seed=30):
    """``loss`` as a function of its floating tensors (embeddings, then scale / temperature / bias) and small
    inputs for it: odd shapes, labels with false negatives, extra keys for info_nce and siglip."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    key_labels = torch.tensor([0, 1, 2, 2, 1, 0, 3])
    q, k = embeddings(6, 7, 5, dtype, seed=seed)
    scalar = torch.tensor(2.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    fns = {
        "info_nce": (
            lambda q, k, s: info_nce(q, k, scale=s, labels=labels, key_labels=key_labels, impl=impl),
            [q, k, scalar],
        ),
        "clip_loss": (lambda q, k, s: clip_loss(q, k, s, impl=impl), [q, k[:6], scalar]),
        "nt_xent": (lambda a, b, t: nt_xent(a, b, t, impl=impl), [q[:3], k[:3], 1 / scalar]),
        "supcon_loss": (lambda f, t: supcon_loss(f, labels, t, impl=impl), [q, 1 / scalar]),
        "siglip_loss": (
            lambda q, k, s, b: siglip_loss(q, k, s, b, impl=impl),
            [q, k, scalar, torch.randn((), generator=g, dtype=scalar.dtype)],
        ),
    }
    return fns[loss]


LOSSES = ["info_nce", "clip_loss", "nt_xent", "supcon_loss", "siglip_loss"]


@pytest.mark.parametrize("loss", LOSSES)
def test_reference_supports_double_backward(loss):
    """impl="reference" is plain PyTorch: its second derivatives (a gradient penalty's) are exact."""
    fn, tensors = _contrastive(loss, "reference", torch.float64)
    leaves = [t.clone().requires_grad_() for t in tensors]
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", LOSSES)
def test_double_backward_is_refused(impl, loss):
    """The kernels' gradients are not differentiable again: create_graph=True raises (it used to fail inside
    torch.mm(out=) or return gradients silently missing their second-order terms), and a first-order backward
    through the same graph still runs and is right."""
    _needs(impl)
    fn, tensors = _contrastive(loss, impl, torch.float32)
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    with pytest.raises(RuntimeError, match=r"infofuse\.\w+ does not support double backward"):
        torch.autograd.grad(out, leaves, create_graph=True)
    out.backward()
    ref_fn, _ = _contrastive(loss, "reference", torch.float32)
    ref_leaves = [t.clone().requires_grad_() for t in tensors]
    ref_fn(*ref_leaves).backward()
    for i, (a, b) in enumerate(zip(leaves, ref_leaves, strict=True)):
        assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, name=f"{loss} grad {i}")


# ---------------------------------------------------------------- custom-op machinery


def _info_nce_op_args(dtype=torch.float32, symmetric=True, supcon=False):
    q, k = embeddings(20, 20, 7, dtype, seed=16)
    labels = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(16))
    t = torch.randperm(20, generator=torch.Generator().manual_seed(17))
    scale = torch.tensor(2.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if supcon:
        return (q, k, scale, torch.zeros(0, dtype=torch.long), labels, labels, None, 1, False, False)
    return (q, k, scale, t, labels, labels, torch.argsort(t) if symmetric else None, 0, False, symmetric)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["symmetric", "rows", "supcon"])
def test_opcheck_info_nce(impl, variant):
    _needs(impl)
    fwd, bwd, _, _ = (getattr(torch.ops.infofuse, name) for name in OPS[impl])
    args = _info_nce_op_args(symmetric=variant == "symmetric", supcon=variant == "supcon")
    q, k, scale = (t.clone().requires_grad_() for t in args[:3])
    torch.library.opcheck(fwd, (q, k, scale, *args[3:]))
    row_loss, row_lse, col_loss, col_lse = fwd(*args)
    grad_col = torch.rand_like(col_loss) if variant == "symmetric" else None
    bargs = (
        torch.rand_like(row_loss),
        grad_col,
        *args[:7],
        row_lse,
        col_lse if variant == "symmetric" else None,
        args[7],
        args[8],
        True,
        True,
        True,
    )
    torch.library.opcheck(bwd, bargs)


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck_siglip(impl):
    _needs(impl)
    _, _, fwd, bwd = (getattr(torch.ops.infofuse, name) for name in OPS[impl])
    q, k = embeddings(20, 25, 7, torch.float32, seed=18)
    s, b = torch.tensor(3.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    torch.library.opcheck(fwd, (q.requires_grad_(), k.requires_grad_(), s, b))
    row = fwd(q, k, s, b)
    torch.library.opcheck(
        bwd, (torch.rand_like(row), q.detach(), k.detach(), s.detach(), b.detach(), True, False, True, True)
    )


def test_triton_ops_share_the_cpp_schemas():
    cpu = [getattr(torch.ops.infofuse, n).default._schema for n in OPS["cpu"]]
    for impl in ("chunked", "fused"):
        for name, want in zip(OPS[impl], cpu, strict=True):
            got = getattr(torch.ops.infofuse, name).default._schema
            assert [(a.name, str(a.type)) for a in got.arguments] == [(a.name, str(a.type)) for a in want.arguments]
            assert [str(r.type) for r in got.returns] == [str(r.type) for r in want.returns]


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_compile_fullgraph(impl):
    _needs(impl)
    q, k = embeddings(24, 24, 8, torch.float32, seed=19)
    labels = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(19))

    def step(q, k, s, b):
        return (
            clip_loss(q, k, s, impl=impl)
            + supcon_loss(q, labels, 1 / s, impl=impl)
            + siglip_loss(q, k, s, b, impl=impl)
        )

    leaves = [t.clone().requires_grad_() for t in (q, k, torch.tensor(2.0), torch.tensor(-1.0))]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves)
    got.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, torch.tensor(2.0), torch.tensor(-1.0))]
    want = step(*ref_leaves)
    want.backward()
    assert_close(got, want, rtol=1e-5, atol=1e-6, name="loss")
    for a, b in zip(leaves, ref_leaves, strict=True):
        assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, name="grad")


def test_modules_store_keywords_and_match_functions():
    q, k = embeddings(16, 16, 6, torch.float32, seed=20)
    labels = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(20))
    s = torch.tensor(5.0)
    assert_close(infofuse.ClipLoss()(q, k, s), clip_loss(q, k, s), rtol=0, atol=0, name="ClipLoss")
    assert_close(
        infofuse.SigLipLoss(reduction="sum")(q, k, s, -2.0),
        siglip_loss(q, k, s, -2.0, reduction="sum"),
        rtol=0,
        atol=0,
        name="SigLipLoss",
    )
    assert_close(infofuse.NTXentLoss(0.2)(q, k), nt_xent(q, k, 0.2), rtol=0, atol=0, name="NTXentLoss")
    assert_close(infofuse.SupConLoss(0.1)(q, labels), supcon_loss(q, labels, 0.1), rtol=0, atol=0, name="SupCon")
    mod = infofuse.InfoNCELoss(symmetric=True, reduction="none")
    assert_close(mod(q, k, s), info_nce(q, k, scale=s, symmetric=True, reduction="none"), rtol=0, atol=0, name="m")
    assert "symmetric=True" in repr(mod)


def _open_clip_losses():
    try:
        return open_clip_loss_module()
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("open-clip-torch is not installed (make install-test installs it)")


def test_agrees_with_open_clip_losses():
    loss_mod = _open_clip_losses()
    q, k = embeddings(32, 32, 16, torch.float32, seed=21)
    s, b = torch.tensor(10.0), torch.tensor(-5.0)
    assert_close(clip_loss(q, k, s), loss_mod.ClipLoss()(q, k, s), rtol=1e-5, atol=1e-6, name="ClipLoss")
    assert_close(siglip_loss(q, k, s, b), loss_mod.SigLipLoss()(q, k, s, b), rtol=1e-5, atol=1e-6, name="SigLip")


# ---------------------------------------------------------------- bad input


def _bad(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_bad_input_is_reported_before_any_kernel():
    q, k = embeddings(6, 8, 4, torch.float32, seed=22)
    sq = q[:, :3]
    _bad(lambda: info_nce(q, sq, scale=1.0), ValueError, r"key must be \(M, D\) with D = .* = 4")
    _bad(lambda: info_nce(q[0], k, scale=1.0), ValueError, r"query must be 2-D")
    _bad(lambda: info_nce(q, k[None], scale=1.0), ValueError, r"key must be 2-D")
    _bad(
        lambda: info_nce(q, k, scale=1.0, target=torch.tensor([0, 1, 2, 3, 4, 8])),
        ValueError,
        r"target\[5\] = 8 is outside \[0, M\) with M = 8",
    )
    _bad(lambda: info_nce(q, k, scale=1.0, symmetric=True), ValueError, r"symmetric=True needs .*M == N")
    _bad(
        lambda: info_nce(q, q, scale=1.0, symmetric=True, target=torch.tensor([0, 0, 1, 2, 3, 4])),
        ValueError,
        "permutation",
    )
    _bad(lambda: info_nce(q, k, scale=1.0, exclude_self=True), ValueError, r"exclude_self=True needs .*M == N")
    _bad(lambda: info_nce(q, q, scale=1.0, exclude_self=True), ValueError, r"target\[0\] = 0")
    _bad(
        lambda: info_nce(q, k, scale=1.0, labels=torch.zeros(5, dtype=torch.long)),
        ValueError,
        r"labels must have shape \(N,\) = \(6,\)",
    )
    _bad(lambda: info_nce(q, k, scale=1.0, labels=torch.zeros(6, dtype=torch.long)), ValueError, "need key_labels")
    _bad(lambda: info_nce(q, k, scale=1.0, labels=torch.zeros(6)), TypeError, "labels must hold integers")
    _bad(lambda: info_nce(q, k, scale=0.0), ValueError, "scale must be > 0")
    _bad(lambda: info_nce(q, k, scale=torch.tensor([1.0, 2.0])), ValueError, "one-element")
    _bad(lambda: nt_xent(q, q, -0.5), ValueError, "temperature must be > 0")
    _bad(
        lambda: supcon_loss(q, torch.zeros(6, dtype=torch.long), torch.tensor(0.0)),
        ValueError,
        "temperature must be > 0",
    )
    _bad(lambda: info_nce(q, k.double(), scale=1.0), TypeError, "key must have query's dtype")
    _bad(lambda: info_nce(q.int(), k.int(), scale=1.0), TypeError, "query must be float32")
    _bad(lambda: info_nce(q, k.to("meta"), scale=1.0), ValueError, "key must be on query's device")
    _bad(lambda: info_nce(q, k, scale=1.0, reduction="avg"), ValueError, "reduction must be")
    _bad(lambda: info_nce(q, k, scale=1.0, impl="cuda"), ValueError, "impl must be")
    _bad(lambda: info_nce(q.double(), k.double(), scale=1.0, impl="fused"), TypeError, "float32, bfloat16")
    _bad(lambda: info_nce(q, k[:4], scale=1.0), ValueError, "needs M >= N")
    _bad(lambda: siglip_loss(q, sq, 1.0, 0.0), ValueError, r"text must be \(M, D\)")
    _bad(lambda: siglip_loss(q, k, "1", 0.0), TypeError, "logit_scale must be a float")
    _bad(lambda: clip_loss(q, k, 1.0), ValueError, r"symmetric=True needs .*M == N")
    _bad(lambda: nt_xent(q, k, 0.5), ValueError, r"z2 must have z1's shape")


INF, NAN = float("inf"), float("nan")
NON_FINITE = {
    # name: (call on float32 q (6, 4), k (6, 4), labels (6,); the ValueError it must raise)
    "scale_inf": (lambda q, k, y, impl: info_nce(q, k, scale=INF, impl=impl), r"^scale must be finite, got inf$"),
    "scale_nan": (lambda q, k, y, impl: info_nce(q, k, scale=NAN, impl=impl), r"^scale must be finite, got nan$"),
    "scale_overflows_float32": (
        lambda q, k, y, impl: info_nce(q, k, scale=1e39, impl=impl),
        r"^scale must be finite in float32, .* got scale = 1e\+39$",
    ),
    "scale_tensor_inf": (
        lambda q, k, y, impl: info_nce(q, k, scale=torch.tensor(INF), impl=impl),
        r"^scale must be finite, got inf$",
    ),
    "clip_logit_scale_tensor_inf": (
        lambda q, k, y, impl: clip_loss(q, k, torch.tensor(INF, requires_grad=True), impl=impl),
        r"^logit_scale must be finite, got inf$",
    ),
    "clip_logit_scale_nan": (lambda q, k, y, impl: clip_loss(q, k, NAN, impl=impl), r"^logit_scale must be finite"),
    "nt_xent_tiny_temperature": (
        lambda q, k, y, impl: nt_xent(q, k, 1e-320, impl=impl),
        r"^1/temperature must be finite in float32, .* got temperature = 1e-320$",
    ),
    "nt_xent_temperature_inf": (
        lambda q, k, y, impl: nt_xent(q, k, INF, impl=impl),
        r"^temperature must be finite, got inf$",
    ),
    "nt_xent_temperature_tensor_nan": (
        lambda q, k, y, impl: nt_xent(q, k, torch.tensor(NAN), impl=impl),
        r"^temperature must be finite, got nan$",
    ),
    "supcon_tiny_temperature": (
        lambda q, k, y, impl: supcon_loss(q, y, 1e-320, impl=impl),
        r"^1/temperature must be finite in float32, .* got temperature = 1e-320$",
    ),
    "supcon_temperature_tensor_reciprocal_overflows_float32": (
        lambda q, k, y, impl: supcon_loss(q, y, torch.tensor(1e-39, dtype=torch.float64), impl=impl),
        r"^1/temperature must be finite in float32, .* got temperature = 1e-39$",
    ),
    "siglip_logit_scale_inf": (
        lambda q, k, y, impl: siglip_loss(q, k, -INF, 0.0, impl=impl),
        r"^logit_scale must be finite, got -inf$",
    ),
    "siglip_logit_bias_nan": (
        lambda q, k, y, impl: siglip_loss(q, k, 2.0, NAN, impl=impl),
        r"^logit_bias must be finite, got nan$",
    ),
    "siglip_logit_bias_tensor_inf": (
        lambda q, k, y, impl: siglip_loss(q, k, 2.0, torch.tensor(INF, requires_grad=True), impl=impl),
        r"^logit_bias must be finite, got inf$",
    ),
}


@pytest.mark.parametrize("impl", [*IMPLS, "reference"])
@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_scale_or_temperature_is_rejected(case, impl):
    """A scale that is not finite, or a temperature whose reciprocal is not, made every loss NaN; it is a
    ValueError naming the argument and its value, before any kernel runs (so for every backend alike)."""
    _needs(impl)
    q, k = embeddings(6, 6, 4, torch.float32, seed=23)
    fn, match = NON_FINITE[case]
    _bad(lambda: fn(q, k, torch.tensor([0, 1, 0, 2, 1, 0]), impl), ValueError, match)


def test_large_finite_scales_pass_in_float64():
    """The finiteness is that of the dtype the loss is computed in: 1e39 is a finite float64 scale."""
    q, k = embeddings(6, 6, 4, torch.float64, seed=24)
    assert torch.isfinite(info_nce(q / 1e37, k / 1e2, scale=1e39))
    assert torch.isfinite(nt_xent(q / 1e38, k / 1e38, 1e-77))


def test_non_finite_tensor_scales_fail_under_compile():
    """Under torch.compile(fullgraph=True) the tensor checks are device assertions (no graph break, no sync)."""
    q, k = embeddings(8, 8, 4, torch.float32, seed=25)

    def step(q, k, s, b, t):
        return clip_loss(q, k, s) + siglip_loss(q, k, s, b) + nt_xent(q, k, t)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    good = (torch.tensor(2.0), torch.tensor(-1.0), torch.tensor(0.5))
    assert_close(compiled(q, k, *good), step(q, k, *good), rtol=1e-5, atol=1e-6, name="finite")
    for name, (s, b, t) in {
        "logit_scale": (INF, -1.0, 0.5),
        "logit_bias": (2.0, NAN, 0.5),
        "temperature": (2.0, -1.0, 1e-320),
    }.items():
        bad = [torch.tensor(x, dtype=torch.float64 if x == 1e-320 else torch.float32) for x in (s, b, t)]
        _bad(lambda bad=bad: compiled(q, k, *bad), RuntimeError, f"infofuse: {name} must be finite")


# ---------------------------------------------------------------- on the GPU (marked gpu: skipped without CUDA)
# From here to the end of the file: symmetric CLIP at a real size, and the interpreter tests' cases with the inputs
# moved to CUDA (the compiled kernels at shapes that defeat their block sizes); formerly in tests/test_gpu.py.


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_clip_loss_large_graded_and_small(impl, dtype):
    """Symmetric CLIP at N = M = 8192, D = 768: gradients graded against dense PyTorch at the same dtype, and the
    extra memory far below the N×M scores."""
    from infofuse import clip_loss
    from infofuse.reference import info_nce_reference

    n, d = 8192, 768
    g = torch.Generator(device="cuda").manual_seed(5)
    img = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1).to(dtype)
    txt = torch.nn.functional.normalize(img.float() + 0.5 * torch.randn(n, d, device="cuda", generator=g), dim=1)
    txt = txt.to(dtype)
    scale = torch.tensor(30.0, device="cuda")

    def run(fn, a, b, s):
        leaves = [t.clone().requires_grad_() for t in (a, b, s)]
        loss = fn(*leaves)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    ours = run(lambda a, b, s: clip_loss(a, b, s, impl=impl), img, txt, scale)
    same = run(lambda a, b, s: info_nce_reference(a, b, scale=s, symmetric=True), img, txt, scale)
    truth = run(
        lambda a, b, s: info_nce_reference(a, b, scale=s, symmetric=True, compute_dtype=torch.float64),
        img.double(),
        txt.double(),
        scale.double(),
    )
    for name, a, b, c in zip(("loss", "dq", "dk", "dscale"), ours, same, truth, strict=True):
        assert_graded(a, b, c, name=f"{impl} {name} ({dtype})", factor=1.5, floor=1e-6)
    extra, _ = extra_cuda_bytes(lambda: run(lambda a, b, s: clip_loss(a, b, s, impl=impl), img, txt, scale))
    extra -= 2 * 2 * img.nbytes  # the clones and their gradients
    # chunked: one score chunk and its probabilities; fused: float32 gradient accumulators (N×D each); never N×M
    from infofuse._ops.info_nce_triton import CHUNK_BYTES

    bound = (2 * CHUNK_BYTES if impl == "chunked" else 0) + 4 * n * d * 4 + 64 * n * 4
    assert extra <= bound, f"{impl}: {extra / 2**20:.1f} MiB above inputs and gradients"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize(
    "case", ["extra_negatives", "target", "symmetric", "labels", "labels_symmetric", "exclude_self", "one"]
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_info_nce_every_case_odd_shape(impl, case, reduction):
    from infofuse import info_nce
    from infofuse.reference import info_nce_reference
    from tests.test_info_nce import _case, compare

    q, k, kw = _case(case, seed=2)
    q, k = to_cuda(q, k)
    kw = {key: v.cuda() if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
    compare(
        impl,
        lambda q, k, s: info_nce(q, k, scale=s, reduction=reduction, impl=impl, **kw),
        lambda q, k, s: info_nce_reference(q, k, scale=s, reduction=reduction, **kw),
        [q, k, torch.tensor(4.5, dtype=torch.float64, device="cuda")],
        low_precision=(torch.bfloat16, torch.float16) if q.shape[0] > 1 else None,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_siglip_supcon_noncontiguous_odd_shape(impl):
    from infofuse import siglip_loss, supcon_loss
    from infofuse.reference import info_nce_reference, siglip_reference
    from tests.test_info_nce import compare, embeddings

    q, k = to_cuda(*embeddings(67, 131, 37, seed=10, noncontig=True))
    s, bias = (
        torch.tensor(7.0, dtype=torch.float64, device="cuda"),
        torch.tensor(-3.0, dtype=torch.float64, device="cuda"),
    )
    compare(
        impl,
        lambda q, k, s, b: siglip_loss(q, k, s, b, impl=impl),
        lambda q, k, s, b: siglip_reference(q, k, scale=s, bias=b),
        [q, k, s, bias],
        low_precision=(torch.bfloat16,),
    )
    f, _ = to_cuda(*embeddings(67, 67, 37, seed=11))
    labels = torch.randint(0, 9, (67,), generator=torch.Generator().manual_seed(12)).cuda()
    compare(
        impl,
        lambda f, s: supcon_loss(f, labels, 1 / s, impl=impl),
        lambda f, s: info_nce_reference(f, f, scale=s, labels=labels, supcon=True),
        [f, torch.tensor(1 / 0.3, dtype=torch.float64, device="cuda")],
    )

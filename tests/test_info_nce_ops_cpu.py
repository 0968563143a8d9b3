"""The CPU kernels of the pairwise ops (``infofuse::info_nce_*``, ``infofuse::siglip_*``) against the dense
references: float64 to rtol 1e-9 (values, and gradients against autograd through the reference), and
bfloat16/float16/float32 graded against the reference at the same dtype, both vs a float64 truth."""

from __future__ import annotations

import math

import pytest
import torch

import infofuse  # noqa: F401  (loads the extension and registers the ops)
from infofuse.reference import info_nce_rows_reference, siglip_rows_reference
from tests.utils import assert_close, assert_graded

ops = torch.ops.infofuse
F64 = dict(rtol=1e-9, atol=1e-12)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(n, m, d, gen, dtype=torch.float64, noncontig=False, same=False):
    """query (n, d), key (m, d): Gaussian, or slices of wider tensors (strided rows and columns)."""
    if noncontig:
        q = torch.randn(2 * n, 3 * d, generator=gen, dtype=torch.float64)[::2, 1::3]
        k = torch.randn(2 * m, 3 * d, generator=gen, dtype=torch.float64)[1::2, ::3]
    else:
        q = torch.randn(n, d, generator=gen, dtype=torch.float64)
        k = torch.randn(m, d, generator=gen, dtype=torch.float64)
    if same:
        k = q
    return q.to(dtype), k.to(dtype)


def _derangement(n, gen):
    """A random permutation with no fixed point (a cycle through a shuffled order)."""
    order = torch.randperm(n, generator=gen)
    target = torch.empty(n, dtype=torch.long)
    target[order] = order.roll(-1)
    return target


class NceCase:
    """One InfoNCE configuration: inputs and the op's integer arguments."""

    def __init__(
        self,
        n,
        m,
        d,
        *,
        mode=0,
        labels=False,
        exclude_self=False,
        want_cols=False,
        scale=1.3,
        seed=0,
        dtype=torch.float64,
        noncontig=False,
        same=False,
        classes=5,
    ):
        gen = _gen(seed)
        self.q, self.k = _pair(n, m, d, gen, dtype, noncontig, same)
        self.scale = torch.tensor(scale, dtype=torch.float32)
        self.mode, self.exclude_self, self.want_cols = mode, exclude_self, want_cols
        if want_cols or exclude_self:
            assert n == m
            self.target = _derangement(n, gen) if exclude_self else torch.randperm(n, generator=gen)
        else:
            self.target = torch.randint(0, max(m, 1), (n,), generator=gen)
        self.col_target = torch.argsort(self.target) if want_cols else None
        self.labels = self.key_labels = None
        if labels or mode == 1:
            self.labels = torch.randint(0, classes, (n,), generator=gen)
            self.key_labels = self.labels.clone() if n == m else torch.randint(0, classes, (m,), generator=gen)
            if mode == 1 and n > 2:
                self.labels[0] = self.key_labels[0] = classes + 7  # a SupCon row without a positive
        self.grad_row = torch.randn(n, generator=gen, dtype=torch.float64)
        self.grad_col = torch.randn(m, generator=gen, dtype=torch.float64) if want_cols else None

    def int_args(self):
        return self.target, self.labels, self.key_labels, self.col_target

    def forward(self, q=None, k=None):
        q = self.q if q is None else q
        k = self.k if k is None else k
        return ops.info_nce_forward(q, k, self.scale, *self.int_args(), self.mode, self.exclude_self, self.want_cols)

    def backward(self, row_lse, col_lse, *, grad_col=True, flags=(True, True, True), q=None, k=None):
        q = self.q if q is None else q
        k = self.k if k is None else k
        gc = self.grad_col if grad_col else None
        return ops.info_nce_backward(
            self.grad_row,
            gc,
            q,
            k,
            self.scale,
            *self.int_args(),
            row_lse,
            col_lse if grad_col else None,
            self.mode,
            self.exclude_self,
            *flags,
        )

    def reference(self, q, k, scale, compute_dtype):
        return info_nce_rows_reference(
            q,
            k,
            scale,
            *self.int_args(),
            mode=self.mode,
            exclude_self=self.exclude_self,
            want_cols=self.want_cols,
            compute_dtype=compute_dtype,
        )

    def reference_grads(self, dtype=torch.float64, compute_dtype=torch.float64, grad_col=True):
        """(row_loss, row_lse, col_loss, col_lse) and autograd's (d query, d key, d scale) of
        Σ grad_row·row_loss + Σ grad_col·col_loss, through the reference at ``dtype``."""
        q = self.q.to(dtype, copy=True).requires_grad_()
        k = self.k.to(dtype, copy=True).requires_grad_()
        scale = self.scale.to(torch.float64 if dtype == torch.float64 else torch.float32, copy=True).requires_grad_()
        out = self.reference(q, k, scale, compute_dtype)
        loss = (self.grad_row.to(out[0].dtype) * out[0]).sum()
        if self.want_cols and grad_col:
            loss = loss + (self.grad_col.to(out[2].dtype) * out[2]).sum()
        grads = torch.autograd.grad(loss, [q, k, scale], allow_unused=True)
        grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, scale), strict=True))
        return out, grads


NCE_CASES = {
    "odd-shape": dict(n=67, m=131, d=37),
    "cols-perm": dict(n=67, m=67, d=37, want_cols=True),
    "tiny": dict(n=1, m=1, d=1),
    "labels": dict(n=67, m=131, d=37, labels=True),
    "labels-cols-self": dict(n=67, m=67, d=37, labels=True, want_cols=True, exclude_self=True),
    "self-cols": dict(n=50, m=50, d=16, exclude_self=True, want_cols=True, same=True, scale=4.0),
    "noncontig-cols": dict(n=40, m=40, d=24, want_cols=True, labels=True, noncontig=True),
    "supcon": dict(n=67, m=67, d=37, mode=1),
    "supcon-noncontig": dict(n=33, m=33, d=9, mode=1, noncontig=True, classes=3),
    "large-scale": dict(n=60, m=60, d=32, want_cols=True, scale=40.0),
    "multi-chunk": dict(n=3000, m=3000, d=6, want_cols=True, labels=True, exclude_self=True, classes=50),
}


@pytest.mark.parametrize("name", list(NCE_CASES))
def test_info_nce_float64(name):
    case = NceCase(**NCE_CASES[name], seed=list(NCE_CASES).index(name))
    n, m, d = case.q.shape[0], case.k.shape[0], case.q.shape[1]
    if name == "noncontig-cols":
        assert not case.q.is_contiguous() and not case.k.is_contiguous()
    got = case.forward()
    (row_loss, row_lse, col_loss, col_lse), (dq, dk, ds) = case.reference_grads()
    assert got[0].dtype == torch.float64
    assert_close(got[0], row_loss.detach(), **F64, name="row_loss")
    assert_close(got[1], row_lse.detach(), **F64, name="row_lse")
    if case.want_cols:
        assert_close(got[2], col_loss.detach(), **F64, name="col_loss")
        assert_close(got[3], col_lse.detach(), **F64, name="col_lse")
    else:
        assert got[2].shape == (0,) and got[3].shape == (0,)
    gq, gk, gs = case.backward(got[1], got[3])
    assert gq.shape == (n, d) and gk.shape == (m, d) and gs.shape == () and gs.dtype == torch.float64
    assert_close(gq, dq, **F64, name="grad_query")
    assert_close(gk, dk, **F64, name="grad_key")
    assert_close(gs, ds, rtol=1e-9, atol=1e-10, name="grad_scale")


def test_info_nce_grad_col_none_and_flags():
    case = NceCase(67, 67, 37, want_cols=True, labels=True, seed=3)
    _, row_lse, _, col_lse = case.forward()
    _, (dq, dk, ds) = case.reference_grads(grad_col=False)
    gq, gk, gs = case.backward(row_lse, col_lse, grad_col=False)
    assert_close(gq, dq, **F64, name="grad_query")
    assert_close(gk, dk, **F64, name="grad_key")
    assert_close(gs, ds, rtol=1e-9, atol=1e-10, name="grad_scale")
    _, (dq, dk, ds) = case.reference_grads()
    for flags in [(True, False, False), (False, True, False), (False, False, True), (False, False, False)]:
        out = case.backward(row_lse, col_lse, flags=flags)
        for flag, got, want in zip(flags, out, (dq, dk, ds), strict=True):
            if flag:
                assert_close(got, want, rtol=1e-9, atol=1e-10, name=f"flags {flags}")
            else:
                assert got.shape == (0,), f"flags {flags}: an unwanted gradient has shape {tuple(got.shape)}"


def test_info_nce_supcon_rows_without_positive():
    case = NceCase(20, 20, 8, mode=1, classes=100, seed=5)  # nearly every label is unique
    row_loss, row_lse, _, _ = case.forward()
    count = (case.labels[:, None] == case.key_labels[None, :]).sum(1) - 1
    assert (count == 0).any() and (count > 0).any()
    assert (row_loss[count == 0] == 0).all()
    assert torch.isfinite(row_lse).all()
    _, (dq, dk, ds) = case.reference_grads()
    gq, gk, gs = case.backward(row_lse, None)
    assert_close(gq, dq, **F64, name="grad_query")
    assert_close(gk, dk, **F64, name="grad_key")
    assert_close(gs, ds, rtol=1e-9, atol=1e-10, name="grad_scale")


@pytest.mark.parametrize("want_cols", [False, True])
def test_info_nce_empty(want_cols):
    m = 0 if want_cols else 5
    case = NceCase(0, m, 7, want_cols=want_cols)
    row_loss, row_lse, col_loss, col_lse = case.forward()
    assert row_loss.shape == row_lse.shape == (0,)
    assert col_loss.shape == col_lse.shape == (0,)
    gq, gk, gs = case.backward(row_lse, col_lse)
    assert gq.shape == (0, 7) and gk.shape == (m, 7)
    assert (gk == 0).all() and gs.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", ["cols", "labels-self", "supcon", "nt-xent"])
def test_info_nce_graded(dtype, config):
    kwargs = {
        "cols": dict(n=96, m=96, d=64, want_cols=True),
        "labels-self": dict(n=96, m=96, d=64, want_cols=True, labels=True, exclude_self=True),
        "supcon": dict(n=96, m=96, d=64, mode=1),
        # self scores far above the rest (scale·|z|² vs scale·z_i·z_j): the self column must leave the max
        "nt-xent": dict(n=96, m=96, d=64, want_cols=True, exclude_self=True, same=True, scale=6.0),
    }[config]
    case = NceCase(**kwargs, seed=11)
    case.q, case.k = case.q.to(dtype), case.k.to(dtype)
    got = case.forward()
    assert got[0].dtype == torch.float32
    truth, truth_grads = case.reference_grads(torch.float64, torch.float64)
    same, same_grads = case.reference_grads(dtype, torch.float32)
    gq, gk, gs = case.backward(got[1], got[3])
    assert gq.dtype == gk.dtype == dtype and gs.dtype == torch.float32
    names = ["row_loss", "row_lse", "col_loss", "col_lse"]
    for name, ours, ref, tru in zip(names, got, same, truth, strict=True):
        if ref is not None:
            assert_graded(ours, ref, tru, name=f"{dtype} {config} {name}", floor=1e-6)
    for name, ours, ref, tru in zip(
        ["grad_query", "grad_key", "grad_scale"], (gq, gk, gs), same_grads, truth_grads, strict=True
    ):
        assert_graded(ours, ref, tru, name=f"{dtype} {config} {name}", floor=1e-6)


def test_info_nce_float32_multi_chunk():
    """Several chunks of float32 scores (2048 rows of 4096 columns each): column states merged across chunks."""
    case = NceCase(4096 + 37, 4096 + 37, 16, want_cols=True, scale=8.0, seed=2, dtype=torch.float32)
    got = case.forward()
    truth, truth_grads = case.reference_grads(torch.float64, torch.float64)
    same, same_grads = case.reference_grads(torch.float32, torch.float32)
    for name, ours, ref, tru in zip(["row_loss", "row_lse", "col_loss", "col_lse"], got, same, truth, strict=True):
        assert_graded(ours, ref, tru, name=name, floor=1e-6)
    out = case.backward(got[1], got[3])
    for name, ours, ref, tru in zip(
        ["grad_query", "grad_key", "grad_scale"], out, same_grads, truth_grads, strict=True
    ):
        assert_graded(ours, ref, tru, name=name, floor=1e-6)


def test_info_nce_one_class_multi_chunk():
    """One label for all: every column but the target leaves each row's softmax, so most columns are blocked in
    every row of a chunk (the column state must stay −inf/0 there and merge later)."""
    case = NceCase(3000, 3000, 4, want_cols=True, labels=True, exclude_self=True, classes=1, seed=9)
    got = case.forward()
    (row_loss, row_lse, col_loss, col_lse), (dq, dk, ds) = case.reference_grads()
    for name, ours, ref in zip(
        ["row_loss", "row_lse", "col_loss", "col_lse"], got, (row_loss, row_lse, col_loss, col_lse), strict=True
    ):
        assert_close(ours, ref.detach(), **F64, name=name)
    gq, gk, gs = case.backward(got[1], got[3])
    assert_close(gq, dq, **F64, name="grad_query")
    assert_close(gk, dk, **F64, name="grad_key")
    assert_close(gs, ds, rtol=1e-9, atol=1e-10, name="grad_scale")


def test_info_nce_rows_times_columns_above_int32():
    """N·M > 2³¹ in float32, checked against closed forms: q = 1 (the last row 2), k = 0 but the last key 1, every
    target the last column. Row i has M − 1 scores 0 and one score s·q_i."""
    n, m = 65537, 32769
    assert n * m > 2**31
    q = torch.ones(n, 1)
    q[-1] = 2.0
    k = torch.zeros(m, 1)
    k[-1] = 1.0
    s = 3.0
    target = torch.full((n,), m - 1)
    row_loss, row_lse, _, _ = ops.info_nce_forward(q, k, torch.tensor(s), target, None, None, None, 0, False, False)
    z = torch.tensor([(m - 1) + math.exp(s * qi) for qi in (1.0, 2.0)], dtype=torch.float64)
    assert_close(row_lse[[0, -1]], z.log(), rtol=1e-6, atol=0, name="row_lse")
    assert_close(row_loss[[0, -1]], z.log() - torch.tensor([s, 2 * s], dtype=torch.float64), rtol=1e-5, atol=0)
    gq, gk, gs = ops.info_nce_backward(
        torch.ones(n), None, q, k, torch.tensor(s), target, None, None, None, row_lse, None, 0, False, True, True, True
    )
    # G_ij = softmax_ij − [j = M − 1]; grad_query_i = s·G_i,M−1; grad_key_j = s·Σ_i G_ij·q_i; grad_s = Σ_i q_i·G_i,M−1
    p_last = torch.tensor([math.exp(s * qi) for qi in (1.0, 2.0)], dtype=torch.float64) / z
    assert_close(gq[[0, -1], 0], s * (p_last - 1), rtol=1e-5, atol=0, name="grad_query")
    want_k0 = s * ((n - 1) / z[0] + 2 / z[1])
    want_klast = s * ((n - 1) * (p_last[0] - 1) + 2 * (p_last[1] - 1))
    assert_close(
        gk[[0, m // 2, -1], 0], torch.stack([want_k0, want_k0, want_klast]), rtol=1e-4, atol=0, name="grad_key"
    )
    want_s = (n - 1) * (p_last[0] - 1) + 2 * (p_last[1] - 1)
    assert_close(gs, want_s, rtol=1e-4, atol=0, name="grad_scale")


def test_info_nce_errors():
    case = NceCase(8, 8, 4, want_cols=True)
    with pytest.raises(ValueError, match="target"):
        ops.info_nce_forward(case.q, case.k, case.scale, case.target + 8, None, None, None, 0, False, False)
    with pytest.raises(TypeError, match="key"):
        ops.info_nce_forward(case.q, case.k.float(), case.scale, case.target, None, None, None, 0, False, False)
    with pytest.raises(ValueError, match="col_target"):
        ops.info_nce_forward(case.q, case.k, case.scale, case.target, None, None, None, 0, False, True)
    with pytest.raises(ValueError, match="labels"):
        ops.info_nce_forward(case.q, case.k, case.scale, case.target, None, None, None, 1, False, False)
    with pytest.raises(ValueError, match="key"):
        ops.info_nce_forward(case.q, case.k[:, :3], case.scale, case.target, None, None, None, 0, False, False)


def test_info_nce_opcheck_schema():
    case = NceCase(9, 9, 5, want_cols=True, labels=True, exclude_self=True)
    out = case.forward()
    torch.library.opcheck(
        ops.info_nce_forward.default,
        (case.q, case.k, case.scale, *case.int_args(), 0, True, True),
        test_utils="test_schema",
    )
    args = (case.grad_row, case.grad_col, case.q, case.k, case.scale, *case.int_args(), out[1], out[3], 0, True)
    torch.library.opcheck(ops.info_nce_backward.default, (*args, True, True, True), test_utils="test_schema")


def test_info_nce_refuses_double_backward():
    """The op's autograd formula raises under create_graph=True (info_nce_backward is not differentiable again:
    without the check the gradient silently lacked its second-order terms); first order through the same graph
    still runs and is right."""
    case = NceCase(9, 9, 5, want_cols=True, labels=True, seed=13)
    q, k, s = (t.clone().requires_grad_() for t in (case.q, case.k, case.scale.double()))
    row_loss, _, col_loss, _ = ops.info_nce_forward(q, k, s, *case.int_args(), 0, False, True)
    loss = (case.grad_row * row_loss).sum() + (case.grad_col * col_loss).sum()
    with pytest.raises(RuntimeError, match=r"infofuse\.info_nce does not support double backward"):
        torch.autograd.grad(loss, [q, k, s], create_graph=True)
    gq, gk, gs = torch.autograd.grad(loss, [q, k, s])
    _, (dq, dk, ds) = case.reference_grads()
    assert_close(gq, dq, **F64, name="grad_query")
    assert_close(gk, dk, **F64, name="grad_key")
    assert_close(gs, ds, rtol=1e-9, atol=1e-10, name="grad_scale")


# ---------------------------------------------------------------------------------------------------------------
# SigLIP


def _siglip_reference_grads(q, k, scale, bias, grad_row, dtype, compute_dtype):
    q = q.to(dtype, copy=True).requires_grad_()
    k = k.to(dtype, copy=True).requires_grad_()
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    s = scale.to(pdt, copy=True).requires_grad_()
    b = bias.to(pdt, copy=True).requires_grad_()
    row = siglip_rows_reference(q, k, s, b, compute_dtype=compute_dtype)
    grads = torch.autograd.grad((grad_row.to(row.dtype) * row).sum(), [q, k, s, b], allow_unused=True)
    return row, tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, s, b), strict=True))


@pytest.mark.parametrize(
    "n,m,d,noncontig",
    [(67, 131, 37, False), (131, 67, 37, True), (1, 1, 1, False), (50, 50, 12, True), (3000, 2900, 5, False)],
)
def test_siglip_float64(n, m, d, noncontig):
    gen = _gen(n + m + d)
    q, k = _pair(n, m, d, gen, noncontig=noncontig)
    scale, bias = torch.tensor(2.5), torch.tensor(-3.0)
    grad_row = torch.randn(n, generator=gen, dtype=torch.float64)
    row, (dq, dk, ds, db) = _siglip_reference_grads(q, k, scale, bias, grad_row, torch.float64, torch.float64)
    got = ops.siglip_forward(q, k, scale, bias)
    assert_close(got, row.detach(), **F64, name="row_loss")
    gq, gk, gs, gb = ops.siglip_backward(grad_row, q, k, scale, bias, True, True, True, True)
    assert_close(gq, dq, **F64, name="grad_query")
    assert_close(gk, dk, **F64, name="grad_key")
    assert_close(gs, ds, rtol=1e-9, atol=1e-10, name="grad_scale")
    assert_close(gb, db, rtol=1e-9, atol=1e-10, name="grad_bias")
    for flags in [(True, False, False, False), (False, True, False, True), (False, False, True, False)]:
        out = ops.siglip_backward(grad_row, q, k, scale, bias, *flags)
        for flag, o, want in zip(flags, out, (dq, dk, ds, db), strict=True):
            if flag:
                assert_close(o, want, rtol=1e-9, atol=1e-10, name=f"flags {flags}")
            else:
                assert o.shape == (0,)


def test_siglip_empty():
    q, k = _pair(0, 4, 3, _gen(0))
    assert ops.siglip_forward(q, k, torch.tensor(1.0), torch.tensor(0.0)).shape == (0,)
    gq, gk, gs, gb = ops.siglip_backward(
        torch.zeros(0), q, k, torch.tensor(1.0), torch.tensor(0.0), True, True, True, True
    )
    assert gq.shape == (0, 3) and (gk == 0).all() and gk.shape == (4, 3) and gs.item() == 0 and gb.item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_siglip_graded(dtype):
    gen = _gen(7)
    q, k = _pair(96, 80, 64, gen)
    q, k = q.to(dtype), k.to(dtype)
    scale, bias = torch.tensor(3.0), torch.tensor(-10.0)
    grad_row = torch.randn(96, generator=gen, dtype=torch.float64)
    truth, truth_grads = _siglip_reference_grads(q, k, scale, bias, grad_row, torch.float64, torch.float64)
    same, same_grads = _siglip_reference_grads(q, k, scale, bias, grad_row, dtype, torch.float32)
    got = ops.siglip_forward(q, k, scale, bias)
    assert got.dtype == torch.float32
    assert_graded(got, same, truth, name=f"{dtype} row_loss", floor=1e-6)
    out = ops.siglip_backward(grad_row, q, k, scale, bias, True, True, True, True)
    assert out[0].dtype == out[1].dtype == dtype
    for name, ours, ref, tru in zip(["dq", "dk", "dscale", "dbias"], out, same_grads, truth_grads, strict=True):
        assert_graded(ours, ref, tru, name=f"{dtype} {name}", floor=1e-6)


def test_siglip_refuses_double_backward():
    """As for info_nce: create_graph=True raises, the first-order gradient through the same graph is right."""
    gen = _gen(14)
    q0, k0 = _pair(7, 9, 4, gen)
    grad_row = torch.randn(7, generator=gen, dtype=torch.float64)
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    loss = (grad_row * ops.siglip_forward(q, k, s, b)).sum()
    with pytest.raises(RuntimeError, match=r"infofuse\.siglip_loss does not support double backward"):
        torch.autograd.grad(loss, [q, k, s, b], create_graph=True)
    got = torch.autograd.grad(loss, [q, k, s, b])
    _, want = _siglip_reference_grads(q0, k0, s.detach(), b.detach(), grad_row, torch.float64, torch.float64)
    for name, a, w in zip(["grad_query", "grad_key", "grad_scale", "grad_bias"], got, want, strict=True):
        assert_close(a, w, rtol=1e-9, atol=1e-10, name=name)

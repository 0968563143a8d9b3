"""infofuse.linear_kl_divergence: every backend against the plain-PyTorch reference, in float64 where the
backend computes float64 and graded against PyTorch's own error elsewhere; options, autograd, custom-op checks,
torch.compile and bad input."""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import infofuse
from infofuse import LinearKLDivergence, linear_kl_divergence
from infofuse.reference import linear_kl_divergence_reference
from tests.utils import assert_close, assert_graded

IMPLS = ["cpu", "chunked", "fused"]
F64_IMPLS = {"cpu"}  # the Triton kernels compute in float32: graded against PyTorch's float32 error
OPS = {
    "cpu": "linear_kl_divergence",
    "chunked": "linear_kl_divergence_chunked",
    "fused": "linear_kl_divergence_fused",
}
N, DS, DT, V = 37, 23, 29, 107  # odd sizes: ragged Triton tiles (BLOCK_V 128) and chunks
BETAS = [0.0, 0.3, 1.0]
NAMES = ("xs", "ws", "bs", "xt", "wt", "bt")


def make_inputs(n=N, ds=DS, dt=DT, v=V, *, dtype=torch.float64, seed=0, bias=True, noncontiguous=False, ignore=True):
    """Random heads whose logits have spread (scale ~3), ignored targets at every fifth token."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        if noncontiguous and len(shape) == 2:  # a column slice of a wider tensor: strides (2·cols, 1)
            full = torch.randn(shape[0], 2 * shape[1], generator=g, dtype=torch.float64)
            return (full[:, ::2] * scale).to(dtype)
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    t = torch.randint(0, v, (n,), generator=g)
    if ignore:
        t[::5] = -100
    return {
        "xs": rnd(n, ds),
        "ws": rnd(v, ds, scale=3.0 / math.sqrt(ds)),
        "bs": rnd(v, scale=0.5) if bias else None,
        "xt": rnd(n, dt),
        "wt": rnd(v, dt, scale=3.0 / math.sqrt(dt)),
        "bt": rnd(v, scale=0.5) if bias else None,
        "target": t,
    }


def run(fn, inp, *, teacher_requires_grad=True, grad_seed=1, **kw):
    """Loss and the gradients of every tensor input (None where none flows), for a random upstream gradient."""
    leaves = {k: (inp[k].detach().clone().requires_grad_() if inp[k] is not None else None) for k in NAMES}
    loss = fn(
        leaves["xs"],
        leaves["ws"],
        leaves["xt"],
        leaves["wt"],
        student_bias=leaves["bs"],
        teacher_bias=leaves["bt"],
        target=inp["target"],
        teacher_requires_grad=teacher_requires_grad,
        **kw,
    )
    g = torch.rand(loss.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64) + 0.5
    loss.backward(g.to(loss.dtype))
    out = {"loss": loss.detach()}
    out.update({"d" + k: (leaves[k].grad if leaves[k] is not None else None) for k in NAMES})
    return out


def ref_fn(xs, ws, xt, wt, *, teacher_requires_grad=True, compute_dtype=torch.float32, **kw):
    kw.pop("impl", None)
    kw.pop("chunk_size", None)
    if not teacher_requires_grad:
        xt, wt = xt.detach(), wt.detach()
        kw["teacher_bias"] = None if kw["teacher_bias"] is None else kw["teacher_bias"].detach()
    return linear_kl_divergence_reference(xs, ws, xt, wt, compute_dtype=compute_dtype, **kw)


def truth_fn(xs, ws, xt, wt, **kw):
    return ref_fn(xs, ws, xt, wt, compute_dtype=torch.float64, **kw)


def as_dtype(inp, dtype):
    return {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in inp.items()}


def check(impl, inp, **kw):
    """A backend against the reference: to rounding in float64 (cpu), else graded in float32 against the float64
    truth beside PyTorch's float32 error."""
    if impl in F64_IMPLS:
        ours = run(linear_kl_divergence, inp, impl=impl, **kw)
        want = run(truth_fn, inp, **kw)
        for key, ref in want.items():
            if ref is None:
                assert ours[key] is None, f"{key}: a gradient flowed where the reference has none"
                continue
            assert ours[key].dtype == ref.dtype, key
            scale = ref.abs().nan_to_num(0.0).max().item() if ref.numel() else 1.0
            assert_close(ours[key], ref, rtol=1e-9, atol=1e-9 * max(scale, 1e-6), name=f"{key} ({impl})")
        return ours
    inp32 = as_dtype(inp, torch.float32)
    ours = run(linear_kl_divergence, inp32, impl=impl, **kw)
    same = run(ref_fn, inp32, **kw)
    truth = run(truth_fn, inp, **kw)
    for key, t in truth.items():
        if t is None:
            assert ours[key] is None and same[key] is None, key
            continue
        assert ours[key].dtype == same[key].dtype and ours[key].shape == same[key].shape, key
        assert_graded(ours[key], same[key], t, name=f"{key} ({impl})", factor=2.0, floor=1e-6)
    return ours


# ---------------------------------------------------------------- the reference itself


def test_reference_against_explicit_formula():
    """The reference against loops written from the definitions, float64, with masking, bias and T."""
    inp = make_inputs(9, 5, 7, 11, seed=3)
    temp = 1.3
    zs = (inp["xs"] @ inp["ws"].T + inp["bs"]) / temp
    zt = (inp["xt"] @ inp["wt"].T + inp["bt"]) / temp
    q, p = zs.softmax(-1), zt.softmax(-1)
    valid = inp["target"] != -100
    for beta in BETAS + [0.5, 0.9]:
        rows = []
        for i in range(9):
            if beta == 0.0:
                d = sum(p[i, j] * math.log(p[i, j] / q[i, j]) for j in range(11))
            elif beta == 1.0:
                d = sum(q[i, j] * math.log(q[i, j] / p[i, j]) for j in range(11))
            else:
                m = [beta * p[i, j] + (1 - beta) * q[i, j] for j in range(11)]
                d = beta * sum(p[i, j] * math.log(p[i, j] / m[j]) for j in range(11))
                d += (1 - beta) * sum(q[i, j] * math.log(q[i, j] / m[j]) for j in range(11))
            rows.append(float(d) if valid[i] else 0.0)
        rows = torch.tensor(rows, dtype=torch.float64)
        kw = dict(student_bias=inp["bs"], teacher_bias=inp["bt"], temperature=temp, beta=beta, target=inp["target"])
        args = (inp["xs"], inp["ws"], inp["xt"], inp["wt"])
        got = linear_kl_divergence_reference(*args, **kw, reduction="none", compute_dtype=torch.float64)
        assert_close(got, rows, rtol=1e-12, atol=1e-14, name=f"per-token beta={beta}")
        mean = linear_kl_divergence_reference(*args, **kw, compute_dtype=torch.float64)
        assert_close(mean, rows.sum() / valid.sum(), rtol=1e-12, atol=0, name="mean")


def test_forward_kl_is_torch_kl_div_batchmean():
    inp = make_inputs(seed=4, ignore=False)
    got = linear_kl_divergence(inp["xs"], inp["ws"], inp["xt"], inp["wt"], impl="cpu")
    log_q = F.log_softmax(inp["xs"] @ inp["ws"].T, -1)
    log_p = F.log_softmax(inp["xt"] @ inp["wt"].T, -1)
    want = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    assert_close(got, want, rtol=1e-10, atol=0, name="forward KL")


# ---------------------------------------------------------------- every option, every backend

OPTION_SETS = {
    # name: (make_inputs kwargs, call kwargs)
    "plain": ({"bias": False}, {"target": "none"}),
    "everything": ({"noncontiguous": True}, {"temperature": 1.7, "teacher_requires_grad": True, "chunk_size": 8}),
    "frozen_teacher": ({}, {"temperature": 0.5, "teacher_requires_grad": False}),
}


def _case(option_set, seed):
    make_kw, call_kw = OPTION_SETS[option_set]
    inp = make_inputs(seed=seed, **make_kw)
    call_kw = dict(call_kw)
    if call_kw.pop("target", None) == "none":
        inp["target"] = None
    return inp, call_kw


def _reference_cases():
    """Every (impl, beta, reduction, option set), less the Triton paths' "sum" / "none" on the lighter option
    sets: the interpreter is slow, and "sum" differs from "mean" by the divisor only, which the cpu cases check
    (chunked and fused keep "sum" and "none" on the option set with everything, and "none" with a frozen
    teacher)."""
    for impl, beta, reduction, option_set in itertools.product(IMPLS, BETAS, ["mean", "sum", "none"], OPTION_SETS):
        light = option_set != "everything" and reduction != "mean"
        if impl in ("chunked", "fused") and light and (reduction, option_set) != ("none", "frozen_teacher"):
            continue
        yield impl, beta, reduction, option_set


@pytest.mark.parametrize(("impl", "beta", "reduction", "option_set"), list(_reference_cases()))
def test_matches_reference(impl, beta, reduction, option_set):
    inp, kw = _case(option_set, seed=zlib.crc32(f"{beta}-{reduction}-{option_set}".encode()) % 1000)
    ours = check(impl, inp, beta=beta, reduction=reduction, **kw)
    if kw.get("teacher_requires_grad") is False:
        assert ours["dxt"] is None and ours["dwt"] is None and ours["dbt"] is None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_low_precision_graded_against_pytorch(impl, dtype, beta):
    """bf16/fp16 heads: each output's error against the float64 truth at most twice PyTorch's own at that dtype
    (F.linear in the dtype, float32 softmaxes), plus a floor of a few float32 roundings."""
    inp = as_dtype(make_inputs(seed=11, noncontiguous=True), dtype)
    kw = dict(beta=beta, temperature=1.5, reduction="mean", teacher_requires_grad=True, chunk_size=16)
    ours = run(linear_kl_divergence, inp, impl=impl, **kw)
    same = run(ref_fn, inp, **kw)
    truth = run(truth_fn, as_dtype(inp, torch.float64), **kw)
    assert ours["loss"].dtype == torch.float32
    for key in truth:
        assert ours[key].dtype == dtype or key == "loss", key
        floor = 1e-6 if key == "loss" else 1e-3
        assert_graded(ours[key], same[key], truth[key], name=f"{key} ({impl}, {dtype})", factor=2.0, floor=floor)


@pytest.mark.parametrize("impl", IMPLS)
def test_three_dim_input_and_module(impl):
    inp = make_inputs(seed=5)
    shaped = dict(inp)
    for k in ("xs", "xt"):
        shaped[k] = inp[k].reshape(1, N, -1)
    shaped["target"] = inp["target"].reshape(1, N)
    module = LinearKLDivergence(beta=0.3, temperature=2.0, reduction="none", impl=impl)
    dt = torch.float64 if impl in F64_IMPLS else torch.float32
    s = as_dtype(shaped, dt)
    got = module(s["xs"], s["ws"], s["xt"], s["wt"], s["target"], s["bs"], s["bt"])
    want = truth_fn(
        inp["xs"],
        inp["ws"],
        inp["xt"],
        inp["wt"],
        student_bias=inp["bs"],
        teacher_bias=inp["bt"],
        target=inp["target"],
        beta=0.3,
        temperature=2.0,
        reduction="none",
    )
    assert got.shape == (1, N)
    tol = 1e-9 if impl in F64_IMPLS else 1e-5
    assert_close(got.reshape(-1), want, rtol=tol, atol=tol, name="module none")
    assert "beta=0.3" in repr(module)


# ---------------------------------------------------------------- autograd behaviour


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_tokens_ignored(impl, reduction):
    inp = make_inputs(seed=6)
    inp["target"] = torch.full((N,), -100)
    dt = torch.float64 if impl in F64_IMPLS else torch.float32
    out = run(linear_kl_divergence, as_dtype(inp, dt), impl=impl, reduction=reduction)
    assert out["loss"].isnan().item() == (reduction == "mean")
    for key in ("dxs", "dws", "dbs", "dxt", "dwt", "dbt"):
        assert out[key].abs().max().item() == 0.0, key


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_tokens(impl, reduction):
    """N = 0: "mean" is NaN (0/0, as the reference and F.cross_entropy), "sum" 0, "none" empty; zero gradients."""
    xs, ws = torch.randn(0, 3).requires_grad_(), torch.randn(5, 3).requires_grad_()
    loss = linear_kl_divergence(xs, ws, torch.randn(0, 4), torch.randn(5, 4), impl=impl, reduction=reduction)
    want = linear_kl_divergence_reference(xs, ws, torch.randn(0, 4), torch.randn(5, 4), reduction=reduction)
    assert loss.shape == want.shape and torch.equal(loss.isnan(), want.isnan())
    assert torch.equal(loss.detach().nan_to_num(), want.detach().nan_to_num())
    loss.sum().backward()
    assert xs.grad.shape == (0, 3) and ws.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_teacher_requires_grad_off_by_default(impl):
    inp = as_dtype(make_inputs(seed=7), torch.float32)
    leaves = {k: inp[k].clone().requires_grad_() for k in NAMES}
    loss = linear_kl_divergence(leaves["xs"], leaves["ws"], leaves["xt"], leaves["wt"], impl=impl, beta=0.3)
    loss.backward()
    assert leaves["xs"].grad is not None and leaves["ws"].grad is not None
    assert leaves["xt"].grad is None and leaves["wt"].grad is None


@pytest.mark.parametrize("impl", IMPLS)
def test_retain_graph_second_backward_and_no_double_backward(impl):
    inp = as_dtype(make_inputs(seed=8), torch.float32)
    xs = inp["xs"].clone().requires_grad_()
    loss = linear_kl_divergence(xs, inp["ws"], inp["xt"], inp["wt"], impl=impl, beta=1.0, target=inp["target"])
    (g1,) = torch.autograd.grad(loss, xs, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, xs)  # the forward's formed gradient is handed over once, then recomputed
    assert_close(g2, g1, rtol=1e-5, atol=1e-7, name="second backward")
    loss = linear_kl_divergence(xs, inp["ws"], inp["xt"], inp["wt"], impl=impl, beta=1.0)
    with pytest.raises(RuntimeError, match="double backward"):
        (g,) = torch.autograd.grad(loss, xs, create_graph=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_teacher_only_gradients_and_expanded_upstream_gradient(impl):
    """Only the teacher requires grad (student frozen), reduction="none" reduced by .sum(): the upstream gradient
    reaches the op as a stride-0 expand; it must match the reference's."""
    dt = torch.float64 if impl in F64_IMPLS else torch.float32
    inp = as_dtype(make_inputs(seed=14), dt)
    results = []
    for fn in (linear_kl_divergence, ref_fn):
        xt = inp["xt"].clone().requires_grad_()
        bt = inp["bt"].clone().requires_grad_()
        kw = {"impl": impl} if fn is linear_kl_divergence else {"compute_dtype": dt}
        loss = fn(
            inp["xs"],
            inp["ws"],
            xt,
            inp["wt"],
            student_bias=inp["bs"],
            teacher_bias=bt,
            target=inp["target"],
            beta=0.3,
            reduction="none",
            teacher_requires_grad=True,
            **kw,
        )
        loss.sum().backward()
        results.append((xt.grad, bt.grad))
    tol = 1e-9 if impl in F64_IMPLS else 2e-5
    for got, want, name in zip(results[0], results[1], ("dxt", "dbt"), strict=True):
        assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item(), name=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta", BETAS)
def test_identical_heads_give_zero(impl, beta):
    """KL(P‖P) = JSD(P, P) = 0 and so is every gradient, to rounding."""
    inp = as_dtype(make_inputs(seed=15), torch.float64 if impl in F64_IMPLS else torch.float32)
    xs = inp["xs"].clone().requires_grad_()
    loss = linear_kl_divergence(xs, inp["ws"], inp["xs"], inp["ws"], beta=beta, temperature=0.7, impl=impl)
    loss.backward()
    eps = torch.finfo(xs.dtype).eps
    assert abs(loss.item()) <= 64 * eps and xs.grad.abs().max().item() <= 64 * eps


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_allocation_holds_the_logits(impl, reduction):
    """No allocation in forward or backward (the recompute of "none" included) is larger than one chunk of one
    head's logits, a quarter of N×V here: the N×V logits of either head never exist."""
    from torch.profiler import ProfilerActivity, profile

    n, v, rows = 32, 512, 8
    g = torch.Generator().manual_seed(16)
    xs = torch.randn(n, 8, generator=g).requires_grad_()
    ws = torch.randn(v, 8, generator=g).requires_grad_()
    xt, wt = torch.randn(n, 12, generator=g), torch.randn(v, 12, generator=g)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = linear_kl_divergence(xs, ws, xt, wt, beta=0.3, reduction=reduction, impl=impl, chunk_size=rows)
        loss.sum().backward()
    # leaf events only: a parent's figure is the net of everything allocated under it
    largest = max(e.cpu_memory_usage for e in prof.events() if not e.cpu_children)
    assert 0 < largest <= rows * v * 4 < n * v * 4, (largest, rows * v * 4)


@pytest.mark.parametrize("beta, reduction", [(0.0, "mean"), (0.3, "none"), (1.0, "sum")])
def test_gradcheck_float64(beta, reduction):
    inp = make_inputs(5, 3, 4, 7, seed=9)
    inp["target"][2] = -100

    def fn(xs, ws, bs, xt, wt, bt):
        return linear_kl_divergence(
            xs,
            ws,
            xt,
            wt,
            student_bias=bs,
            teacher_bias=bt,
            target=inp["target"],
            beta=beta,
            temperature=0.8,
            reduction=reduction,
            teacher_requires_grad=True,
            impl="cpu",
            chunk_size=4,
        )

    leaves = [inp[k].clone().requires_grad_() for k in NAMES]
    assert torch.autograd.gradcheck(fn, leaves)


# ---------------------------------------------------------------- custom-op checks and torch.compile


def _op(impl, which):
    return getattr(torch.ops.infofuse, f"{OPS[impl]}_{which}").default


def _op_args(flags=(True,) * 6, reduction=1, beta=0.3):
    inp = as_dtype(make_inputs(17, 6, 9, 40, seed=10), torch.float32)
    return (
        inp["xs"],
        inp["ws"],
        inp["xt"],
        inp["wt"],
        inp["target"],
        inp["bs"],
        inp["bt"],
        beta,
        1.5,
        reduction,
        -100,
        8,
        *flags,
    )


@pytest.mark.parametrize(
    "impl, reduction, flags",
    [
        ("cpu", 0, (True,) * 6),
        ("cpu", 1, (True,) * 6),
        ("cpu", 2, (True, True, False, False, False, False)),
        ("chunked", 0, (True, True, False, False, False, False)),
        ("chunked", 1, (True,) * 6),
        ("fused", 0, (True, True, False, False, False, False)),
        ("fused", 1, (True,) * 6),
        ("fused", 2, (True, False, True, False, True, True)),
    ],
)
def test_opcheck_forward(impl, reduction, flags):
    args = list(_op_args(flags, reduction))
    for i in (0, 1, 2, 3, 5, 6):
        args[i] = args[i].clone().requires_grad_()
    torch.library.opcheck(_op(impl, "forward"), tuple(args))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", [0, 1])
def test_opcheck_backward(impl, reduction):
    args = _op_args(reduction=reduction)
    grad = torch.rand(17) + 0.5 if reduction == 0 else torch.tensor(1.3)
    torch.library.opcheck(_op(impl, "backward"), (grad, *args))


def test_every_backend_shares_the_schemas():
    from infofuse._ops.kl_divergence import BACKWARD_SCHEMA, FORWARD_SCHEMA

    for impl, name in OPS.items():
        for which, template in (("forward", FORWARD_SCHEMA), ("backward", BACKWARD_SCHEMA)):
            want = str(torch._C.parse_schema(template.format(name=f"infofuse::{name}_{which}")))
            assert str(_op(impl, which)._schema) == want, (impl, which)


@pytest.mark.parametrize("impl", IMPLS)
def test_fake_kernel_mirrors_real_outputs(impl):
    from torch._subclasses.fake_tensor import FakeTensorMode

    for reduction, flags in ((0, (True,) * 6), (1, (True, False, True, False, True, False)), (2, (False,) * 6)):
        args = _op_args(flags, reduction)
        real = _op(impl, "forward")(*args)
        with FakeTensorMode() as mode:
            fake = _op(impl, "forward")(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        for r, f in zip(real, fake, strict=True):
            assert (r.shape, r.dtype, r.device) == (f.shape, f.dtype, f.device)


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_compile_fullgraph(impl):
    inp = as_dtype(make_inputs(seed=12), torch.float32)

    def step(xs, ws, xt, wt):
        loss = linear_kl_divergence(
            xs, ws, xt, wt, target=inp["target"], beta=0.3, temperature=2.0, impl=impl, teacher_requires_grad=True
        )
        return loss * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    leaves = [inp[k].clone().requires_grad_() for k in ("xs", "ws", "xt", "wt")]
    eager = [inp[k].clone().requires_grad_() for k in ("xs", "ws", "xt", "wt")]
    got = compiled(*leaves)
    got.backward()
    want = step(*eager)
    want.backward()
    assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-7, name="compiled loss")
    for a, e, n in zip(leaves, eager, ("dxs", "dws", "dxt", "dwt"), strict=True):
        assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-7, name=f"compiled {n}")


# ---------------------------------------------------------------- bad input: clear errors before any kernel


def _bad(**changes):
    inp = as_dtype(make_inputs(5, 4, 6, 8, seed=13), torch.float32)
    args = {
        "student_input": inp["xs"],
        "student_weight": inp["ws"],
        "teacher_input": inp["xt"],
        "teacher_weight": inp["wt"],
    }
    kw = {"target": inp["target"]}
    for k, v in changes.items():
        (args if k in args else kw)[k] = v
    return lambda: linear_kl_divergence(*args.values(), **kw)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"teacher_weight": torch.randn(9, 6)}, ValueError, "share the vocabulary.*V = 9.*V = 8"),
        ({"student_weight": torch.randn(8, 5)}, ValueError, "student_weight must be \\(V, D_s\\)"),
        ({"teacher_input": torch.randn(4, 6)}, ValueError, "teacher_input must have the student's leading shape"),
        ({"beta": 1.5}, ValueError, "beta must be a float in \\[0, 1\\]"),
        ({"beta": -0.1}, ValueError, "beta must be a float in \\[0, 1\\]"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite float > 0"),
        ({"temperature": -2.0}, ValueError, "temperature must be a finite float > 0"),
        ({"teacher_weight": torch.randn(8, 6, dtype=torch.float64)}, TypeError, "teacher_weight must have"),
        ({"student_input": torch.randint(0, 3, (5, 4))}, TypeError, "student_input must be float32"),
        ({"teacher_bias": torch.randn(7)}, ValueError, "teacher_bias must have shape \\(V,\\) = \\(8,\\)"),
        ({"target": torch.zeros(5)}, TypeError, "target must be an integer tensor"),
        ({"target": torch.zeros(4, dtype=torch.long)}, ValueError, "target must have shape"),
        ({"teacher_weight": torch.randn(8, 6, device="meta")}, ValueError, "one device.*teacher_weight on meta"),
        ({"reduction": "batchmean"}, ValueError, "reduction must be"),
        ({"impl": "triton"}, ValueError, "impl must be None, .cpu., .chunked., .fused. or .reference."),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"teacher_requires_grad": 1}, TypeError, "teacher_requires_grad must be a bool"),
    ],
)
def test_bad_input_raises_clear_errors(changes, error, match):
    with pytest.raises(error, match=match):
        _bad(**changes)()


@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_triton_backends_refuse_float64(impl):
    inp = make_inputs(5, 4, 6, 8, seed=13)
    with pytest.raises(TypeError, match=f"impl='{impl}' takes float32, bfloat16 or float16 inputs"):
        linear_kl_divergence(inp["xs"], inp["ws"], inp["xt"], inp["wt"], impl=impl)


def test_exported():
    assert infofuse.linear_kl_divergence is linear_kl_divergence
    assert "LinearKLDivergence" in infofuse.__all__ and "linear_kl_divergence_reference" in infofuse.__all__


# ---------------------------------------------------------------- GPU (skipped without CUDA)


@pytest.mark.gpu
def test_gpu_fused_refuses_deterministic_mode():
    """The fused gradient kernel adds with float32 atomics: under torch.use_deterministic_algorithms(True) it raises
    on CUDA rather than return order-dependent gradients (the forward without gradients still runs)."""
    inp = {k: (v.cuda() if v is not None else None) for k, v in as_dtype(make_inputs(seed=21), torch.float32).items()}
    args = (inp["xs"], inp["ws"], inp["xt"], inp["wt"])
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.no_grad():
            assert torch.isfinite(linear_kl_divergence(*args, impl="fused"))
        with pytest.raises(RuntimeError, match="not deterministic"):
            linear_kl_divergence(inp["xs"].requires_grad_(), *args[1:], impl="fused")
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["chunked", "fused"])
@pytest.mark.parametrize("beta", BETAS)
def test_gpu_triton_graded_against_pytorch(impl, beta):
    """The compiled Triton backends (chunked, the CUDA default: cuBLAS + the row pass; fused: no logit in memory) at
    an LM-like shape, float32 and bf16, graded against PyTorch at the same dtype."""
    for dtype in (torch.float32, torch.bfloat16):
        inp = make_inputs(2048, 256, 384, 32000, seed=20)
        cuda = {k: (v.cuda() if v is not None else None) for k, v in as_dtype(inp, dtype).items()}
        kw = dict(beta=beta, temperature=2.0, reduction="mean", teacher_requires_grad=True)
        ours = run(linear_kl_divergence, cuda, impl=impl, **kw)
        same = run(ref_fn, cuda, **kw)
        truth = run(truth_fn, {k: (v.cuda() if v is not None else None) for k, v in inp.items()}, **kw)
        for key in truth:
            floor = 1e-6 if dtype == torch.float32 or key == "loss" else 1e-3
            assert_graded(ours[key], same[key], truth[key], name=f"{key} ({impl}, {dtype}, beta={beta})", floor=floor)


@pytest.mark.gpu
@pytest.mark.parametrize("beta", BETAS)
def test_gpu_agrees_with_liger_fused_linear_jsd(beta):
    """Liger's convention is ours (docs/kl_divergence.md): its LigerFusedLinearJSD gives the same loss and student
    gradients, in float32, where it is installed (no biases: Liger's heads have none)."""
    liger = pytest.importorskip("liger_kernel.transformers")
    inp = as_dtype(make_inputs(256, 64, 96, 4096, seed=21, bias=False), torch.float32)
    cuda = {k: (v.cuda() if v is not None else None) for k, v in inp.items()}
    kw = dict(beta=beta, temperature=1.5, reduction="mean", teacher_requires_grad=False)
    ours = run(linear_kl_divergence, cuda, **kw)
    jsd = liger.LigerFusedLinearJSD(jsd_beta=beta, ignore_index=-100, temperature=1.5)

    def liger_fn(xs, ws, xt, wt, *, target, **_):
        return jsd(xs, ws, xt, wt, target)

    theirs = run(liger_fn, cuda, **kw)
    for key in ("loss", "dxs", "dws"):
        assert_close(ours[key].float(), theirs[key].float(), rtol=1e-4, atol=1e-6, name=f"{key} vs Liger")


_COMPILE_SCRIPT = """
import torch
from infofuse.bench.sass import compile_kernel
from infofuse.triton_kernels.kl_divergence_rows import _kl_rows_kernel

for dtype, mode in ((torch.bfloat16, 0), (torch.float32, 2)):
    z, f = torch.empty(64, 4096, dtype=dtype), torch.empty(64)
    args = dict(zs_ptr=z, zt_ptr=z, target_ptr=torch.empty(64, dtype=torch.int64), grad_ptr=f, scale_ptr=f,
                loss_ptr=f, row0=0, V=4096, stride_sn=4096, stride_sv=1, stride_tn=4096, stride_tv=1, stride_grad=0,
                ignore_index=-100, inv_t=0.5, beta=0.3, log_beta=-1.2, log_1mbeta=-0.35, MODE=mode, HAS_TARGET=True,
                WRITE_LOSS=True, GRAD_S=True, GRAD_T=True, BLOCK_V=2048)
    c = compile_kernel(_kl_rows_kernel, args, arch=90, num_warps=8)
    assert c.spill_bytes == 0, f"mode {mode} {dtype}: {c.spill_bytes} bytes of local memory (spills)"
print("ok")
"""


_FUSED_COMPILE_SCRIPT = """
import torch
from infofuse.bench.sass import compile_kernel
from infofuse.triton_kernels.kl_divergence_fused import CUDA_BLOCKS, _kl_fused_grad_kernel, _kl_fused_stats_kernel

cfg = dict(CUDA_BLOCKS)
launch = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
sizes = dict(N=512, V=4096, DS=256, DT=384, stride_xsn=256, stride_xsd=1, stride_wsv=256, stride_wsd=1,
             stride_xtn=384, stride_xtd=1, stride_wtv=384, stride_wtd=1, inv_t=0.5, beta=0.3, log_beta=-1.2,
             log_1mbeta=-0.35)
f = torch.empty(64)
for dtype, mode in ((torch.bfloat16, 0), (torch.float32, 2)):
    x = torch.empty(64, 64, dtype=dtype)
    common = dict(xs_ptr=x, ws_ptr=x, bs_ptr=x, xt_ptr=x, wt_ptr=x, bt_ptr=x, MODE=mode, HAS_BS=True, HAS_BT=True,
                  IEEE=dtype == torch.float32, **sizes, **cfg)
    stats = dict(target_ptr=torch.empty(64, dtype=torch.int64), stats_ptr=f, loss_ptr=f, ignore_index=-100,
                 HAS_TARGET=True)
    teacher = mode == 2
    grads = dict(stats_ptr=f, coef_ptr=f, dxs_ptr=f, dws_ptr=f, dbs_ptr=f, dxt_ptr=f, dwt_ptr=f, dbt_ptr=f,
                 GRAD_XS=True, GRAD_WS=True, GRAD_BS=True, GRAD_XT=teacher, GRAD_WT=teacher, GRAD_BT=teacher)
    for kernel, extra in ((_kl_fused_stats_kernel, stats), (_kl_fused_grad_kernel, grads)):
        c = compile_kernel(kernel, dict(common, **extra), arch=90, **launch)
        assert c.spill_bytes == 0, f"{kernel.fn.__name__} mode {mode} {dtype}: {c.spill_bytes} bytes spilled"
print("ok")
"""


def test_row_kernel_compiles_for_sm90():
    """The GPU build of the Triton row pass (every mode, float32 and bf16 logits) goes through for sm_90 with no
    register spills, on a machine without a GPU (the interpreter tests check only what it computes)."""
    _compiles_for_sm90(_COMPILE_SCRIPT)


def test_fused_kernels_compile_for_sm90():
    """Both fused kernels (forward KL in bf16, skew JSD in float32 with teacher gradients), at the CUDA tile sizes,
    go through for sm_90 with no register spills."""
    _compiles_for_sm90(_FUSED_COMPILE_SCRIPT)


def _compiles_for_sm90(script: str) -> None:
    import os
    import subprocess
    import sys

    from tests.test_triton_compile import _ptxas_missing

    if _ptxas_missing() is not None:
        pytest.skip(str(_ptxas_missing()))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr

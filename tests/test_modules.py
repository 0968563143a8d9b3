"""The linear cross-entropy modules: ``LinearCrossEntropyLoss`` as a drop-in of torch's class (same constructor,
parameters, state dict, initialisation and results) and ``LinearCrossEntropy`` (the weight passed to forward)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import infofuse
from infofuse import LinearCrossEntropy, LinearCrossEntropyLoss, linear_cross_entropy_reference
from tests.utils import assert_close, assert_graded

TorchLoss = getattr(torch.nn, "LinearCrossEntropyLoss", None)
needs_torch_class = pytest.mark.skipif(
    TorchLoss is None, reason=f"torch.nn.LinearCrossEntropyLoss needs torch >= 2.13, this is {torch.__version__}"
)

CASES = {  # constructor keywords shared by both classes
    "plain": {},
    "bias": {"bias": True},
    "everything": {"bias": True, "weight": "w", "label_smoothing": 0.1, "ignore_index": -1},
    "k_dim": {"bias": True, "out_features": (2, 3), "weight": "w", "label_smoothing": 0.05},
}
C, D = 37, 11


def _kwargs(case, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    kw = dict(CASES[case])
    if kw.get("weight") == "w":
        kw["weight"] = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return kw


def _targets(case, n, *, seed=2):
    """Class indices (never all valid: a few ignored where the case sets ignore_index) for ``n`` rows."""
    g = torch.Generator().manual_seed(seed)
    out = CASES[case].get("out_features", ())
    t = torch.randint(0, C, (n, *out), generator=g)
    if "ignore_index" in CASES[case]:
        t[torch.rand(t.shape, generator=g) < 0.2] = CASES[case]["ignore_index"]
    return t


def _pair(case, dtype=torch.float64, *, reduction="mean"):
    """Our module and torch's with the same state (ours initialised, torch's loaded from ours)."""
    kw = _kwargs(case, dtype)
    torch.manual_seed(3)
    ours = LinearCrossEntropyLoss(D, C, dtype=dtype, reduction=reduction, **kw)
    theirs = TorchLoss(D, C, dtype=dtype, reduction=reduction, **kw)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _run(module, x, t, grad_scale=1.3):
    xs = x.detach().clone().requires_grad_()
    module.zero_grad()
    loss = module(xs, t)
    total = (
        loss * grad_scale if loss.dim() == 0 else (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum()
    )
    total.backward()
    grads = {"loss": loss.detach(), "dx": xs.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return grads


# ---------------------------------------------------------------- the same class as torch's


@needs_torch_class
def test_constructor_signature_matches_torch():
    ours = inspect.signature(LinearCrossEntropyLoss.__init__).parameters
    theirs = inspect.signature(TorchLoss.__init__).parameters
    names = list(theirs)
    assert list(ours)[: len(names)] == names, "torch's arguments first, in torch's order"
    for name, p in theirs.items():
        assert ours[name].kind == p.kind, name
        assert ours[name].default == p.default, f"{name}: default {ours[name].default!r} != torch's {p.default!r}"
    extras = list(ours)[len(names) :]
    assert extras == ["z_loss", "softcap", "impl", "chunk_size"]
    assert all(ours[n].kind == inspect.Parameter.KEYWORD_ONLY for n in extras)
    assert list(inspect.signature(LinearCrossEntropyLoss.forward).parameters) == list(
        inspect.signature(TorchLoss.forward).parameters
    )


@needs_torch_class
@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_round_trip_and_same_init(case):
    kw = _kwargs(case, torch.float32)
    torch.manual_seed(4)
    ours = LinearCrossEntropyLoss(D, C, **kw)
    torch.manual_seed(4)
    theirs = TorchLoss(D, C, **kw)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:  # same seed, same initialisation
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    # strict loads both ways, with values that differ from the initial ones
    with torch.no_grad():
        for p in theirs.parameters():
            p.mul_(-0.5).add_(0.25)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    with torch.no_grad():
        ours.linear.weight.mul_(1.5)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(theirs.linear.weight, ours.linear.weight)


@needs_torch_class
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_same_loss_and_gradients_as_torch_float64(case, reduction):
    ours, theirs = _pair(case, reduction=reduction)
    x = torch.randn(29, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = _targets(case, 29)
    got, want = _run(ours, x, t), _run(theirs, x, t)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        scale = want[key].abs().max().item()
        assert_close(got[key], want[key], rtol=1e-9, atol=1e-9 * scale, name=key)


@needs_torch_class
@pytest.mark.parametrize("case", ["plain", "everything", "k_dim"])
def test_float32_graded_against_torch_module(case):
    ours, theirs = _pair(case, torch.float32)
    truth_module = TorchLoss(D, C, **_kwargs(case)).double()
    truth_module.load_state_dict({k: v.double() for k, v in ours.state_dict().items()}, strict=True)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(6)) * 3.0
    t = _targets(case, 64)
    got, same, truth = _run(ours, x, t), _run(theirs, x, t), _run(truth_module, x.double(), t)
    for key in truth:
        assert got[key].dtype == torch.float32, key
        assert_graded(got[key], same[key], truth[key], name=key, floor=1e-6)


@needs_torch_class
def test_class_probability_targets_like_torch():
    ours, theirs = _pair("bias")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(13, D, generator=g, dtype=torch.float64)
    q = torch.randn(13, C, generator=g, dtype=torch.float64).softmax(-1)
    try:
        ours(x, q)
    except (TypeError, ValueError) as e:  # the public function's validation, before probability targets are wired
        if not str(e).startswith("target must"):
            raise
        pytest.skip(f"infofuse.linear_cross_entropy does not take probability targets here: {e}")
    got, want = _run(ours, x, q), _run(theirs, x, q)
    for key in want:
        assert_close(got[key], want[key], rtol=1e-9, atol=1e-12, name=key)


# ---------------------------------------------------------------- without torch's class, and infofuse's extras


def test_module_alone_against_the_reference():
    """Runs on any torch (the GPU machine's 2.11 has no torch.nn.LinearCrossEntropyLoss)."""
    torch.manual_seed(8)
    module = LinearCrossEntropyLoss(D, C, bias=True, dtype=torch.float64, reduction="none", label_smoothing=0.1,
                                    z_loss=1e-2, softcap=5.0, chunk_size=4)  # fmt: skip
    assert module.linear.weight.shape == (C, D) and module.linear.bias.shape == (C,)
    assert module.ignore_index is None and module.options is None
    x = torch.randn(3, 9, D, dtype=torch.float64)
    t = torch.randint(0, C, (3, 9))
    loss = module(x, t)
    want = linear_cross_entropy_reference(
        x, module.linear.weight, t, linear_bias=module.linear.bias, reduction="none", label_smoothing=0.1,
        z_loss=1e-2, softcap=5.0, compute_dtype=torch.float64,
    )  # fmt: skip
    assert loss.shape == (3, 9)
    assert_close(loss, want, rtol=1e-9, atol=1e-12, name="loss")
    text = repr(module)
    assert "in_features=11" in text and "num_classes=37" in text and "z_loss=0.01" in text


def test_k_dimensional_against_the_reference():
    """out_features (K-dimensional loss) checked without torch's class: position k's logits use rows c·P + k."""
    torch.manual_seed(9)
    out = (2, 3)
    module = LinearCrossEntropyLoss(D, C, out_features=out, bias=True, dtype=torch.float64, reduction="none")
    x = torch.randn(5, D, dtype=torch.float64)
    t = torch.randint(0, C, (5, *out))
    w = module.linear.weight.reshape(C, 6, D)
    b = module.linear.bias.reshape(C, 6)
    want = torch.stack(
        [
            linear_cross_entropy_reference(
                x, w[:, k], t.reshape(5, 6)[:, k], linear_bias=b[:, k], reduction="none", compute_dtype=torch.float64
            )
            for k in range(6)
        ],
        dim=1,
    ).reshape(5, *out)
    assert_close(module(x, t), want, rtol=1e-9, atol=1e-12, name="K-dimensional loss")
    with pytest.raises(ValueError, match="needs input of shape"):
        module(x[0], t[0])


def test_constructor_checks_like_torch():
    with pytest.raises(RuntimeError, match="weight shape"):
        LinearCrossEntropyLoss(D, C, weight=torch.rand(C + 1))
    with pytest.raises(RuntimeError, match="label_smoothing"):
        LinearCrossEntropyLoss(D, C, label_smoothing=1.5)
    m = LinearCrossEntropyLoss(D, C, device="meta", dtype=torch.bfloat16)
    assert m.linear.weight.device.type == "meta" and m.linear.weight.dtype == torch.bfloat16


def test_extras_are_keyword_only():
    params = inspect.signature(LinearCrossEntropyLoss.__init__).parameters
    assert [n for n, p in params.items() if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD] == [
        "self",
        "in_features",
        "num_classes",
    ]
    assert math.isclose(LinearCrossEntropyLoss(D, C, z_loss=1e-4).z_loss, 1e-4)


# ---------------------------------------------------------------- LinearCrossEntropy: the weight passed to forward


def test_linear_cross_entropy_module_takes_the_weight_in_forward():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    w = torch.randn(50, 12, generator=g, dtype=torch.float64) / 3
    b = torch.randn(50, generator=g, dtype=torch.float64)
    t = torch.randint(0, 50, (2, 5), generator=g)
    cw = torch.rand(50, generator=g, dtype=torch.float64) + 0.5
    module = LinearCrossEntropy(weight=cw, reduction="none", label_smoothing=0.1, return_lse=True)
    loss, lse = module(x, w, t, b)
    want, want_lse = linear_cross_entropy_reference(
        x, w, t, linear_bias=b, weight=cw, reduction="none", label_smoothing=0.1, return_lse=True,
        compute_dtype=torch.float64,
    )  # fmt: skip
    assert loss.shape == (2, 5)
    assert_close(loss, want, rtol=1e-9, atol=1e-12, name="loss")
    assert_close(lse, want_lse, rtol=1e-9, atol=1e-12, name="lse")
    assert "weight" in dict(module.named_buffers()) and not list(module.parameters())
    assert "reduction='none'" in repr(module)
    assert {"LinearCrossEntropy", "LinearCrossEntropyLoss"} <= set(infofuse.__all__)

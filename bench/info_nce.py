"""Benchmark case: the symmetric CLIP loss, ``(CE(s·I Tᵀ, arange) + CE(s·T Iᵀ, arange)) / 2`` with I, T (N, D).

Inputs (model ``clip``): image embeddings on the unit sphere, text embeddings = normalise(image + 0.5·noise), so
matched pairs are similar as in a trained CLIP; scale s = 30 (a 0-dim tensor). Peers: infofuse (its default impl,
plus its other impls on GPU), dense PyTorch (fp32 cross-entropy both ways, the issue's baseline), open_clip's
``ClipLoss`` (when installed; its loss module is loaded by path when ``import open_clip`` fails) and Inf-CL's
``cal_flash_loss`` both ways (GPU only, when installed). The ground truth is the dense reference in float64.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch
import torch.nn.functional as F

from .case import Case, Inputs, Peer
from .floor import GemmFloor

__all__ = ["CASE", "InfoNCECase", "make_inputs"]

SCALE = 30.0


def make_inputs(shape, model="clip", dtype=torch.float32, device="cpu", seed=0):
    """``(image, text, scale)`` for one configuration; drawn in float32, then cast."""
    n, d = shape
    if model != "clip":
        raise ValueError(f"unknown input model {model!r}; known: clip")
    gen = torch.Generator(device=device).manual_seed(seed)
    image = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=1)
    text = F.normalize(image + 0.5 * torch.randn(n, d, device=device, generator=gen), dim=1)
    return image.to(dtype), text.to(dtype), torch.tensor(SCALE, device=device)


def _dense(image, text, scale):
    logits = scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.T.float(), labels)) / 2


def open_clip_loss_module():
    """open_clip's loss module: imported, or loaded from the installed wheel's open_clip/loss.py, which needs only
    torch (the Makefile installs open-clip-torch without its dependencies, so ``import open_clip`` may fail).
    Raises ``importlib.metadata.PackageNotFoundError`` where open-clip-torch is not installed."""
    try:
        import open_clip.loss as module

        return module
    except ImportError:
        pass
    path = importlib.metadata.distribution("open_clip_torch").locate_file("open_clip/loss.py")
    spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


class InfoNCECase(Case):
    op = "info_nce"
    dims = ("N", "D")
    models = ("clip",)
    default_models = ("clip",)
    grad_labels = ("dImage", "dText")
    time_baseline = "dense"
    memory_baseline = "dense"
    quick_shape = (512, 64)
    probe_shape = (8, 16)
    params = {"loss": "symmetric CLIP", "scale": SCALE}

    def default_shapes(self, device: str) -> list[tuple[int, ...]]:
        if device.startswith("cuda"):
            return [(32768, 768), (65536, 768)]
        return [(8192, 256)]  # the CPU target of the issue

    def make_inputs(self, shape, model, dtype, device, seed) -> Inputs:
        image, text, scale = make_inputs(shape, model, dtype, device, seed)
        image.requires_grad_()
        text.requires_grad_()
        return Inputs(args=(image, text, scale), leaves=(image, text))

    def floor_gemms(self, shape, model) -> GemmFloor:
        n, d = shape  # M = N: one text per image
        return GemmFloor((n, n, d), fwd=1, both=3, what="3 GEMMs of 2·N·M·D (scores, dImage, dText); forward alone 1")

    def reference(self, inputs: Inputs, dtype: torch.dtype) -> tuple[float, list[torch.Tensor]]:
        from infofuse.reference import info_nce_reference

        image, text, scale = inputs.args
        ir = image.detach().to(dtype).requires_grad_()
        tr = text.detach().to(dtype).requires_grad_()
        loss = info_nce_reference(ir, tr, scale=scale.to(dtype), symmetric=True, compute_dtype=dtype)
        loss.backward()
        return loss.item(), [ir.grad, tr.grad]

    def peers(self, device: str, dtype: torch.dtype) -> list[Peer]:
        on_gpu = device.startswith("cuda")
        import infofuse

        def bind(impl):
            return lambda: lambda i, t, s: infofuse.clip_loss(i, t, s, impl=impl)

        default = "cpu" if device == "cpu" else "chunked"
        peers = [
            Peer("infofuse", bind(None), note=f"impl=None -> {default!r}"),
            Peer("infofuse-reference", bind("reference"), stands_in_for="infofuse", note="impl='reference'"),
        ]
        if on_gpu:
            peers += [Peer(f"infofuse-{impl}", bind(impl), note=f"impl={impl!r}") for impl in ("chunked", "fused")]
        peers.append(Peer("dense", lambda: _dense, note="fp32 cross-entropy both ways on s·I Tᵀ"))
        try:
            clip_loss_cls = open_clip_loss_module().ClipLoss
            peers.append(Peer("open_clip", lambda: clip_loss_cls(), note="open_clip.loss.ClipLoss()"))
        except Exception as exc:
            peers.append(Peer("open_clip", None, skip=f"not installed ({_first_line(exc)})"))
        if not on_gpu:
            peers.append(Peer("inf-cl", None, skip="GPU only"))
        else:
            try:
                from inf_cl import cal_flash_loss

                def build():
                    def inf_cl(i, t, s):
                        return (cal_flash_loss(i, t, scale=s).mean() + cal_flash_loss(t, i, scale=s).mean()) / 2

                    return inf_cl

                peers.append(
                    Peer(
                        "inf-cl",
                        build,
                        probe=False,  # the probe's D = 16 is no multiple of 256
                        note="cal_flash_loss both ways (D must be a multiple of 256)",
                    )
                )
            except Exception as exc:
                peers.append(Peer("inf-cl", None, skip=f"not installed ({_first_line(exc)})"))
        return peers


CASE = InfoNCECase()

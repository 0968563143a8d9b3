"""Autograd helpers shared by the ops' backward formulas."""

from __future__ import annotations

import torch


def refuse_double_backward(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise where a backward formula would have to be differentiated again (``create_graph=True``).

    The backward kernels of ``op`` return gradients that are not themselves differentiable; without this check
    ``torch.autograd.grad(..., create_graph=True)`` would hand back a gradient with ``requires_grad=False`` and
    silently drop every second-order term (a gradient penalty's, say). Call it first thing in a backward formula
    with the tensors that gradient depends on (the upstream gradients, the saved inputs).
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"infofuse.{op} does not support double backward: its gradient is computed by kernels that are not "
            "differentiable again, so backward(create_graph=True) / autograd.grad(create_graph=True) through it "
            "would silently lose the second-order terms. Use the op's plain-PyTorch reference "
            f"(impl='reference' or infofuse.reference) where second derivatives are needed."
        )

"""What a benchmark case gives the harness (``Case``, its peers ``Peer`` and their ``Inputs``), and what a run asks
for (``Options``, expanded into one ``Config`` per shape, input model and dtype)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .floor import GemmFloor

__all__ = ["Case", "Config", "Inputs", "Options", "Peer", "first_line"]


@dataclass
class Peer:
    """One implementation under comparison.

    ``build()`` returns the loss function, called as ``fn(*inputs.args)`` and returning a scalar tensor. It runs
    once per configuration and process (``torch.compile`` wraps there).
    """

    name: str
    build: Callable[[], Callable[..., torch.Tensor]] | None
    skip: str | None = None  # why it cannot run here (not installed, GPU only, ...)
    probe: bool = True  # try it on tiny inputs before planning (False where that is costly, as for torch.compile)
    stands_in_for: str | None = None  # run only when that peer is unavailable, or when asked for by name
    models: tuple[str, ...] | None = None  # the input models it can run (None: every one); skipped on the others
    note: str = ""


@dataclass
class Inputs:
    args: tuple  # positional arguments of every peer's loss function
    leaves: tuple[torch.Tensor, ...]  # the arguments that require grad, in the order of Case.grad_labels


class Case:
    """What the harness needs to know about one op. Subclasses fill in the attributes and the four methods, and
    ``floor_gemms`` where GEMMs bound the op."""

    op: str = ""
    dims: tuple[str, ...] = ()  # names of a shape's entries, e.g. ("N", "D", "V")
    models: tuple[str, ...] = ()  # input models ("gaussian", "lm", ...)
    default_models: tuple[str, ...] = ()
    grad_labels: tuple[str, ...] = ()  # one per Inputs.leaves entry, e.g. ("dX", "dW")
    time_baseline: str = "eager"  # peer whose fwd+bwd time the others are divided by
    memory_baseline: str | None = None  # peer whose peak memory the others are divided by
    quick_shape: tuple[int, ...] = ()
    probe_shape: tuple[int, ...] = ()  # tiny shape for the availability probe
    params: dict = {}  # fixed op arguments, recorded in every row

    def default_shapes(self, device: str) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def make_inputs(self, shape: tuple[int, ...], model: str, dtype: torch.dtype, device: str, seed: int) -> Inputs:
        """Deterministic in (shape, model, dtype, device, seed): the memory children rebuild the same inputs."""
        raise NotImplementedError

    def peers(self, device: str, dtype: torch.dtype) -> list[Peer]:
        raise NotImplementedError

    def reference(self, inputs: Inputs, dtype: torch.dtype) -> tuple[float, list[torch.Tensor]]:
        """Ground-truth loss and gradients (of ``inputs.leaves``) computed in ``dtype``."""
        raise NotImplementedError

    def floor_gemms(self, shape: tuple[int, ...], model: str) -> GemmFloor | None:
        """The GEMMs that bound the op's time from below at ``shape`` (see ``floor``); None where none does."""
        return None


@dataclass(frozen=True)
class Config:
    shape: tuple[int, ...]
    model: str
    dtype: str  # "float32", "bfloat16", ...


@dataclass
class Options:
    ops: list[str]
    device: str
    shapes: list[tuple[int, ...]] | None = None  # None: the case's defaults (or its quick shape)
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    models: list[str] | None = None  # None: the case's defaults
    reps: int = 3
    warmup: int = 1
    peers: list[str] | None = None  # None: every peer
    out: Path = Path("bench-out")
    seed: int = 0
    ref_dtype: str | None = "float64"  # None: no accuracy columns
    memory: bool = True
    quick: bool = False


def first_line(exc: BaseException) -> str:
    """Why a peer failed or was skipped, as one short line of a row or a table caption."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]

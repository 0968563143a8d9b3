"""infofuse: fused kernels for information-theoretic losses and estimators.

Every public function runs under ``torch.profiler.record_function("infofuse::<op>")``. The compiled extension
``infofuse._C`` is optional at import time: backends that need it say why when it is missing
(``infofuse.build_info()``).
"""

from ._ext import build_info, cpp_available
from .linear_cross_entropy import available_impls, linear_cross_entropy
from .modules import LinearCrossEntropyLoss
from .reference import linear_cross_entropy_reference

__version__ = "0.1.0"

__all__ = [
    "LinearCrossEntropyLoss",
    "available_impls",
    "build_info",
    "cpp_available",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
]

"""infofuse: fused kernels for information-theoretic losses and estimators.

Every public function runs under ``torch.profiler.record_function("infofuse::<op>")``. The compiled extension
``infofuse._C`` is optional at import time: backends that need it say why when it is missing
(``infofuse.build_info()``).
"""

from ._ext import build_info, cpp_available
from .info_nce import clip_loss, info_nce, nt_xent, siglip_loss, supcon_loss
from .kl_divergence import linear_kl_divergence
from .knn import knn, knn_entropy, knn_kl_divergence, koleo_loss, ksg_mutual_information
from .linear_cross_entropy import available_impls, linear_cross_entropy
from .log_probs import linear_log_probs
from .modules import (
    ClipLoss,
    InfoNCELoss,
    LinearCrossEntropy,
    LinearCrossEntropyLoss,
    LinearKLDivergence,
    LinearLogProbs,
    NTXentLoss,
    SigLipLoss,
    SupConLoss,
)
from .reference import (
    info_nce_reference,
    knn_reference,
    linear_cross_entropy_reference,
    linear_kl_divergence_reference,
    linear_log_probs_reference,
    siglip_reference,
)

__version__ = "0.1.0"

__all__ = [
    "ClipLoss",
    "InfoNCELoss",
    "LinearCrossEntropy",
    "LinearCrossEntropyLoss",
    "LinearLogProbs",
    "LinearKLDivergence",
    "NTXentLoss",
    "SigLipLoss",
    "SupConLoss",
    "available_impls",
    "build_info",
    "cpp_available",
    "clip_loss",
    "info_nce",
    "info_nce_reference",
    "knn",
    "knn_entropy",
    "knn_kl_divergence",
    "knn_reference",
    "koleo_loss",
    "ksg_mutual_information",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "linear_log_probs",
    "linear_log_probs_reference",
    "linear_kl_divergence",
    "linear_kl_divergence_reference",
    "nt_xent",
    "siglip_loss",
    "siglip_reference",
    "supcon_loss",
]

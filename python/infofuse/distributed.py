"""infofuse past one device, on ``torch.distributed`` (any backend: NCCL on GPUs, gloo on CPUs) and DTensor.

Three families, each the single-process op of the same name on the union of the ranks' data:

- vocabulary parallel: ``linear_cross_entropy`` with each rank holding its rows of the V×D head;
- data parallel: ``info_nce``, ``clip_loss``, ``siglip_loss``, ``nt_xent``, ``supcon_loss`` with each rank holding
  its rows of the batch;
- sharded points: ``knn``, ``knn_entropy``, ``ksg_mutual_information``, ``knn_kl_divergence``, ``koleo_loss`` with
  each rank holding its shard of the point set.

Before any kernel the ranks exchange their shapes, dtypes and options in one small all-gather, and every rank
raises the same error on a disagreement (never a hang, never a wrong answer). ``comm_stats()`` counts the bytes
this rank sends. The algorithms and the exact gradient contract with DDP, FSDP2 and tensor parallelism are in
docs/distributed.md.
"""

from ._dist import CommStats, comm_stats
from ._dist_info_nce import clip_loss, info_nce, nt_xent, siglip_loss, supcon_loss  # data parallel
from ._dist_knn import knn, knn_entropy, knn_kl_divergence, koleo_loss, ksg_mutual_information  # sharded points
from ._dist_lce import linear_cross_entropy  # vocabulary parallel

__all__ = [
    "CommStats",
    "comm_stats",
    # vocabulary parallel
    "linear_cross_entropy",
    # data parallel
    "clip_loss",
    "info_nce",
    "nt_xent",
    "siglip_loss",
    "supcon_loss",
    # sharded points
    "knn",
    "knn_entropy",
    "knn_kl_divergence",
    "koleo_loss",
    "ksg_mutual_information",
]

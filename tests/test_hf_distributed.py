"""infofuse.hf with a sharded head: 2 gloo ranks on CPU, loss and gradients against the single-process stock model.

Three layouts, each on a tiny Llama with an untied head built from the same seed in every process:

- ``dtensor``: only ``lm_head`` is tensor parallel (``ColwiseParallel``: its weight a ``DTensor`` sharded along the
  vocabulary, ``Shard(0)``); both ranks see the whole batch. This is the path where the patch gathers the head
  (``full_tensor()``): every rank's loss and gathered gradients equal the stock model's.
- ``fsdp2``: ``fully_shard`` on each decoder layer and on the model (``lm_head`` in the root's group), data parallel:
  rank r trains on row r of the batch. FSDP2 unshards the root's parameters for its forward, so the head reaches
  the op whole; each rank's loss equals the stock loss of its row, and the reduced gradients the mean of the stock
  gradients of the two rows.
- ``fsdp2_head``: the same with ``lm_head`` in its own unit (``fully_shard(model.lm_head)``), which FSDP2 reshards
  after the stock forward's call on zero positions; the patch unshards it again so that FSDP2 reduces its gradient.
"""

from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")

from infofuse import hf  # noqa: E402
from tests.dist_utils import free_port  # noqa: E402
from tests.test_hf import assert_same, batch, loss_and_grads, small_llama  # noqa: E402

WORLD = 2
TIMEOUT_S = 60  # the whole spawn, and every collective: a hang fails the test instead of blocking CI

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this build of torch",
)


def _rank(rank: int, port: int, layout: str, out: str) -> None:
    """One rank: shard the head (``layout``), patched forward + backward, save loss and whole gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model = hf.patch(small_llama())
        ids, mask, labels = batch()
        if layout == "dtensor":
            parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
        else:
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            if layout == "fsdp2_head":
                fully_shard(model.lm_head, mesh=mesh)
            fully_shard(model, mesh=mesh)
            ids, mask, labels = ids[rank : rank + 1], mask[rank : rank + 1], labels[rank : rank + 1]
        assert isinstance(model.lm_head.weight, DTensor)
        result, grads = loss_and_grads(model, ids, mask, labels)
        grads = {n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in grads.items()}
        torch.save(dict(loss=result.loss.detach(), logits=result.logits, grads=grads), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(layout: str, tmp_path) -> list[dict]:
    context = mp.start_processes(
        _rank, args=(free_port(), layout, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):  # raises with the rank's traceback when one fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} gloo ranks ({layout}) did not finish within {TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def test_dtensor_head_sharded_along_vocabulary(tmp_path):
    ids, mask, labels = batch()
    ref, ref_grads = loss_and_grads(small_llama(), ids, mask, labels)
    for rank, got in enumerate(_spawn("dtensor", tmp_path)):
        assert got["logits"] is None
        assert_same(got["loss"], ref.loss, got["grads"], ref_grads, what=f"rank {rank}: ")


@pytest.mark.parametrize("layout", ["fsdp2", "fsdp2_head"])
def test_fsdp2_data_parallel(layout, tmp_path):
    stock = small_llama()
    refs = [loss_and_grads(stock, *(t[r : r + 1] for t in batch())) for r in range(WORLD)]
    mean_grads = {n: torch.stack([grads[n] for _, grads in refs]).mean(0) for n in refs[0][1]}
    for rank, got in enumerate(_spawn(layout, tmp_path)):
        assert got["logits"] is None
        assert_same(got["loss"], refs[rank][0].loss, got["grads"], mean_grads, what=f"rank {rank}: ")

"""Spawned gloo ranks on CPU for the tests of ``infofuse.distributed``.

``run_ranks(fn, world, *args)`` starts ``world`` processes, initialises a gloo process group in each, calls
``fn(rank, world, *args)`` and returns the list of its return values by rank (anything picklable: tensors are
fine). An exception in any rank fails the caller with that rank's traceback; a rank that does not finish within
``timeout`` seconds fails it too (a hang is a failure, never a blocked CI). ``fn`` must be a module-level function
of an importable module (the ranks are spawned, not forked).

Each spawn costs a few seconds (a fresh interpreter imports torch): group many checks into one ``fn``.
"""

from __future__ import annotations

import datetime
import io
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infofuse.bench.distributed import free_port


def gloo_available() -> bool:
    return dist.is_available() and dist.is_gloo_available()


def _entry(rank, world, port, timeout, fn, args, queue):
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            # pickled to bytes here: tensors put on the queue as they are travel as shared-memory handles,
            # which vanish when this process exits before the parent has read them
            buffer = io.BytesIO()
            torch.save(fn(rank, world, *args), buffer)
            queue.put((rank, True, buffer.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world: int, *args, timeout: float = 90.0) -> list:
    """``fn(rank, world, *args)`` on ``world`` spawned gloo ranks; their return values by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, timeout, fn, args, queue), daemon=True) for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    try:
        for _ in range(world):
            try:
                r, ok, value = queue.get(timeout=timeout + 30)
            except Exception:  # noqa: BLE001 - queue.Empty: a rank hung or died without reporting
                errors.append(f"no answer from {world - len(results) - len(errors)} rank(s) in {timeout + 30} s")
                break
            if ok:
                results[r] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {r}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed test failed\n" + "\n".join(errors))
    return [results[r] for r in range(world)]

"""Peak memory of one step above its inputs and gradients.

On CUDA, ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus what was allocated before the step minus the
bytes of the gradients the step produced. On CPU, each (configuration, peer) runs in a fresh child process
(``worker_main``) that builds the same inputs from the same seed, runs one warm-up step, frees the gradients, trims
the allocator, resets the peak RSS (``5`` into ``/proc/self/clear_refs``), reads VmRSS, runs one step and reads VmHWM.
The child fixes glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_``) so that large tensors come and go from the OS as
they are allocated and freed, which keeps RSS a faithful account of live bytes. Children run one after the other.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import warnings

import torch

from .case import Config, Inputs, Options
from .timing import clear_grads

__all__ = ["child_peak_bytes", "cuda_peak_bytes", "grad_bytes", "worker_main"]


def grad_bytes(leaves) -> int:
    return sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None)


def cuda_peak_bytes(fn, inputs: Inputs) -> int:
    clear_grads(inputs.leaves)
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = fn(*inputs.args)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    grads = grad_bytes(inputs.leaves)
    del loss
    clear_grads(inputs.leaves)
    return peak - before - grads


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(m.group(1))


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _worker(spec: dict) -> dict:
    """Body of the memory child: one warm-up step, then the peak RSS of one more step above its start."""
    from infofuse.bench import get_case

    torch.set_num_threads(spec["threads"])
    case = get_case(spec["op"])
    dtype = getattr(torch, spec["dtype"])
    inputs = case.make_inputs(tuple(spec["shape"]), spec["model"], dtype, "cpu", spec["seed"])
    peer = next(p for p in case.peers("cpu", dtype) if p.name == spec["peer"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = peer.build()
        fn(*inputs.args).backward()
    clear_grads(inputs.leaves)
    gc.collect()
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kb("VmRSS")
    loss = fn(*inputs.args)
    loss.backward()
    hwm = _status_kb("VmHWM")
    grads = grad_bytes(inputs.leaves)
    return {
        "peak_bytes": (hwm - base) * 1024 - grads,
        "rss_before_bytes": base * 1024,
        "rss_peak_bytes": hwm * 1024,
        "grad_bytes": grads,
    }


def child_peak_bytes(op: str, peer: str, config: Config, opts: Options) -> tuple[int | None, str]:
    spec = {
        "op": op,
        "peer": peer,
        "shape": list(config.shape),
        "model": config.model,
        "dtype": config.dtype,
        "seed": opts.seed,
        "threads": torch.get_num_threads(),
    }
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    # torch first, then infofuse: the way any user script loads them
    code = "import sys, torch; from infofuse.bench.memory import worker_main; worker_main(sys.argv[1])"
    cmd = [sys.executable, "-c", code, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    except subprocess.TimeoutExpired:
        return None, "memory child timed out"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["peak_bytes"], ""
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"memory child failed (rc {proc.returncode}): {tail[:200]}"


def worker_main(spec_json: str) -> None:
    """Entry of the memory child (also ``python -m infofuse.bench.memory '<json spec>'`` by hand)."""
    print(json.dumps(_worker(json.loads(spec_json))), flush=True)


if __name__ == "__main__":
    worker_main(sys.argv[1])
